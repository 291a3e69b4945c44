"""`python -m actor.evaluate`: play held-out tasks with one model, every episode scored.

    python -m actor.evaluate --config FILE --model DIR [--adapter DIR] \\
        --tasks HELDOUT.json --samples K --out RESULTS.json

`--tasks` is a `shared.heldout.HeldoutSet` (`python -m broker.heldout` writes it); `--out`
gets one `shared.passk.TaskResult` per task (K episode rewards and successes). Episodes are
played as the actor plays training episodes (actor/build.py: `[model]` chat template and
system prompt, `[actor]` temperature / top-p / top-k / max_model_len, episode seeds 0..K-1),
on a model dir, or with `--adapter` on `[model] path` plus that LoRA adapter dir. `headrace
eval` runs this and scores the results; nothing here is sent anywhere.

Exit codes: 0; 2 for a bad config or model; 3 when the vLLM engine dies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from actor.build import TextFormat, play_episode, start_engine, text_format
from actor.engine import Engine, EngineDead
from actor.envs import make_env
from actor.lora import CONFIG_FILE, TENSORS_FILE
from shared import heldout as H
from shared import protocol as P
from shared.config import ActorConfig, Config, ConfigError, load_config
from shared.logs import setup_logging
from shared.lora_config import LoraConfig
from shared.models import resolve_model
from shared.overrides import add_set_argument
from shared.passk import TaskResult

log = logging.getLogger("actor.evaluate")

ACTOR_ID = "eval"


async def play_tasks(
    engine: Engine,
    text: TextFormat,
    ac: ActorConfig,
    tasks: Sequence[P.TaskSpec],
    samples: int,
    *,
    concurrency: int,
    options: Mapping[str, Any] | None = None,
) -> list[TaskResult]:
    """`samples` episodes of every task (episode seeds 0..samples-1), all tasks at once so
    the engine runs full batches; one result per task, in order. `options`: [env.options]."""
    slots = asyncio.Semaphore(concurrency)
    total, done = len(tasks) * samples, 0

    async def one(task: P.TaskSpec, k: int) -> P.Trajectory:
        nonlocal done
        async with slots:
            lease = P.Lease(
                lease_id=f"eval-{task.task_id}", task=task, group_size=samples, deadline_s=0
            )
            env = make_env(task, episode_seed=k, options=options)
            seed = zlib.crc32(f"{ac.seed}/{task.task_id}/{k}".encode())  # repeatable samples
            traj = await play_episode(engine, text, ac, env, lease, ACTOR_ID, seed=seed)
        done += 1
        if done % max(1, total // 10) == 0 or done == total:
            log.info("played %d/%d episodes", done, total)
        return traj

    trajs = await asyncio.gather(*(one(t, k) for t in tasks for k in range(samples)))
    return [
        TaskResult(
            task_id=t.task_id,
            family=t.family or t.task_id,
            rewards=[x.outcome_reward for x in trajs[i * samples : (i + 1) * samples]],
            successes=[bool(x.success) for x in trajs[i * samples : (i + 1) * samples]],
        )
        for i, t in enumerate(tasks)
    ]


def _adapter_lora(adapter: Path) -> tuple[LoraConfig, dict]:
    """The engine's LoRA slot sized for this PEFT adapter, and its adapter_config.json."""
    config = json.loads((adapter / CONFIG_FILE).read_text())
    targets = config.get("target_modules") or []
    if isinstance(targets, str):  # a regex: vLLM's slot needs the module names
        raise ConfigError(f"{adapter}: target_modules is a pattern ({targets!r}), not names")
    lc = LoraConfig(
        rank=int(config["r"]), alpha=float(config["lora_alpha"]), target_modules=sorted(targets)
    )
    return lc, config


async def evaluate(
    cfg: Config, model: str | None, adapter: str | None, tasks: Sequence[P.TaskSpec], samples: int
) -> list[TaskResult]:
    """Start an engine for `model`, or for `[model] path` with the LoRA `adapter`, play every
    task `samples` times, shut the engine down."""
    lora = None
    if adapter is not None:
        model = resolve_model(cfg.model)  # the adapter's base
        lora, adapter_config = _adapter_lora(Path(adapter))
    assert model is not None
    text = text_format(cfg.model, model)
    concurrency = max(cfg.actor.max_concurrent_episodes, 8)
    log.info("starting vLLM engine for %s%s", model, f" + LoRA {adapter}" if adapter else "")
    # without an adapter: no LoRA slot, whatever [learner.lora] says (a full model dir)
    engine = start_engine(cfg, model, max_num_seqs=concurrency, lora=lora or LoraConfig())
    try:
        if adapter is not None:  # the slot starts at a zero adapter: version 1 is the checkpoint
            await engine.update_weights(str(Path(adapter) / TENSORS_FILE), 1, adapter_config)
        return await play_tasks(
            engine,
            text,
            cfg.actor,
            tasks,
            samples,
            concurrency=concurrency,
            options=cfg.env.options,
        )
    finally:
        engine.shutdown()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m actor.evaluate", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--config", help="TOML config: [model], [actor] (and [env] for the envs)")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="model dir (a checkpoint or any HF dir)")
    which.add_argument("--adapter", help="LoRA adapter dir, on top of [model] path")
    ap.add_argument("--tasks", required=True, help="HeldoutSet JSON (python -m broker.heldout)")
    ap.add_argument("--samples", type=int, default=4, help="episodes per task")
    ap.add_argument("--out", required=True, help="where the TaskResult list (JSON) goes")
    ap.add_argument("--log-level", default=os.environ.get("HEADRACE_LOG_LEVEL", "INFO"))
    add_set_argument(ap)
    args = ap.parse_args(argv)
    setup_logging(args.log_level, role="eval")
    try:
        if args.samples < 1:
            raise ConfigError(f"--samples must be >= 1, not {args.samples}")
        cfg = load_config(args.config, args.overrides)
        tasks = H.read(args.tasks, H.HeldoutSet).tasks()
        results = asyncio.run(evaluate(cfg, args.model, args.adapter, tasks, args.samples))
        H.write(args.out, results)
        code = 0
    except ConfigError as e:
        print(f"headrace eval: {e}", file=sys.stderr)
        code = 2
    except EngineDead as e:
        print(f"headrace eval: vLLM engine died: {e}", file=sys.stderr)
        code = 3
    except Exception:
        log.exception("evaluation failed")
        code = 1
    # vLLM leaves non-daemon threads behind; do not wait for them (as actor/__main__.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
