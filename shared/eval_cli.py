"""`headrace eval`: a checkpoint's (or any model's) pass@1, pass@K and mean reward on the
environment's held-out tasks, overall and per family.

    headrace eval --checkpoint DIR --config FILE [--n N] [--samples K] [--json]

Like the other commands it runs the roles as subprocesses and imports neither: `python -m
broker.heldout` writes the bank's held-out tasks (N per family, tasks training never leases),
`python -m actor.evaluate` plays each K times through vLLM exactly as the actors play training
episodes, and the scores are computed here (shared/passk.py). The children's output goes to
stderr, so with `--json` stdout holds the one JSON object alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from shared import heldout as H
from shared import passk
from shared.checkpoint_dirs import CheckpointNotFound, ModelDir, resolve_checkpoint
from shared.config import ConfigError, load_config
from shared.overrides import add_set_argument, set_argv

# a model dir vLLM can serve carries its tokenizer (learner checkpoints copy the base's)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="pass@1 / pass@K of a checkpoint on the held-out tasks")
    e.add_argument(
        "--checkpoint",
        required=True,
        help="a learner checkpoint (step_* dir), a checkpoint root (its newest complete"
        " checkpoint), or any Hugging Face model dir (e.g. the base model)",
    )
    e.add_argument("--config", required=True, help="the run's TOML: [env], [model], [actor]")
    e.add_argument("--n", type=int, default=32, help="held-out tasks per family (default 32)")
    e.add_argument("--samples", type=int, default=4, help="episodes per task = K (default 4)")
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_set_argument(e)


def _role(argv: list[str]) -> int:
    """`python -m <argv>`, its output on our stderr (fd 2: stdout is the report's)."""
    env = {**os.environ}
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's start-up chatter
    return subprocess.run([sys.executable, "-m", *argv], stdout=2, env=env).returncode


def _check_model(model: ModelDir) -> None:
    if not model.lora and not any((model.path / f).is_file() for f in _TOKENIZER_FILES):
        raise CheckpointNotFound(f"{model.path} has no tokenizer files: vLLM cannot serve it")


def cmd_eval(args: argparse.Namespace) -> int:
    try:
        model = resolve_checkpoint(args.checkpoint)
        _check_model(model)
        if args.n < 1 or args.samples < 1:
            raise ConfigError(f"--n and --samples must be >= 1 (got {args.n}, {args.samples})")
    except ConfigError as e:
        print(f"headrace eval: {e}", file=sys.stderr)
        return 2
    load_config(args.config, args.overrides)  # a bad config: one line (exit 2), before anything
    config = ["--config", args.config, *set_argv(args.overrides)]  # both roles read the same
    try:
        with tempfile.TemporaryDirectory(prefix="headrace-eval-") as tmp:
            tasks, out = Path(tmp) / "heldout.json", Path(tmp) / "results.json"
            code = _role(["broker.heldout", *config, "--n", str(args.n), "--out", str(tasks)])
            if code:
                return code
            play = ["actor.evaluate", *config, "--tasks", str(tasks), "--out", str(out)]
            play += ["--adapter" if model.lora else "--model", str(model.path)]
            code = _role([*play, "--samples", str(args.samples)])
            if code:
                return code
            report = make_report(H.read(tasks, H.HeldoutSet), H.read_results(out), model)
    except KeyboardInterrupt:
        return 130
    print(json.dumps(report) if args.json else render(report))
    return 0


def make_report(
    heldout: H.HeldoutSet, results: list[passk.TaskResult], model: ModelDir
) -> dict[str, Any]:
    """`passk.as_dict` of the results (pass_at_1, pass_at_k, mean_reward, n tasks, k,
    episodes, families), plus samples, the model and each family's blind ceiling."""
    report = passk.as_dict(*passk.score_by_family(results))
    report["samples"] = max((len(r.successes) for r in results), default=0)
    report["checkpoint"] = str(model.path)
    report["lora"] = model.lora
    report["env"] = heldout.env
    families: dict[str, dict[str, Any]] = report["families"]  # type: ignore[assignment]
    for name, fam in families.items():
        held = heldout.families.get(name)
        fam["blind_ceiling"] = held.blind_ceiling if held is not None else None
    # overall: the families' ceilings weighted by task count, when every family has one
    ceilings = [(f["blind_ceiling"], f["n"]) for f in families.values()]
    report["blind_ceiling"] = None
    if ceilings and all(c is not None for c, _ in ceilings):
        total = sum(n for _, n in ceilings)
        report["blind_ceiling"] = {
            key: sum(c[key] * n for c, n in ceilings) / total for key in ("pass", "reward")
        }
    return report


def render(report: dict[str, Any]) -> str:
    """The report as a table: one row per family, then all tasks."""
    k = report["k"]
    head = ("family", "tasks", "pass@1", f"pass@{k}", "mean reward", "blind pass", "blind reward")
    rows = [head]
    for name, s in [*report["families"].items(), ("all", report)]:
        blind = s.get("blind_ceiling") or {}
        cells = [s["pass_at_1"], s["pass_at_k"], s["mean_reward"]]
        cells += [blind.get("pass"), blind.get("reward")]
        rows.append((name, str(s["n"]), *("-" if c is None else f"{c:.3f}" for c in cells)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    model = report["checkpoint"] + (" (LoRA)" if report["lora"] else "")
    lines = [
        f"{model} on {report['env']}: {report['n']} held-out tasks x {report['samples']} samples"
    ]
    for r in rows:  # the family left-aligned, numbers right-aligned
        lines.append(
            "  ".join(
                [r[0].ljust(widths[0])]
                + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
            )
        )
    lines.append(
        f"pass@1 {report['pass_at_1']:.3f}  pass@{k} {report['pass_at_k']:.3f}"
        f"  mean reward {report['mean_reward']:.3f}"
    )
    return "\n".join(lines)
