"""What the learner shows a person at its terminal: a progress bar and a closing summary.

The bar stays on the last line: while it is open, log records are written above it (tqdm's
logging redirect) instead of through it, and per-step chatter is at DEBUG. It shows the mean
reward and pass rate of the last `SMOOTH` steps (one batch is noisy) and the last step's loss,
ESS, clip fraction and entropies. Without a TTY there is no bar and each step is one INFO
line instead. When the run ends, `closing_summary` says what it achieved and what to run next.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shlex
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("learner")

SMOOTH = 10  # steps in the bar's moving means


def fmt(v: float | None, spec: str = ".3f") -> str:
    """A diagnostic for the progress line; "-" when the step had none (e.g. no such tokens)."""
    return "-" if v is None or not math.isfinite(v) else format(v, spec)


class Progress:
    """The learner's bar (`enabled` None: only on a TTY) and, while it is open, the logging
    redirect that keeps it at the bottom."""

    def __init__(self, total: int, initial: int, enabled: bool | None) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.bar = tqdm(
            total=total,
            initial=initial,
            desc="learner",
            unit="step",
            disable=not enabled if enabled is not None else None,
            dynamic_ncols=True,
        )
        self.disable = bool(self.bar.disable)
        self._exit = contextlib.ExitStack()
        _no_transformers_bars()  # in a log file too: a bar per checkpoint is noise there
        if not self.disable:
            self._exit.enter_context(logging_redirect_tqdm())
        self.rewards: deque[float] = deque(maxlen=SMOOTH)
        self.passes: deque[float] = deque(maxlen=SMOOTH)

    def report(self, step: int, version: int, entry: dict[str, Any]) -> None:
        self.rewards.append(float(entry["reward_mean"]))
        self.passes.append(float(entry.get("pass_rate", math.nan)))
        if self.disable:  # no TTY: one log line per step instead
            log.info(
                "step %d v%d reward %.3f pass %s loss %.4f ess %.3f kl %.4f clip %.3f "
                "masked %.3f stale %.1f H act %s rsn %s (%.2fs)",
                step,
                version,
                entry["reward_mean"],
                fmt(entry.get("pass_rate")),
                entry["loss"],
                entry["ess"],
                entry["kl_behaviour"],
                entry["clip_fraction"],
                entry["masked_fraction"],
                entry["token_staleness_mean"],
                fmt(entry.get("entropy_action")),
                fmt(entry.get("entropy_reasoning")),
                entry["step_seconds"],
            )
            return
        self.bar.update(1)
        postfix = {  # a dict, not keywords: tqdm would sort those
            "v": version,
            "reward10": fmt(_mean(self.rewards)),  # means of the last SMOOTH steps
            "pass10": fmt(_mean(self.passes), ".2f"),
            "loss": fmt(entry["loss"], ".4f"),
            "ess": fmt(entry["ess"], ".2f"),
            "clip": fmt(entry["clip_fraction"], ".2f"),
            "H_act": fmt(entry.get("entropy_action")),  # mean proximal entropy by token role
            "H_rsn": fmt(entry.get("entropy_reasoning")),
        }
        self.bar.set_postfix(postfix)

    def close(self) -> None:
        self.bar.close()
        self._exit.close()


def _no_transformers_bars() -> None:
    """transformers draws a bar of its own for each checkpoint written ("Writing model
    shards"), which would land between the log lines and ours, the final one included (after
    our bar closed): off for the rest of the process."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def _mean(xs: Sequence[float | None]) -> float:
    vals = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    return sum(vals) / len(vals) if vals else math.nan


def window(n: int) -> int:
    """Steps in the first and last windows of a run of `n`: 10% of them, at least 5 (at most
    half the run, so the two do not overlap; 1 for a run of one step)."""
    return max(1, min(n // 2, max(5, math.ceil(n / 10))))


def closing_summary(
    steps: Sequence[dict[str, Any]],
    checkpoint: Path | None,
    config_args: Sequence[str],
    viewers: Sequence[str] = (),
    evals: Sequence[dict[str, Any]] = (),
) -> str:
    """The lines the learner prints when its run ends: reward and pass rate of the first and
    last windows of this session's steps, the held-out evaluation rounds (`[learner]
    eval_every`), the final checkpoint and the commands that evaluate it, and `viewers`, the
    commands that show its curves."""
    if not steps:
        lines = ["headrace: no step trained"]
    else:
        w = window(len(steps))
        first, last = steps[:w], steps[-w:]
        cols = [f"steps {xs[0]['step']}-{xs[-1]['step']}" for xs in (first, last)]
        width = max(len(c) for c in cols) + 2
        end = steps[-1]
        lines = [
            f"headrace: trained to step {end['step']} (policy v{end.get('policy_version', '?')});"
            f" means of the first and last {w} step{'s' if w > 1 else ''}:",
            " " * 12 + "".join(c.rjust(width) for c in cols),
        ]
        for label, key in (("reward", "reward_mean"), ("pass rate", "pass_rate")):
            vals = [fmt(_mean([x.get(key) for x in xs])) for xs in (first, last)]
            lines.append(f"  {label:<10}" + "".join(v.rjust(width) for v in vals))
    if evals:
        k = evals[-1].get("k", "k")
        rounds = ", ".join(f"{fmt(e.get('pass_at_1'))} (step {e['step']})" for e in evals[-4:])
        final = evals[-1]
        lines.append(f"  held-out pass@1   {rounds}")
        lines.append(
            f"  held-out at end   pass@{k} {fmt(final.get('pass_at_k'))}, mean reward "
            f"{fmt(final.get('mean_reward'))}, {final.get('n', 0)} tasks"
        )
    if checkpoint is not None:
        cmd = ["headrace", "eval", "--checkpoint", str(checkpoint)]
        cmd += list(config_args)  # --config FILE and --set flags: the run's own config
        lines += [
            f"  final checkpoint  {checkpoint}",
            f"  evaluate it       {shlex.join(cmd)}",
        ]
    if viewers:
        lines.append(f"  curves            {'  |  '.join(viewers)}")
    return "\n".join(lines)
