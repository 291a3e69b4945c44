"""Fuzzing of meaning at scale: hostile values from peers of every role, against a real broker
under CurveZMQ, while a legitimate actor and learner work through it.

Starts `python -m broker` with curve on and keys for a legitimate learner, actor and cli and
for hostile peers: an actor key, a cli key, a second learner key (a rival learner) and a key
that names no role. The hostile peers stream well-formed messages of every type with extreme
values (benchmarks/hostile.py), knowing every id the run has used. Between windows of them,
the legitimate actor takes a lease and sends its group, and the legitimate learner heartbeats,
samples, acknowledges each batch (BatchTrained), checkpoints, and now and then publishes the
next policy (up to `[broker] max_staleness` versions, so no honest trajectory ever goes
stale); it also slips, as a learner gone wrong would: its own message types with implausible
versions, steps, sizes and non-finite statistics (`Hostile.learner_message`). The fuzzer
checks what the broker must guarantee, from outside the broker:

- `alive`: every legitimate request answered, the broker process running at the end;
- `lineage`: the broker's policy version is always the legitimate learner's newest;
- `fence`: the legitimate learner never gets an Error, and Status lists one active learner,
  the one with the learner key (the rival's Hello is refused; it can only say who it is);
- `honest_acked`: every honest trajectory acked, none rejected;
- `served`: the honest actor keeps getting leases (none in the last quarter is a violation);
- `no_stale`: nothing evicted as stale (only a forged version could cause it here);
- `handed_valid`: every trajectory handed to the learner passes an independent check of the
  trajectory invariants (vocabulary, roles, loss mask, finite logprobs <= 0, versions
  non-decreasing within [0, newest], finite rewards, sample_prob in (0, 1], its group its
  lease, a lease the broker granted), and none is handed twice;
- `curator_finite`: the curriculum's summary stays finite;
- `rss`: the broker's resident memory stays under `--bound-mb`.

Prints as its last line one JSON object: `messages` (hostile, by `by_type` and `by_role`),
`answers` (what the hostile peers got back, by type or `Error:reason`), `honest_acked`,
`honest_groups`, `learner_batches`, `handed_out`, `batches_offered_again`, `learner_slips`
(the learner's own implausible messages, by type) and `learner_slips_refused` (by reason),
`policy_version`, `violations` (name ->
count), `first_violations` (up to 3 lines each), `rss_mb` (`start`, `max`), `seconds`, `ok`.

    python benchmarks/fuzz_meaning.py [--messages 100000] [--seed 0] [--window 200]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import msgspec  # noqa: E402
import numpy as np  # noqa: E402
import zmq  # noqa: E402
import zmq.auth  # noqa: E402

from benchmarks.harness import BrokerProcess  # noqa: E402
from benchmarks.hostile import VOCAB, Hostile, Knowledge, manifest, valid_group  # noqa: E402
from shared import protocol as P  # noqa: E402
from shared.security import generate_keys  # noqa: E402
from shared.transport import new_routing_id  # noqa: E402

GROUP = 4
STALENESS = 4
MAX_TOKENS = 512
HOSTILE = {"actor-evil": "actor", "cli-evil": "cli", "learner-rival": "learner", "guest": "x"}
HONEST = {"actor-0": "actor", "learner": "learner", "cli": "cli"}


class Peer:
    """A CURVE DEALER holding key `key`, driven synchronously."""

    def __init__(self, ctx: zmq.Context, endpoint: str, keys: Path, key: str, role: str) -> None:
        public, secret = zmq.auth.load_certificate(keys / f"{key}.key_secret")
        server, _ = zmq.auth.load_certificate(keys / "broker.key")
        self.key, self.role = key, role
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, new_routing_id(key))
        self.sock.curve_publickey, self.sock.curve_secretkey = public, secret
        self.sock.curve_serverkey = server
        self.sock.connect(endpoint)
        self.leases: list[P.Lease] = []  # granted to this peer, newest last

    def send(self, msg: P.Base) -> bool:
        """False: not sent, no connection (a key the handshake refused)."""
        try:
            self.sock.send(P.encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def request(self, msg: P.Base, want: tuple[type, ...], timeout_s: float = 15) -> P.Base:
        """Send `msg`; the first reply of a type in `want`, or an Error. Raises TimeoutError."""
        self.send(msg)
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if self.sock.poll(int(left * 1000)):
                reply = P.decode(self.sock.recv())
                if isinstance(reply, (*want, P.Error)):
                    return reply
        raise TimeoutError(f"{self.key}: no answer to {type(msg).__name__}")

    def drain(self, answers: Counter[str], known: Knowledge, granted: set[str]) -> None:
        """Read every reply waiting; tally it; note the leases it was granted."""
        while self.sock.poll(0):
            reply = P.decode(self.sock.recv())
            answers[
                f"Error:{reply.reason}" if isinstance(reply, P.Error) else type(reply).__name__
            ] += 1
            if isinstance(reply, P.TaskGrant):
                for lease in reply.leases:
                    self.leases = [*self.leases[-15:], lease]
                    granted.add(lease.lease_id)
                    known.learn(known.lease_ids, lease.lease_id)


class Run:
    """The honest pipeline and the checks; the hostile peers are driven by `main`."""

    def __init__(self, peers: dict[str, Peer], known: Knowledge, seed: int) -> None:
        self.p, self.known = peers, known
        self.rng = random.Random(seed)
        self.violations: Counter[str] = Counter()
        self.first: list[str] = []
        self.granted: set[str] = set()  # lease ids the broker granted anyone (that we saw)
        self.handed: set[str] = set()
        self.batches: set[int] = set()  # ids of the batches taken
        self.counts = Counter[str]()
        self.step = 0
        self.starved_since: int | None = None

    def violate(self, name: str, detail: str) -> None:
        self.violations[name] += 1
        if self.violations[name] <= 3:
            self.first.append(f"{name}: {detail}")

    def start(self) -> None:
        for key in HONEST:
            hello = P.Hello(role=HONEST[key], peer_id=key, protocol_version=P.PROTOCOL_VERSION)
            if not isinstance(self.p[key].request(hello, (P.Welcome,)), P.Welcome):
                raise RuntimeError(f"honest {key} refused")
        self.publish()

    def publish(self) -> None:
        v = self.known.policy_version + 1
        self.p["learner"].send(P.PolicyPublished(version=v, weights_endpoint="tcp://127.0.0.1:1",
                                                 manifest=manifest(v)))  # fmt: skip
        self.known.policy_version = v

    def actor_round(self, late: bool) -> None:
        actor = self.p["actor-0"]
        grant = actor.request(P.TaskRequest(n=1), (P.TaskGrant,))
        if isinstance(grant, P.Error):
            return self.violate("honest_acked", f"TaskRequest answered {grant.reason}")
        assert isinstance(grant, P.TaskGrant)
        if not grant.leases:
            if late:
                self.violate("served", "no lease in the last quarter")
            return None
        for lease in grant.leases:
            self.granted.add(lease.lease_id)
            self.known.learn(self.known.lease_ids, lease.lease_id)
            self.known.learn(self.known.task_ids, lease.task.task_id)
            if lease.purpose != "train":
                continue
            group = [
                msgspec.structs.replace(t, sample_prob=lease.sample_prob)
                for t in valid_group(lease.lease_id, lease.task.task_id, lease.group_size,
                                     self.known.policy_version, "actor-0", self.rng)
            ]  # fmt: skip
            ack = actor.request(P.TrajectoryBatch(items=group), (P.Ack,))
            if not isinstance(ack, P.Ack) or ack.rejected or len(ack.traj_ids) != len(group):
                self.violate("honest_acked", f"group {lease.lease_id}: {ack}"[:300])
            else:
                self.counts["honest_acked"] += len(group)
                self.counts["honest_groups"] += 1
        return None

    def learner_slips(self, hostile: Hostile, n: int = 3) -> None:
        """The legitimate learner sends `n` of its own messages with implausible values, then
        a Status, and reads what comes back up to its answer (a batch handed out meanwhile
        is checked and acknowledged like any other)."""
        learner = self.p["learner"]
        for _ in range(n):
            msg = hostile.learner_message()
            learner.send(msg)
            self.counts[f"learner_slip:{type(msg).__name__}"] += 1
        learner.send(P.Status())
        while True:
            if not learner.sock.poll(15_000):
                raise TimeoutError("learner: no answer to Status")
            reply = P.decode(learner.sock.recv())
            if isinstance(reply, P.StatusReply):
                return
            if isinstance(reply, P.Batch):
                self.take(reply)
            elif isinstance(reply, P.Error):
                self.counts[f"learner_slip_refused:{reply.reason}"] += 1

    def learner_round(self) -> None:
        learner, k = self.p["learner"], self.known
        learner.send(
            P.Heartbeat(peer_id="learner", stats={"policy_version": float(k.policy_version)})
        )
        reply = learner.request(
            P.SampleRequest(batch_size=2 * GROUP, policy_version=k.policy_version),
            (P.Batch, P.NotReady),
        )
        if isinstance(reply, P.Error):
            return self.violate("fence", f"the learner's SampleRequest got {reply.reason}")
        if isinstance(reply, P.Batch):
            self.take(reply)
        return None

    def take(self, reply: P.Batch) -> None:
        """Check a batch handed to the learner, acknowledge it as trained, checkpoint. A
        batch offered again under its id (asked for again before it was acknowledged) is
        recognised, as the learner does, and not trained twice."""
        learner, k = self.p["learner"], self.known
        if reply.batch_id in self.batches:
            self.counts["batches_offered_again"] += 1
            return
        self.batches.add(reply.batch_id)
        self.counts["learner_batches"] += 1
        for t in reply.items:
            bad = self.invalid(t)
            if bad:
                self.violate("handed_valid", f"{t.traj_id[:60]}: {bad}")
            if t.traj_id in self.handed:
                self.violate("handed_valid", f"{t.traj_id[:60]} handed out twice")
            self.handed.add(t.traj_id)
        self.step += 1
        learner.send(P.BatchTrained(batch_id=reply.batch_id, step=self.step))
        k.learn(k.batch_ids, reply.batch_id)
        for sid in reply.sample_ids:
            k.learn(k.sample_ids, sid)
        if self.step % 5 == 0:
            learner.send(P.Checkpointed(step=self.step))

    def invalid(self, t: P.Trajectory) -> str | None:
        """What is wrong with a trajectory the broker handed out (the invariants, checked
        here with numpy, not with the broker's own validation)."""
        a = {name: t.array(name) for name in P.TOKEN_ARRAYS}
        n = len(a["token_ids"])
        if any(len(x) != n for x in a.values()) or not 0 < n <= MAX_TOKENS:
            return "array lengths"
        checks = {
            "token id": a["token_ids"].min() >= 0 and a["token_ids"].max() < VOCAB,
            "role": bool(np.isin(a["role"], [int(r) for r in P.Role]).all()),
            "loss mask": bool(np.isin(a["loss_mask"], [0, 1]).all()),
            "logprob": bool(np.isfinite(a["behav_logprob"]).all())
            and a["behav_logprob"].max() <= 1e-4,
            "version": a["policy_version"].min() >= 0
            and a["policy_version"].max() <= self.known.policy_version
            and not (np.diff(a["policy_version"]) < 0).any(),
            "reward": math.isfinite(t.outcome_reward)
            and all(math.isfinite(x.reward) for x in t.turns),
            "sample_prob": 0 < t.sample_prob <= 1,
            "lease": t.group_id == t.lease_id and t.lease_id in self.granted,
        }
        return next((name for name, ok in checks.items() if not ok), None)

    def check_status(self) -> dict:
        info = self.p["cli"].request(P.Status(), (P.StatusReply,))
        if not isinstance(info, P.StatusReply):
            self.violate("alive", f"Status answered {info}")
            return {}
        s = info.info
        if s["policy_version"] != self.known.policy_version:
            self.violate("lineage", f"broker at {s['policy_version']}, learner at "
                                    f"{self.known.policy_version}")  # fmt: skip
        stale = dict(s["evicted"]).get("stale", 0)  # type: ignore[call-overload]
        if stale:
            self.violate("no_stale", f"{stale} evicted as stale")
        active = [x["key"] for x in s["learners"] if x["active"]]  # type: ignore[attr-defined]
        if active != ["learner"]:
            self.violate("fence", f"active learners by key: {active}")
        if not _finite(s["curriculum"]):
            self.violate("curator_finite", json.dumps(s["curriculum"])[:200])
        return s


def _finite(x: object) -> bool:
    if isinstance(x, float):
        return math.isfinite(x)
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, list):
        return all(_finite(v) for v in x)
    return True


