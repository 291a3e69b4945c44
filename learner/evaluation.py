"""The learner's side of periodic held-out evaluation (`[learner] eval_every`).

Every `eval_every` steps the learner asks the broker to evaluate the policy it last
published (`EvalRequest`); the broker has the actors play held-out tasks with it
(broker/evaluation.py) while training goes on. The learner asks again after each step how
the round stands (the same idempotent request, which also restarts a round a restarted
broker forgot) and, when it is done, records it: the summary's `evals` list, the tracker,
a log line. After the last step one more round evaluates the final policy, and the learner
waits for the rounds still running, up to `eval_timeout_s`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from shared import protocol as P
from shared.config import LearnerConfig
from shared.transport import Client, PeerUnreachable

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often the learner asks about the rounds still running after its last step


class Evaluations:
    def __init__(
        self,
        lc: LearnerConfig,
        client: Callable[[], Client | None],
        on_result: Callable[[dict[str, Any]], None],
    ) -> None:
        self.lc = lc
        self.client = client
        self.on_result = on_result  # the tracker and the summary hear of each finished round
        self.entries: list[dict[str, Any]] = []  # finished rounds, as in the summary
        self.pending: dict[int, int] = {}  # policy version -> the step that asked for it

    @property
    def enabled(self) -> bool:
        return self.lc.eval_every > 0

    def restore(self, entries: list[dict[str, Any]], step: int) -> None:
        """Rounds of a resumed run's summary, up to its checkpoint's step."""
        self.entries = [e for e in entries if int(e.get("step", 0)) <= step]

    async def after_step(self, step: int, published: int) -> None:
        """Ask for a round every `eval_every` steps; hear how the running ones stand."""
        if not self.enabled:
            return
        if step % self.lc.eval_every == 0:
            self._want(step, published)
        await self._poll()

    async def finish(self, step: int, published: int, stop: asyncio.Event) -> None:
        """Evaluate the final policy and wait (up to eval_timeout_s) for every round."""
        if not self.enabled:
            return
        self._want(step, published)
        deadline = time.monotonic() + self.lc.eval_timeout_s
        while self.pending and not stop.is_set() and time.monotonic() < deadline:
            await self._poll()
            if self.pending:
                await asyncio.sleep(POLL_S)
        for version, asked in sorted(self.pending.items()):
            log.warning(
                "evaluation of policy v%d (step %d) not finished after %.0f s; not recorded",
                version,
                asked,
                self.lc.eval_timeout_s,
            )

    def _want(self, step: int, published: int) -> None:
        done = {int(e["policy_version"]) for e in self.entries}
        if published >= 0 and published not in done and published not in self.pending:
            self.pending[published] = step

    async def _poll(self) -> None:
        client = self.client()
        if client is None:
            return
        for version, step in sorted(self.pending.items()):
            msg = P.EvalRequest(version, self.lc.eval_tasks, self.lc.eval_samples)
            try:
                report = await client.request(msg, P.EvalReport, timeout=5.0, retries=0)
            except (PeerUnreachable, P.ProtocolError, TimeoutError) as e:
                log.debug("evaluation of v%d: no answer (%s); asking again later", version, e)
                return
            if report.state != "done":
                continue
            del self.pending[version]
            entry = {"step": step, "policy_version": version, "seconds": report.seconds}
            entry.update(report.scores)
            self.entries.append(entry)
            log.info(
                "eval v%d (step %d): pass@1 %.3f, pass@%s %.3f, mean reward %.3f, %s tasks",
                version,
                step,
                float(entry.get("pass_at_1", 0.0)),
                entry.get("k", "k"),
                float(entry.get("pass_at_k", 0.0)),
                float(entry.get("mean_reward", 0.0)),
                entry.get("n", 0),
            )
            self.on_result(entry)


def eval_scalars(entry: dict[str, Any]) -> dict[str, float]:
    """A finished round as tracker scalars: `eval/pass_at_1`, `eval/pass_at_k`,
    `eval/mean_reward`, and `eval/<family>/...` for each family."""
    keys = ("pass_at_1", "pass_at_k", "mean_reward")
    out = {f"eval/{k}": float(entry[k]) for k in keys if k in entry}
    for family, scores in entry.get("families", {}).items():
        out.update({f"eval/{family}/{k}": float(scores[k]) for k in keys if k in scores})
    return out
