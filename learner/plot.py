"""`headrace plot RUN [--out DIR]` (`python -m learner.plot`): a run's curves as PNG files.

RUN is a run directory (or any folder above its tracking directory): the curves come from
the `scalars.jsonl` the learner's `jsonl` tracking backend writes there every step (on by
default; `<run>/learner/tb/scalars.jsonl` for `headrace run`). RUN may also be that file
itself, or a `--summary-json` file (`{"steps": [...], "evals": [...]}`), for a run recorded
without the jsonl backend. Written to DIR (default: `plots/` beside the source's run):

- `reward.png`: mean outcome reward per step, and its 10-step moving mean
- `pass_rate.png`: the same for the pass rate
- `entropy.png`: mean proximal entropy per token role (action, reasoning, all)
- `eval.png`: the `eval/` scalars (held-out pass@1, pass@k, mean reward), when the run has any

matplotlib draws off-screen (Agg); torch is never imported.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from learner.evaluation import eval_scalars
from learner.tracking.jsonl_tracker import SCALARS
from learner.tracking.tags import scalar_tags

Series = dict[str, list[tuple[int, float]]]
SMOOTH = 10


class PlotError(Exception):
    """Nothing to plot: a one-line reason (exit code 2)."""


def _add(series: Series, step: int, values: dict[str, Any]) -> None:
    for tag, v in values.items():
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            series[tag].append((step, float(v)))


def read_scalars_jsonl(path: Path) -> Series:
    series: Series = defaultdict(list)
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a torn last line of a crashed run
        step = int(row.pop("step"))
        _add(series, step, row)
    return series


def read_summary(path: Path) -> Series:
    try:
        data = json.loads(path.read_text())
        steps, evals = data["steps"], data.get("evals", [])
    except (ValueError, KeyError, TypeError):
        raise PlotError(f"{path}: neither a scalars.jsonl nor a summary JSON") from None
    series: Series = defaultdict(list)
    for entry in steps:
        _add(series, int(entry["step"]), scalar_tags(entry))
    for entry in evals:
        _add(series, int(entry["step"]), eval_scalars(entry))
    return series


def find_source(run: Path) -> Path:
    """The file to plot from: `run` itself, or the newest scalars.jsonl under it."""
    if run.is_file():
        return run
    if not run.is_dir():
        raise PlotError(f"no such run directory or file: {run}")
    found = sorted(run.rglob(SCALARS), key=lambda p: p.stat().st_mtime)
    if not found:
        raise PlotError(
            f"no {SCALARS} under {run} (the learner writes it with [logging] backends "
            f'including "jsonl"); pass a --summary-json file instead'
        )
    return found[-1]


def load(run: Path) -> tuple[Series, Path]:
    src = find_source(run)
    series = read_scalars_jsonl(src) if src.suffix == ".jsonl" else read_summary(src)
    for points in series.values():
        points.sort()
    if not series.get("train/reward_mean"):
        raise PlotError(f"{src}: no training step recorded yet")
    return series, src


def _moving_mean(ys: list[float], n: int = SMOOTH) -> list[float]:
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y - (ys[i - n] if i >= n else 0.0)
        out.append(total / min(i + 1, n))
    return out


def _figure(title: str, ylabel: str) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.set_title(title)
    ax.set_xlabel("learner step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig: Any, ax: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _smoothed(series: Series, tag: str, title: str, path: Path) -> Path:
    fig, ax = _figure(title, tag.split("/")[-1])
    xs, ys = zip(*series[tag], strict=True)
    ax.plot(xs, ys, alpha=0.35, linewidth=1, label="per step")
    ax.plot(xs, _moving_mean(list(ys)), linewidth=2, label=f"{SMOOTH}-step mean")
    return _save(fig, ax, path)


def _lines(series: Series, tags: list[str], title: str, ylabel: str, path: Path) -> Path:
    fig, ax = _figure(title, ylabel)
    for tag in tags:
        xs, ys = zip(*series[tag], strict=True)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=tag.split("/", 1)[1])
    return _save(fig, ax, path)


def plot_run(run: Path, out: Path | None = None) -> list[Path]:
    """Write the PNG files of the run at `run` into `out`; returns their paths."""
    series, src = load(run)
    if out is None:
        out = (run if run.is_dir() else src.parent) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = [_smoothed(series, "train/reward_mean", "reward", out / "reward.png")]
    if series.get("train/pass_rate"):
        written.append(_smoothed(series, "train/pass_rate", "pass rate", out / "pass_rate.png"))
    entropy = [t for t in ("entropy/action", "entropy/reasoning", "entropy/all") if series.get(t)]
    if entropy:
        title = "mean entropy by token role"
        written.append(_lines(series, entropy, title, "nats", out / "entropy.png"))
    # overall scores only: eval/<family>/... lines would crowd it (TensorBoard has them)
    evals = sorted(t for t in series if t.startswith("eval/") and t.count("/") == 1)
    if evals:
        written.append(_lines(series, evals, "evaluation", "score", out / "eval.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="headrace plot", description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="run directory, scalars.jsonl or summary JSON")
    ap.add_argument("--out", type=Path, help="where the PNGs go (default: RUN/plots)")
    args = ap.parse_args(argv)
    try:
        written = plot_run(args.run, args.out)
    except PlotError as e:
        print(f"headrace plot: {e}", file=sys.stderr)
        return 2
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
