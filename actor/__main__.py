"""`headrace-actor` / `python -m actor`: run one actor against a broker."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from shared import transport
from shared.config import ConfigError, load_config
from shared.logs import setup_logging
from shared.metrics import serve_metrics
from shared.models import resolve_model
from shared.overrides import add_set_argument
from shared.transport import PeerUnreachable


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="headrace-actor", description=__doc__)
    p.add_argument("--broker", help="broker endpoint, e.g. tcp://HOST:5555")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (0: off)")
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--model", help="HF model directory (overrides [model] path)")
    p.add_argument("--actor-id", help="stable id of this actor (default: host-pid)")
    p.add_argument("--max-concurrent-episodes", type=int)
    p.add_argument("--log-level", default=os.environ.get("HEADRACE_LOG_LEVEL", "INFO"))
    add_set_argument(p)
    return p.parse_args(argv)


async def _amain(args: argparse.Namespace) -> int:
    from actor.engine import EngineDead
    from actor.envs import check_env
    from actor.runner import Actor

    cfg = load_config(args.config, args.overrides)
    if args.broker:
        cfg.actor.broker = args.broker
    if args.metrics_port is not None:
        cfg.actor.metrics_port = args.metrics_port
    if args.model:
        cfg.model.path = args.model
    if args.max_concurrent_episodes:
        cfg.actor.max_concurrent_episodes = args.max_concurrent_episodes
    cfg.model.path = resolve_model(cfg.model)  # ModelNotFound: one line, exit code 2
    if not (Path(cfg.model.path) / "config.json").exists():
        raise ConfigError(
            f"no model at {cfg.model.path}; build the tiny one with "
            f"`python -m learner.tiny_model --out {cfg.model.path}` or set [model] path"
        )
    check_env(cfg.env)  # a user's env or reward this machine cannot import: exit code 2
    serve_metrics(cfg.actor.metrics_port, "actor")
    actor = Actor(cfg, args.actor_id)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def on_signal() -> None:
        if stopping:  # a second signal: stop now (the outbox is still drained, briefly)
            actor.stop()
        else:
            stopping.append(asyncio.create_task(actor.stop_gracefully()))

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        await actor.run()
    except EngineDead as e:
        print(f"headrace-actor: vLLM engine died: {e}", file=sys.stderr)
        return 3
    finally:
        actor.close()
    if stopping:
        logging.getLogger("actor").info(
            "stopped: %d trajectories left unacked in the outbox (%d episodes finished)",
            len(actor.outbox),
            actor.episodes_done,
        )
    return 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.log_level, role="actor")
    try:
        code = transport.run(_amain(args))
    except ConfigError as e:
        print(f"headrace-actor: bad config: {e}", file=sys.stderr)
        code = 2
    except PeerUnreachable as e:
        print(f"headrace-actor: broker unreachable: {e}", file=sys.stderr)
        code = 1
    except OSError as e:
        print(f"headrace-actor: {e}", file=sys.stderr)
        code = 1
    # vLLM leaves non-daemon threads behind; do not wait for them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
