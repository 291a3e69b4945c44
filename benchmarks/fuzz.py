"""Frame fuzzing of a real broker: random and mutated frames, at scale.

Starts `python -m broker` (durability "none", a 64 KiB frame cap so oversize frames stay
cheap), then streams N frames through one DEALER: random bytes; valid frames of every message
type with bytes flipped, truncated or extended; fields of the wrong type, unknown tags,
missing fields; huge msgpack length prefixes; deep nesting; frames just over the protocol
cap; multipart garbage. Each frame is first decoded here exactly as the broker's `Server`
decodes it; frames that still decode (a flipped byte inside a string, say) are not bad, and
are set aside. Every bad frame must come back as one `Error` carrying the same reason, and the
broker's `headrace_rejected_frames_total` must grow by exactly the frames sent; a `Status`
every 50,000 frames must still be answered. Then the valid mutants set aside (up to 50,000)
go to the broker's handlers, which must survive them too (their replies are only tallied:
a mutated TaskRequest earns a TaskGrant). A crash is the broker exiting or going silent.

Prints a table, then as its last line one JSON object: `frames` (bad frames sent),
`crashes`, `rejected_by_reason` (the broker's counter deltas while they were sent),
`seconds`, `frames_per_s`, `answered_errors`, `reason_mismatches`, `by_family`, and
`valid_mutants` (sent to the handlers) with `valid_mutant_replies` (by reply type), and
`meaning`: then `--meaning N` well-formed messages with hostile values from peers of every
role go to a second broker, under CurveZMQ, while an honest actor and learner work through
it, and the broker's invariants are checked (benchmarks/fuzz_meaning.py; its JSON object).

    python benchmarks/fuzz.py [--frames 1000000] [--meaning 100000] [--seed 0] [--window 512]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import msgspec  # noqa: E402
import zmq  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from benchmarks.fuzz_meaning import run_meaning  # noqa: E402
from benchmarks.harness import BrokerProcess  # noqa: E402
from shared import protocol as P  # noqa: E402

CAP = 64 * 1024  # the broker's max_frame_bytes in this benchmark
STATUS_EVERY = 50_000
MAX_VALID_MUTANTS = 50_000
REJECTED = "headrace_rejected_frames"

Frame = bytes | list[bytes]  # a list: one multipart message


# ---------------------------------------------------------------- valid frames to mutate


def sample_messages() -> list[P.Base]:
    """One well-formed instance of every message type (the fuzz seeds)."""
    traj = P.Trajectory(
        traj_id="t-0",
        group_id="g",
        task_id="symbols-L1-0",
        env="symbols",
        actor_id="a",
        lease_id="l",
        token_ids=P.pack([1, 2, 3], "token_ids"),
        role=P.pack([0, 3, 3], "role"),
        loss_mask=P.pack([0, 1, 1], "loss_mask"),
        behav_logprob=P.pack([-0.5] * 3, "behav_logprob"),
        policy_version=P.pack([0] * 3, "policy_version"),
        turn_idx=P.pack([0] * 3, "turn_idx"),
        turns=[P.TurnInfo(reward=1.0, done=True, truncated=False, action_valid=True)],
        outcome_reward=1.0,
        success=True,
        termination=P.Termination.DONE,
        n_turns=1,
    )
    manifest = P.WeightManifest(
        version=1,
        total_bytes=8,
        chunk_bytes=4,
        chunk_digests=["0" * 32, "1" * 32],
        tensors=[P.TensorInfo(name="w", dtype="float32", shape=[2])],
        digest="2" * 32,
    )
    task = P.TaskSpec(task_id="symbols-L1-0", env="symbols", payload={"level": 1})
    lease = P.Lease(lease_id="l", task=task, group_size=2, deadline_s=60.0)
    return [
        P.Hello(role="actor", peer_id="a", protocol_version=P.PROTOCOL_VERSION),
        P.Welcome(run_id="r", policy_version=1, weights_endpoint="", config_digest="d"),
        P.Error(reason="x", detail="y"),
        P.Heartbeat(peer_id="a", stats={"episodes": 1.0}),
        P.TaskRequest(n=1),
        P.TaskGrant(leases=[lease]),
        P.TrajectoryBatch(items=[traj]),
        P.Ack(traj_ids=["t-0"]),
        P.SampleRequest(batch_size=2),
        P.Batch(items=[traj], sample_ids=[1], is_weights=[1.0], batch_id=1),
        P.BatchTrained(batch_id=1, step=1),
        P.Checkpointed(step=1),
        P.NotReady(replay_size=0, retry_after_s=0.1),
        P.PriorityUpdate(sample_ids=[1], priorities=[0.5]),
        P.TaskFeedback(task_id="symbols-L1-0", pass_rate=0.5),
        P.PolicyPublished(version=1, weights_endpoint="tcp://h:1", manifest=manifest),
        P.WeightRequest(version=1, chunk=0),
        P.WeightChunk(version=1, chunk=0, data=memoryview(b"abcd")),
        P.EvalRequest(version=1, tasks=2, samples=2),
        P.EvalReport(version=1, state="done", done_tasks=1, total_tasks=1, scores={"n": 1}),
        P.EvalOutcome(
            lease_id="l", task_id="t", rewards=[1.0], successes=[True], policy_versions=[1]
        ),
        P.Status(),
        P.StatusReply(info={"k": 1}),
    ]


# A value of each msgpack kind; any field gets one of the kinds it does not accept.
WRONG_VALUES: list[object] = [
    None,
    True,
    -1,
    2**64 - 1,
    1.5,
    "s",
    b"\xff",
    [],
    [1, "x"],
    {},
    {"k": 0},
]
# msgpack headers announcing 4 GiB (or 2**32 elements) that never follow: a decoder that
# trusts them would allocate before noticing.
HUGE_HEADERS = [
    b"\xdb\xff\xff\xff\xff",  # str32
    b"\xc6\xff\xff\xff\xff",  # bin32
    b"\xdd\xff\xff\xff\xff",  # array32
    b"\xdf\xff\xff\xff\xff",  # map32
    b"\xc9\xff\xff\xff\xff\x01",  # ext32
    b"\xda\xff\xff",  # str16
    b"\xde\xff\xff",  # map16
]


# ---------------------------------------------------------------- classification


class Classifier:
    """Decides what a server with `decoder` and `max_bytes` does with a frame, as it would."""

    def __init__(self, accepts: object = P.BrokerInbound, max_bytes: int = CAP) -> None:
        self.decoder = P.decoder_for(accepts)
        self.max_bytes = max_bytes

    def reason(self, frame: Frame) -> str | None:
        """The rejection reason the server must answer, or None when the frame is valid."""
        if isinstance(frame, list):
            return "multipart"
        try:
            P.decode(frame, self.max_bytes, self.decoder)
        except P.ProtocolError as e:
            return e.reason
        return None


# ---------------------------------------------------------------- random frames


class RandomFrames:
    """Seeded stream of (family, frame) pairs: the mutations the module docstring lists."""

    def __init__(self, seed: int = 0, cap: int = CAP) -> None:
        self.rng = random.Random(seed)
        self.cap = cap
        self.valid = [P.encode(m) for m in sample_messages()]
        self.builtins = [msgspec.to_builtins(m) for m in sample_messages()]
        self.families: dict[str, Callable[[], Frame]] = {
            "random_bytes": self.random_bytes,
            "flipped": self.flipped,
            "truncated": self.truncated,
            "extended": self.extended,
            "wrong_type": self.wrong_type,
            "unknown_tag": self.unknown_tag,
            "missing_field": self.missing_field,
            "huge_length": self.huge_length,
            "deep_nesting": self.deep_nesting,
            "oversize": self.oversize,
            "multipart": self.multipart,
        }
        self.names = list(self.families)
        # Oversize frames cost cap bytes each: keep them rare so the rate measures parsing.
        weights = [0.1 if n == "oversize" else 1.0 for n in self.names]
        self.cum_weights = [sum(weights[: i + 1]) for i in range(len(weights))]

    def _bytes(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def random_bytes(self) -> bytes:
        return self._bytes(self.rng.randrange(0, 256))

    def flipped(self) -> bytes:
        frame = bytearray(self.rng.choice(self.valid))
        for _ in range(self.rng.randint(1, 4)):
            frame[self.rng.randrange(len(frame))] ^= self.rng.randint(1, 255)
        return bytes(frame)

    def truncated(self) -> Frame:
        frame = self.rng.choice(self.valid)
        return frame[: self.rng.randrange(len(frame))]

    def extended(self) -> Frame:
        return self.rng.choice(self.valid) + self._bytes(self.rng.randint(1, 32))

    def _field_edit(self, edit: Callable[[dict, str], None]) -> Frame:
        msg = dict(self.rng.choice(self.builtins))
        fields = [k for k in msg if k != "type"]
        if not fields:  # Status has none: give it one it does not have
            msg["bogus"] = 1
        else:
            edit(msg, self.rng.choice(fields))
        return msgspec.msgpack.encode(msg)

    def wrong_type(self) -> Frame:
        def edit(msg: dict, field: str) -> None:
            kinds = [v for v in WRONG_VALUES if type(v) is not type(msg[field])]
            msg[field] = self.rng.choice(kinds)

        return self._field_edit(edit)

    def missing_field(self) -> Frame:
        return self._field_edit(lambda msg, field: msg.pop(field))

    def unknown_tag(self) -> Frame:
        msg = dict(self.rng.choice(self.builtins))
        msg["type"] = self.rng.choice(["", "Hell0", "Trajectory", "__class__", 7, None])
        return msgspec.msgpack.encode(msg)

    def huge_length(self) -> Frame:
        frame = self.rng.choice(self.valid)
        at = self.rng.randrange(len(frame))
        tail = self._bytes(self.rng.randint(0, 16))
        return frame[:at] + self.rng.choice(HUGE_HEADERS) + tail

    def deep_nesting(self) -> Frame:
        depth = self.rng.choice([100, 1_000, 10_000])
        return self.rng.choice([b"\x91", b"\x81\xa1k"]) * depth + b"\xc0"

    def oversize(self) -> Frame:
        return self.rng.choice(self.valid) + bytes(self.cap)  # over the cap, under 2x

    def multipart(self) -> Frame:
        parts = self.rng.randint(2, 4)
        makers: list[Callable[[], bytes]] = [self.random_bytes, self.flipped]
        return [self.rng.choice(makers)() for _ in range(parts)]

    def __iter__(self) -> Iterator[tuple[str, Frame]]:
        while True:
            name = self.rng.choices(self.names, cum_weights=self.cum_weights)[0]
            yield name, self.families[name]()


# ---------------------------------------------------------------- the broker under test


def rejected_by_reason(metrics_port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text.decode()):
        if fam.name == REJECTED:
            for s in fam.samples:
                if s.name.endswith("_total") and s.value:
                    out[s.labels["reason"]] = s.value
    return out


# ---------------------------------------------------------------- the run


def alive(sock: zmq.Socket, timeout_ms: int = 5000, seen: Counter[str] | None = None) -> bool:
    """Status answered within the timeout; replies queued before it are tallied in `seen`."""
    sock.send(P.encode(P.Status()))
    deadline = time.monotonic() + timeout_ms / 1000
    while (left := deadline - time.monotonic()) > 0:
        if not sock.poll(int(left * 1000)):
            return False
        msg = P.decode(sock.recv())
        if isinstance(msg, P.StatusReply):
            return True
        if seen is not None:
            seen[f"Error:{msg.reason}" if isinstance(msg, P.Error) else type(msg).__name__] += 1
    return False


def fuzz(endpoint: str, frames: int, seed: int, window: int) -> dict:
    """Send `frames` bad frames in windows; check each answer. Returns the counts."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    classify = Classifier()
    by_family: Counter[str] = Counter()
    expected: Counter[str] = Counter()
    answered: Counter[str] = Counter()
    stats = {"sent": 0, "mismatches": 0, "missing": 0, "crashes": 0}
    valid: list[bytes] = []
    source = iter(RandomFrames(seed))
    next_status = STATUS_EVERY
    while stats["sent"] < frames and not stats["crashes"]:
        reasons: list[str] = []
        while len(reasons) < min(window, frames - stats["sent"]):
            family, frame = next(source)
            reason = classify.reason(frame)
            if reason is None:
                if len(valid) < MAX_VALID_MUTANTS and isinstance(frame, bytes):
                    valid.append(frame)  # (a multipart frame is never valid)
                continue
            if isinstance(frame, list):
                sock.send_multipart(frame)
            else:
                sock.send(frame)
            reasons.append(reason)
            by_family[family] += 1
            expected[reason] += 1
        for want in reasons:  # the ROUTER answers in order, one Error per bad frame
            if not sock.poll(10_000):
                stats["missing"] += len(reasons)
                stats["crashes"] += 1
                break
            reply = P.decode(sock.recv())
            got = reply.reason if isinstance(reply, P.Error) else type(reply).__name__
            answered[got] += 1
            stats["mismatches"] += got != want
        stats["sent"] += len(reasons)
        if stats["sent"] >= next_status:
            next_status += STATUS_EVERY
            if not alive(sock):
                stats["crashes"] += 1
    if not stats["crashes"] and not alive(sock):
        stats["crashes"] += 1
    ctx.destroy(linger=0)
    return {
        "stats": stats,
        "by_family": by_family,
        "expected": expected,
        "answered": answered,
        "valid": valid,
    }


