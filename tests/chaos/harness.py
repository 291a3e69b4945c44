"""The chaos driver shared by `tests/chaos/test_chaos.py` and `benchmarks/chaos.py`.

A whole run on loopback - a durable broker on a data dir, a learner with checkpoints and a
summary file, actors (real vLLM ones and/or `tests.synthetic_actor`s) - while the driver
SIGKILLs roles (the process group: a vLLM actor's engine dies with it) and starts each again
with the same arguments. A monitor thread scrapes the learner's summary and every actor's
`headrace_actor_policy_version` meanwhile. At the end the store is opened read-only and
compared with what the actors were acked. Retention runs (`RETENTION`: it deletes rows,
closed ones first, and compacts the store afterwards, which is one of the aimed windows), so
each delete leaves tombstones in the store (its traj_ids, committed with the delete) and the
monitor snapshots the store's rows every second: a row gone at the end is deleted by retention
(`deleted_by_retention`) if a tombstone names it, and judged by its last snapshotted state
where a snapshot saw it (a row can be acked and deleted between two).


- `lost`: acked to a stub actor (its own record of acked ids) but neither in the store nor
  named by a tombstone; for real
  actors, whose acks are only counted, `real_acked_over_stored` counts actors whose acked
  total (summed over incarnations, last scrape of each) exceeds their rows in the store;
- `trained_twice`: trajectories that appear more than once in the learner's trained log
  (`trained.jsonl`: what each step of the final weights' lineage trained, see
  learner/trained_log.py); `sampled_over_cap`: rows handed out more often than
  `max_times_sampled`;
- `never_trained_unexplained`: stored rows handed to the learner that are neither in the
  trained log, nor evicted with a reason, nor in a batch the broker still keeps for the
  learner (rows never handed out are `unconsumed`: the run ended first);
- `version_regressions`: a learner summary whose policy versions do not strictly increase with
  the step, an actor incarnation whose engine's policy version went down between scrapes, or
  the broker refusing an older policy ("ignoring policy v...").
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from broker.batches import BatchRecord
from learner.trained_log import NAME
from learner.trained_log import read as read_trained_log
from shared.crashpoints import POINTS
from tests.chaos.accounting import (
    ROW_COLS,
    ChaosResult,
    orphan_engines,
    refused_policies,
    tally,
)
from tests.helpers import Proc, free_port, metric, wait_for, write_config

REPO = Path(__file__).resolve().parents[2]
ROLES = ("broker", "learner", "actor")
# The stand-in actors' trajectories: short, one turn, one lease a request, few in flight
STUB_SHAPE = ("--n-tokens", "48", "--n-turns", "1", "--leases", "1", "--max-outbox", "32")
# Retention on, tight enough to delete (and compact) throughout a run, loose enough that a
# row lives for many snapshots before it can go: closed rows are deleted first, oldest first.
RETENTION = {"max_trajectories": 600, "interval_s": 2.0}


@dataclass
class Role:
    name: str
    kind: str  # broker | learner | actor | stub
    argv: list[str]
    metrics_port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    proc: Proc | None = None
    incarnation: int = 0


class Chaos:
    def __init__(
        self,
        workdir: Path,
        model: Path,
        *,
        steps: int,
        real_actors: int = 1,
        stub_actors: int = 2,
        seed: int = 0,
        checkpoint_every: int = 3,
        stub_delay_s: float = 0.3,
        aimed: float | dict[str, float] = 0.0,
    ) -> None:
        """`aimed`: the broker also SIGKILLs itself at each crash point of
        `shared.crashpoints` with this probability per pass (restarted at once, counted as
        `broker_aimed` kills); a dict gives each point its own probability (those it names:
        `{"store.compact": 0.5}` aims at a window that is reached far less often)."""
        self.dir = workdir
        self.steps = steps
        self.rng = random.Random(seed)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.summary = self.dir / "summary.json"
        self.data_dir = self.dir / "broker"
        self.config = write_config(
            self.dir / "run.toml",
            model,
            broker={
                "port": self.port,
                "metrics_port": 0,
                "lease_deadline_s": 20.0,
                "heartbeat_timeout_s": 5.0,
            },
            **{"broker.retention": RETENTION},
            actor={"max_concurrent_episodes": 8, "connect_timeout_s": 60.0},
            learner={
                "steps": steps,
                "weights_port": free_port(),
                "checkpoint_every": checkpoint_every,
                "connect_timeout_s": 60.0,
                "lr": 1e-3,
            },
        )
        self.env = {
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
            ),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        cfg = ["--config", str(self.config)]
        self.roles: dict[str, Role] = {}
        odds = aimed if isinstance(aimed, dict) else {p: aimed for p in POINTS if aimed}
        self.aimed = any(odds.values())
        crashpoints = ",".join(f"{p}:{q}" for p, q in odds.items() if q)
        self.roles["broker"] = Role(
            "broker",
            "broker",
            ["broker", *cfg, "--data-dir", str(self.data_dir)],
            free_port(),
            env={
                "HEADRACE_CRASHPOINTS": crashpoints,
                "HEADRACE_CRASHPOINTS_SEED": str(seed),
                "HEADRACE_CRASHPOINTS_LOG": str(self.dir / "crashpoints.log"),
            },
        )
        self.roles["learner"] = Role(
            "learner",
            "learner",
            [
                "learner",
                *cfg,
                "--broker",
                self.endpoint,
                "--checkpoint-dir",
                str(self.dir / "ckpt"),
                "--summary-json",
                str(self.summary),
                "--no-progress",
                "--torch-threads",
                "1",
            ],
            free_port(),
        )
        for i in range(real_actors):
            name = f"actor{i}"
            argv = ["actor", *cfg, "--broker", self.endpoint, "--actor-id", name]
            self.roles[name] = Role(name, "actor", argv, free_port())
        for i in range(stub_actors):
            name = f"stub{i}"
            argv = ["tests.synthetic_actor", "--broker", self.endpoint, "--peer-id", name]
            argv += ["--acked", str(self.acked_file(name)), "--group-delay-s", str(stub_delay_s)]
            argv += [*STUB_SHAPE]
            self.roles[name] = Role(name, "stub", argv)
        self.kills: Counter[str] = Counter()
        self.real_acked: dict[tuple[str, int], float] = {}  # (actor, incarnation) -> acked
        self.regressions: list[str] = []
        self._versions: dict[tuple[str, int], float] = {}
        self._stop_monitor = threading.Event()
        self._lock = threading.Lock()
        self._monitor = threading.Thread(target=self._watch, daemon=True)
        self.t0 = time.monotonic()
        self.sessions: set[int] = set()  # one per role started (Proc: start_new_session)
        self.seen: dict[str, tuple] = {}  # traj_id -> its row when last snapshotted
        self.snapshot_errors = 0

    # ------------------------------------------------------------ processes

    def acked_file(self, name: str) -> Path:
        return self.dir / f"acked-{name}.txt"

    def start(self, name: str) -> None:
        role = self.roles[name]
        role.incarnation += 1
        argv = list(role.argv)
        if role.metrics_port:
            argv += ["--metrics-port", str(role.metrics_port)]
        if role.kind == "broker":
            argv += ["--port", str(self.port)]
        role.proc = Proc(name, argv, self.dir, env={**self.env, **role.env})
        self.sessions.add(role.proc.p.pid)

    def kill(self, name: str) -> None:
        role = self.roles[name]
        assert role.proc is not None
        if role.kind == "actor":
            self._scrape_actor(role)  # its last acked count before it dies
        with self._lock:
            role.proc.kill9()
            self.kills["actor" if role.kind in ("actor", "stub") else role.kind] += 1

    def restart(self, name: str) -> None:
        with self._lock:
            self.start(name)

    def alive(self, name: str) -> bool:
        proc = self.roles[name].proc
        return proc is not None and proc.alive()

    def logs(self, n: int = 25) -> str:
        return "\n".join(
            f"--- {r.name}\n{r.proc.tail(n)}" for r in self.roles.values() if r.proc is not None
        )

    def close(self) -> None:
        self._stop_monitor.set()
        for role in self.roles.values():
            if role.proc is not None:
                role.proc.kill9()

    # ------------------------------------------------------------ observations

    def steps_done(self) -> int:
        try:
            steps = json.loads(self.summary.read_text()).get("steps", [])
        except (OSError, ValueError):
            return 0
        return max((int(s["step"]) for s in steps), default=0)

    def acked_ids(self) -> set[str]:
        out: set[str] = set()
        for r in self.roles.values():
            f = self.acked_file(r.name)
            if r.kind == "stub" and f.exists():
                out.update(line for line in f.read_text().splitlines() if line)
        return out

    def _scrape_actor(self, role: Role) -> None:
        key = (role.name, role.incarnation)
        try:
            acked = metric(role.metrics_port, "headrace_actor_trajectories_acked_total")
            version = metric(role.metrics_port, "headrace_actor_policy_version")
        except OSError:
            return  # not serving yet (or gone)
        with self._lock:  # the monitor thread and the driver both scrape
            self.real_acked[key] = max(self.real_acked.get(key, 0.0), acked)
            last = self._versions.get(key)
            if last is not None and version < last:
                self.regressions.append(
                    f"{role.name}#{role.incarnation}: v{last:.0f} -> v{version:.0f}"
                )
            self._versions[key] = max(version, last or 0.0)

    def _check_summary(self) -> None:
        try:
            steps = json.loads(self.summary.read_text()).get("steps", [])
        except (OSError, ValueError):
            return
        versions = [int(s["policy_version"]) for s in sorted(steps, key=lambda s: s["step"])]
        for a, b in zip(versions, versions[1:], strict=False):
            if b <= a:
                msg = f"learner summary: v{a} then v{b}"
                if msg not in self.regressions:
                    self.regressions.append(msg)

    def _rows(self) -> list[tuple]:
        """The store's rows now (`ROW_COLS`), read-only; [] while there is no store (or it
        cannot be read: counted, as rows deleted meanwhile are known from tombstones alone)."""
        uri = f"file:{self.data_dir / 'broker.db'}?mode=ro"
        try:
            with sqlite3.connect(uri, uri=True, timeout=5) as conn:
                return conn.execute(f"SELECT {ROW_COLS} FROM trajectories").fetchall()
        except sqlite3.Error:
            self.snapshot_errors += 1
            return []

    def _snapshot(self) -> None:
        rows = self._rows()
        with self._lock:
            self.seen.update((r[0], r) for r in rows)

    def _watch(self) -> None:
        tick = 0
        while not self._stop_monitor.wait(0.5):
            tick += 1
            if tick % 2 == 0:
                self._snapshot()
            self._check_summary()
            if self.aimed:
                with self._lock:  # a broker that killed itself at a crash point: again
                    if self.roles["broker"].proc is not None and not self.alive("broker"):
                        self.kills["broker_aimed"] += 1
                        self.start("broker")
            for role in list(self.roles.values()):
                if role.kind == "actor" and role.proc is not None and role.proc.alive():
                    self._scrape_actor(role)

    # ------------------------------------------------------------ the run

    def run(self, kills: dict[str, int], between_s: float = 0.0) -> ChaosResult:
        """Start everything, kill per `kills` ({role: n}) in a random order, finish the run.

        Real vLLM actors come first, on the broker alone: each must be acked, be killed (one
        actor kill each, while `kills` has some), start again and be acked again before the
        learner and the stubs start - an engine takes up to minutes to start on a loaded CPU,
        and with the learner running the stubs would finish the run meanwhile. Then the learner
        and the stubs start, the remaining kills (broker, learner, stub actors) come in a
        seeded random order, and every real actor must have loaded a policy from the learner.
        """
        self._monitor.start()
        self.start("broker")
        reals = [r.name for r in self.roles.values() if r.kind == "actor"]
        stubs = [r.name for r in self.roles.values() if r.kind == "stub"]
        for name in reals:
            self.start(name)
        actor_kills = kills.get("actor", 0)
        for name in reals:
            self._real_acked(name, 4, 360)
            if actor_kills:
                actor_kills -= 1
                self.kill(name)
                self.start(name)
                self._real_acked(name, 4, 360)
        self.start("learner")
        for name in stubs:
            self.start(name)
        self._progress(1, 240, "the first learner step")
        schedule = [role for role, n in kills.items() if role != "actor" for _ in range(n)]
        schedule += ["actor"] * actor_kills
        self.rng.shuffle(schedule)
        for what in schedule:
            name = self.rng.choice(stubs or reals) if what == "actor" else what
            if self.steps_done() >= self.steps:
                break  # the run ended before the schedule did
            if between_s:
                time.sleep(self.rng.uniform(0, between_s))
            if name == "learner" and not self.alive("learner"):
                break
            self.kill(name)
            self.restart(name)
            # the run goes on after every kill: the learner trains at least one more step
            self._progress(self.steps_done() + 1, 240, f"a learner step after killing {name}")
        # Checked after the schedule: an engine can take minutes to load its first policy on a
        # loaded CPU, and waiting for it first let the learner run out of steps before the kills.
        for name in reals:
            self._wait(
                lambda n=name: self._version(n) >= 1, 240, f"{name} to load a learner policy"
            )
        self._progress(self.steps, 600, f"the learner to reach step {self.steps}")
        learner = self.roles["learner"].proc
        assert learner is not None
        learner_exit = learner.p.wait(120)
        return self._finish(learner_exit)

    def _real_acked(self, name: str, n: int, timeout: float) -> None:
        role = self.roles[name]

        def acked() -> bool:
            self._scrape_actor(role)
            return self.real_acked.get((name, role.incarnation), 0.0) >= n

        self._wait(acked, timeout, f"{name} (start {role.incarnation}) to be acked {n} times")

    def _version(self, name: str) -> float:
        role = self.roles[name]
        return self._versions.get((name, role.incarnation), 0.0)

    def _wait(self, cond: Callable[[], object], timeout: float, what: str) -> None:
        try:
            wait_for(cond, timeout, what, interval=0.5)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.logs()}") from None

    def _progress(self, step: int, timeout: float, what: str) -> None:
        def ok() -> bool:
            learner = self.roles["learner"].proc
            if learner is not None and not learner.alive() and learner.p.returncode != 0:
                raise AssertionError(f"learner exited {learner.p.returncode}\n{self.logs()}")
            return self.steps_done() >= min(step, self.steps)

        self._wait(ok, timeout, what)

    def _finish(self, learner_exit: int | None) -> ChaosResult:
        stub_exits: list[int | None] = []
        for role in self.roles.values():
            if role.kind == "actor":
                self._scrape_actor(role)
                assert role.proc is not None
                role.proc.kill9()  # its unacked trajectories are simply never acked
        for role in self.roles.values():
            if role.kind == "stub" and role.proc is not None:
                role.proc.p.send_signal(signal.SIGTERM)  # stop, drain the outbox, exit 0
        for role in self.roles.values():
            if role.kind == "stub" and role.proc is not None:
                try:
                    stub_exits.append(role.proc.p.wait(60))
                except Exception:
                    stub_exits.append(None)
        with self._lock:
            self.aimed = False  # no more restarts: the run is over
        broker = self.roles["broker"].proc
        assert broker is not None
        broker.stop(timeout=30)
        self._stop_monitor.set()
        self._monitor.join(5)
        self._check_summary()
        self.regressions += refused_policies(self.dir / "broker.log")

        max_ts = 1  # write_config keeps the broker's default
        uri = f"file:{self.data_dir / 'broker.db'}?mode=ro"
        with sqlite3.connect(uri, uri=True) as conn:
            final = conn.execute(f"SELECT {ROW_COLS} FROM trajectories").fetchall()
            kept = {
                seq
                for (value,) in conn.execute("SELECT value FROM kv WHERE key LIKE 'batch/%'")
                for seq in msgspec.msgpack.decode(value, type=BatchRecord).seqs
            }
            # what retention deleted (broker/store/maintenance.py), committed with each delete
            audited = {t for (t,) in conn.execute("SELECT traj_id FROM tombstones")}
        trained = Counter(
            t for e in read_trained_log(self.dir / "ckpt" / NAME) for t in e["traj_ids"]
        )
        log = self.dir / "crashpoints.log"
        real_total: Counter[str] = Counter()
        for (name, _), n in self.real_acked.items():
            real_total[name] += int(n)
        return ChaosResult(
            kills={r: self.kills.get(r, 0) for r in ROLES},
            aimed_kills=self.kills.get("broker_aimed", 0),
            aimed_by_point=dict(Counter(log.read_text().split()) if log.exists() else {}),
            steps_reached=self.steps_done(),
            orphans=len(orphan_engines(self.sessions)),
            version_regressions=len(self.regressions),
            seconds=round(time.monotonic() - self.t0, 1),
            snapshot_errors=self.snapshot_errors,
            learner_exit=learner_exit,
            stub_exits=stub_exits,
            max_times_sampled=max_ts,
            regressions=self.regressions,
            **tally(final, self.seen, kept, trained, self.acked_ids(), real_total, max_ts, audited),
        )
