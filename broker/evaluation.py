"""Evaluation rounds: the learner's held-out tasks played by the actors, scored, never stored.

The learner asks for a round with `EvalRequest(version, tasks, samples)` every `eval_every`
steps. The broker takes `tasks` held-out tasks per family from its bank (`TaskBank.heldout`:
tasks training never leases) and hands them out as leases with purpose "eval", ahead of
training leases, `samples` episodes each. The actor plays them like any other lease but sends
one `EvalOutcome` per lease (rewards and successes) instead of trajectories, so evaluation
episodes cannot enter replay, and a round costs no store writes.

Eval leases have a book of their own: one that expires (its actor went silent or restarted)
is handed out again for the same round, never as a training task. Rounds live in memory:
after a broker restart the learner's next EvalRequest for the round starts it again.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

from broker import metrics as M
from broker.curriculum.banks import TaskBank
from broker.leases import ActiveLease, LeaseBook
from shared import passk
from shared import protocol as P

log = logging.getLogger(__name__)

MAX_TASKS = 4096  # per round, all families: a round is a measurement, not a second run
KEEP_DONE = 64  # finished rounds remembered for the learner's polls


@dataclass(slots=True)
class Round:
    version: int
    samples: int
    tasks: dict[str, P.TaskSpec]  # task_id -> spec
    started: float
    results: dict[str, passk.TaskResult] = field(default_factory=dict)
    versions: list[int] = field(default_factory=list)  # policies that played its episodes
    seconds: float = 0.0  # when done: how long it took

    @property
    def done(self) -> bool:
        return len(self.results) == len(self.tasks)

    def report(self) -> P.EvalReport:
        state = "done" if self.done else "running"
        scores: dict[str, object] = {}
        if self.done:
            scores = passk.as_dict(*passk.score_by_family(list(self.results.values())))
            scores["policy_version_min"] = min(self.versions, default=self.version)
            scores["policy_version_max"] = max(self.versions, default=self.version)
        return P.EvalReport(
            version=self.version,
            state=state,
            done_tasks=len(self.results),
            total_tasks=len(self.tasks),
            seconds=self.seconds if self.done else time.monotonic() - self.started,
            scores=scores,
        )


class EvalRounds:
    def __init__(self, bank: TaskBank, book: LeaseBook) -> None:
        self.bank = bank
        # eval leases only, a book that does not requeue (requeue=False): an expired one's
        # task comes back here, with its round, never into training
        self.book = book
        self.rounds: dict[int, Round] = {}
        self.queue: deque[tuple[int, P.TaskSpec]] = deque()  # (round version, task) to grant
        self.lease_round: dict[str, int] = {}  # eval lease id -> its round's version

    def request(self, msg: P.EvalRequest) -> P.EvalReport:
        """Start the round if it is new; say how it stands."""
        rnd = self.rounds.get(msg.version)
        if rnd is None:
            rnd = self._start(msg)
        return rnd.report()

    def _start(self, msg: P.EvalRequest) -> Round:
        samples = max(1, msg.samples)
        per_family = self.bank.heldout(max(0, msg.tasks))
        tasks = {t.task_id: t for ts in per_family.values() for t in ts}
        if len(tasks) > MAX_TASKS:
            tasks = dict(list(tasks.items())[:MAX_TASKS])
        rnd = Round(msg.version, samples, tasks, started=time.monotonic())
        self.rounds[msg.version] = rnd
        self.queue.extend((msg.version, t) for t in tasks.values())
        while len(self.rounds) > KEEP_DONE:
            oldest = min(self.rounds)
            self.rounds.pop(oldest)
            self.queue = deque(q for q in self.queue if q[0] != oldest)
        M.EVAL_ROUNDS.labels(state="started").inc()
        log.info(
            "evaluation of policy v%d: %d held-out tasks x %d samples",
            msg.version,
            len(tasks),
            samples,
        )
        if not tasks:  # nothing held out: done at once, with n = 0
            self._finish(rnd)
        return rnd

    def grant(self, peer: bytes, n: int, holds: float | None = None) -> list[P.Lease]:
        """Up to `n` eval leases for `peer`, in the order the rounds queued their tasks.

        `holds`: the policy version the actor last reported (heartbeat stats; None: it has
        not said). A round of policy v goes only to actors that hold v or newer, so the
        round measures that policy, not the one before it; a lagging actor catches up within
        a weight sync and gets them then."""
        out: list[P.Lease] = []
        skipped: list[tuple[int, P.TaskSpec]] = []
        while self.queue and len(out) < n:
            version, task = self.queue.popleft()
            rnd = self.rounds.get(version)
            if rnd is None or task.task_id in rnd.results:
                continue
            if holds is not None and holds < version:
                skipped.append((version, task))
                continue
            active = self.book.grant(peer, task, rnd.samples)
            active.lease.purpose = "eval"
            # Every round has the same held-out tasks: the lease, not the task, names it.
            self.lease_round[active.lease_id] = version
            out.append(active.lease)
        self.queue.extendleft(reversed(skipped))
        if out:
            M.EVAL_LEASES.inc(len(out))
        return out

    def requeue(self, gone: list[ActiveLease]) -> None:
        """Leases the book expired or released (their actor went silent or restarted): their
        tasks go back to the front of the queue, for the same round."""
        for a in reversed(gone):
            version = self.lease_round.pop(a.lease_id, None)
            if version is not None:
                self.queue.appendleft((version, a.lease.task))

    def outcome(self, peer: bytes, msg: P.EvalOutcome) -> str | None:
        """Record a lease's scored episodes; why not (for a log line), or None."""
        held: ActiveLease | None = self.book.get(msg.lease_id)
        if held is None:
            return "an eval lease this broker does not hold (expired, or before a restart)"
        if held.peer != peer:
            return f"eval lease {msg.lease_id} is another actor's"
        task = held.lease.task
        n = len(msg.rewards)
        if msg.task_id != task.task_id or n != held.lease.group_size:
            return f"eval lease {msg.lease_id}: wrong task or {n} episodes"
        if len(msg.successes) != n or len(msg.policy_versions) != n:
            return f"eval lease {msg.lease_id}: rewards, successes and versions differ in length"
        if not all(math.isfinite(r) for r in msg.rewards):
            return f"eval lease {msg.lease_id}: a reward that is not a finite number"
        self.book.complete(msg.lease_id)
        rnd = self.rounds.get(self.lease_round.pop(msg.lease_id, -1))
        if rnd is None or task.task_id in rnd.results:
            return None  # a round forgotten, or a task scored twice (a re-grant raced)
        rnd.results[task.task_id] = passk.TaskResult(
            task.task_id, task.family or task.task_id, list(msg.rewards), list(msg.successes)
        )
        rnd.versions.extend(msg.policy_versions)
        M.EVAL_EPISODES.inc(n)
        if rnd.done:
            self._finish(rnd)
        return None

    def _finish(self, rnd: Round) -> None:
        rnd.seconds = time.monotonic() - rnd.started
        report = rnd.report()
        M.EVAL_ROUNDS.labels(state="done").inc()
        M.EVAL_POLICY_VERSION.set(rnd.version)
        families = report.scores.get("families", {})
        for family, s in {"all": report.scores, **families}.items():
            M.EVAL_PASS_AT_1.labels(family=family).set(float(s.get("pass_at_1", 0.0)))
            M.EVAL_PASS_AT_K.labels(family=family).set(float(s.get("pass_at_k", 0.0)))
            M.EVAL_MEAN_REWARD.labels(family=family).set(float(s.get("mean_reward", 0.0)))
        log.info(
            "evaluation of policy v%d done in %.0f s: pass@1 %.3f, pass@%d %.3f over %d tasks",
            rnd.version,
            rnd.seconds,
            float(report.scores.get("pass_at_1", 0.0)),
            int(report.scores.get("k", 0)),
            float(report.scores.get("pass_at_k", 0.0)),
            len(rnd.tasks),
        )

    def pending(self) -> int:
        return len(self.queue)

    def status(self) -> dict[str, object]:
        return {
            str(v): {"done": len(r.results), "tasks": len(r.tasks)}
            for v, r in sorted(self.rounds.items())
        }