def broker_config(tmp: Path) -> str:
    keys = tmp / "keys"
    generate_keys(keys, servers=["broker"], clients=[*HONEST, *HOSTILE])
    model = tmp / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": VOCAB}))
    return (
        f'[model]\npath = "{model}"\n[security]\ncurve = true\nkeys_dir = "{keys}"\n'
        f"[broker]\ngroup_size = {GROUP}\nmax_staleness = {STALENESS}\n"
        f"[actor]\nmax_model_len = {MAX_TOKENS}\n"
    )


def fuzz(broker: BrokerProcess, keys: Path, args: argparse.Namespace) -> dict:
    ctx = zmq.Context()
    roles = {**HONEST, **HOSTILE}
    peers = {key: Peer(ctx, broker.endpoint, keys, key, role) for key, role in roles.items()}
    known = Knowledge()
    run = Run(peers, known, args.seed)
    hostile = Hostile(args.seed, known)
    by_type, by_role, answers = Counter[str](), Counter[str](), Counter[str]()
    rss = [broker.rss_mb()]
    try:
        run.start()
        for key in HOSTILE:  # each says Hello as its key's role (the rival is refused)
            role = HOSTILE[key]
            peers[key].send(P.Hello(role=role, peer_id=key, protocol_version=P.PROTOCOL_VERSION))
        sent, rounds = 0, 0
        total_rounds = -(-args.messages // args.window)
        while sent < args.messages:
            for _ in range(min(args.window, args.messages - sent)):
                key = hostile.rng.choice(list(HOSTILE))
                msg = hostile.message(HOSTILE[key], key, peers[key].leases)
                if not peers[key].send(msg):
                    answers["unsent: no connection"] += 1
                by_type[type(msg).__name__] += 1
                by_role[HOSTILE[key]] += 1
                sent += 1
            rounds += 1
            run.actor_round(late=rounds > 0.75 * total_rounds)
            run.learner_round()
            run.learner_slips(hostile)
            for key in HOSTILE:
                peers[key].drain(answers, known, run.granted)
            if rounds % 10 == 0:
                run.check_status()
                rss.append(broker.rss_mb())
            publish_every = max(1, total_rounds // STALENESS)
            if rounds % publish_every == 0 and known.policy_version < STALENESS:
                run.publish()
        run.check_status()
    except TimeoutError as e:
        run.violate("alive", str(e))
    finally:
        rss.append(broker.rss_mb())
        ctx.destroy(linger=0)
    if max(rss) > args.bound_mb:
        run.violate("rss", f"broker RSS {max(rss):.0f} MiB > {args.bound_mb}")
    return {
        "messages": sum(by_type.values()),
        "by_type": dict(sorted(by_type.items())),
        "by_role": dict(sorted(by_role.items())),
        "answers": dict(answers.most_common()),
        "honest_acked": run.counts["honest_acked"],
        "honest_groups": run.counts["honest_groups"],
        "learner_batches": run.counts["learner_batches"],
        "handed_out": len(run.handed),
        "batches_offered_again": run.counts["batches_offered_again"],
        "learner_slips": {
            k.split(":", 1)[1]: n
            for k, n in sorted(run.counts.items())
            if k.startswith("learner_slip:")
        },
        "learner_slips_refused": {
            k.split(":", 1)[1]: n
            for k, n in sorted(run.counts.items())
            if k.startswith("learner_slip_refused:")
        },
        "policy_version": known.policy_version,
        "violations": dict(run.violations),
        "first_violations": run.first,
        "rss_mb": {"start": round(rss[0], 1), "max": round(max(rss), 1)},
    }


def run_meaning(messages: int, seed: int = 0, window: int = 200, bound_mb: int = 512) -> dict:
    """The whole benchmark; what `main` prints last (also used by benchmarks/fuzz.py)."""
    args = argparse.Namespace(messages=messages, seed=seed, window=window, bound_mb=bound_mb)
    with tempfile.TemporaryDirectory(prefix="headrace-fuzz-meaning-") as tmp:
        t0 = time.perf_counter()
        broker = BrokerProcess(Path(tmp), broker_config(Path(tmp)))
        try:
            result = fuzz(broker, Path(tmp) / "keys", args)
            if broker.proc.poll() is not None:
                result["violations"]["alive"] = result["violations"].get("alive", 0) + 1
        finally:
            code = broker.stop()
    result["broker_exit"] = code
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["ok"] = not result["violations"] and code in (0, -15) and result["honest_acked"] > 0
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window", type=int, default=200, help="hostile messages per honest round")
    ap.add_argument("--bound-mb", type=int, default=512, help="broker RSS bound")
    args = ap.parse_args(argv)
    result = run_meaning(args.messages, args.seed, args.window, args.bound_mb)
    print(f"{'hostile message':<20}{'sent':>10}")
    for name, n in result["by_type"].items():
        print(f"{name:<20}{n:>10}")
    print(f"answers: {result['answers']}")
    print(f"violations: {result['violations'] or 'none'}")
    for line in result["first_violations"]:
        print(f"  {line}")
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