def handlers(endpoint: str, frames: list[bytes], window: int) -> tuple[Counter[str], int]:
    """Send valid mutants to the broker's handlers; tally the replies. Returns (replies,
    crashes). Some get no reply (a Heartbeat) and some several, so only liveness counts."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    replies: Counter[str] = Counter()
    crashes = 0
    for i in range(0, len(frames), window):
        for frame in frames[i : i + window]:
            sock.send(frame)
        # A Status after each window paces the sender (the ROUTER drops replies past its HWM).
        if not alive(sock, 30_000, replies):
            crashes = 1
            break
    ctx.destroy(linger=0)
    return replies, crashes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window", type=int, default=512, help="frames in flight (< the HWMs)")
    ap.add_argument("--meaning", type=int, default=100_000, help="hostile messages (0: none)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="headrace-fuzz-") as tmp:
        broker = BrokerProcess(Path(tmp), f"[broker]\nmax_frame_bytes = {CAP}\n")
        try:
            before = rejected_by_reason(broker.metrics_port)
            t0 = time.perf_counter()
            result = fuzz(broker.endpoint, args.frames, args.seed, args.window)
            seconds = time.perf_counter() - t0
            crashed = broker.proc.poll() is not None
            after = {} if crashed else rejected_by_reason(broker.metrics_port)
            replies: Counter[str] = Counter()
            if not crashed and not result["stats"]["crashes"]:
                replies, crashed_after = handlers(broker.endpoint, result["valid"], args.window)
                crashed = crashed or bool(crashed_after) or broker.proc.poll() is not None
        finally:
            code = broker.stop()
    stats = result["stats"]
    crashes = stats["crashes"] + int(crashed) + int(code not in (0, -15))
    delta = {k: int(v - before.get(k, 0)) for k, v in sorted(after.items())}
    delta = {k: v for k, v in delta.items() if v}
    print(f"{'reason':<20}{'expected':>12}{'answered':>12}{'counted':>12}")
    for reason in sorted(set(result["expected"]) | set(delta) | set(result["answered"])):
        print(
            f"{reason:<20}{result['expected'][reason]:>12}{result['answered'][reason]:>12}"
            f"{delta.get(reason, 0):>12}"
        )
    print(
        f"{stats['sent']} bad frames in {seconds:.1f}s ({stats['sent'] / seconds:,.0f}/s), "
        f"{stats['mismatches']} reason mismatches; {len(result['valid'])} valid mutants to the "
        f"handlers: {dict(replies)}; {crashes} crashes; broker exit code {code}"
    )
    summary = {
        "frames": stats["sent"],
        "crashes": crashes,
        "rejected_by_reason": delta,
        "seconds": round(seconds, 2),
        "frames_per_s": round(stats["sent"] / seconds),
        "answered_errors": sum(result["answered"].values()),
        "reason_mismatches": stats["mismatches"],
        "by_family": dict(sorted(result["by_family"].items())),
        "valid_mutants": len(result["valid"]),
        "valid_mutant_replies": dict(sorted(replies.items())),
    }
    ok = not crashes and not stats["mismatches"] and sum(delta.values()) == stats["sent"]
    if args.meaning:
        meaning = run_meaning(args.meaning, args.seed)
        print(f"meaning: {args.meaning} hostile messages, violations {meaning['violations']}")
        summary["meaning"] = meaning
        ok = ok and meaning["ok"]
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
