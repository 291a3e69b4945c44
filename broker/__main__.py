"""`headrace-broker` / `python -m broker`: run the broker until SIGINT or SIGTERM.

Exit codes: 0 after a clean stop (store flushed), 2 for a bad configuration, 1 when the broker
cannot start (port in use, store locked by another broker, corrupt store).

`python -m broker export --data-dir DIR --out FILE [--config FILE]` writes a stored run's
complete groups as a frame file for `python -m learner replay` (broker/store/export.py).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import os
import signal
import sys
from collections.abc import Sequence

import msgspec
import zmq

from broker.metrics import init_label_values
from broker.server import Broker
from broker.store import StoreCorruptError, StoreError
from shared import transport
from shared.config import Config, ConfigError, load_config
from shared.logs import setup_logging
from shared.metrics import serve_metrics
from shared.overrides import add_set_argument
from shared.security import SecurityError, check_exposure

log = logging.getLogger("broker")


class StartupError(RuntimeError):
    """The broker cannot start; the message is the one line printed on stderr."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="headrace-broker", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--config",
        help="TOML file: [broker], [env]; [model] path and [actor] max_model_len bound "
        "what a trajectory may hold",
    )
    ap.add_argument("--port", type=int, help="ROUTER port (overrides broker.port)")
    ap.add_argument("--metrics-port", type=int, help="/metrics port, 0 disables")
    ap.add_argument("--bind-host", help="interface to bind (overrides broker.bind_host)")
    ap.add_argument("--data-dir", help="store directory (overrides broker.data_dir)")
    ap.add_argument("--durability", choices=["sqlite", "none"], help="overrides broker.durability")
    ap.add_argument(
        "--log-level",
        default=os.environ.get("HEADRACE_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING or ERROR, then optionally logger=LEVEL pairs:"
        " INFO,broker.store.maintenance=DEBUG",
    )
    add_set_argument(ap)
    return ap.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config, args.overrides)
    overrides = {
        "port": args.port,
        "metrics_port": args.metrics_port,
        "bind_host": args.bind_host,
        "data_dir": args.data_dir,
        "durability": args.durability,
    }
    try:  # replace runs the section's own checks (BrokerConfig.__post_init__) on the flags
        broker = msgspec.structs.replace(
            cfg.broker, **{k: v for k, v in overrides.items() if v is not None}
        )
    except ValueError as e:
        raise ConfigError(f"broker: {e}") from None
    return msgspec.structs.replace(cfg, broker=broker)


# Generation-0 collections every GC_THRESHOLDS[0] allocations instead of 700. Every
# trajectory takes in ~30 short-lived objects (its view, memoryviews, index rows) and leaves
# a few long-lived ones (index entries, replay items; in memory the frames): at the default
# the collector ran every ~30 trajectories and cost ~30 us of each (2,048-token trajectories,
# 16 a batch, in memory); at these thresholds it did not run once in 6,400 of them.
# What the broker holds once started (modules, restored state) is frozen: never traversed.
GC_THRESHOLDS = (50_000, 20, 10)


def tune_gc() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def run(cfg: Config) -> int:
    b = cfg.broker
    broker = Broker(cfg)  # may raise ConfigError (e.g. unknown env for the task bank)
    try:
        init_label_values()
        serve_metrics(b.metrics_port, "broker")
    except OSError as e:
        raise StartupError(f"metrics port {b.metrics_port}: {e.strerror or e}") from None
    try:
        check_exposure(cfg.security, b.bind_host, "the broker")
    except SecurityError as e:
        raise StartupError(str(e)) from None
    try:
        endpoint = await broker.start()
    except zmq.ZMQError as e:
        why = "already in use" if e.errno == errno.EADDRINUSE else e.strerror
        raise StartupError(f"cannot bind tcp://{b.bind_host}:{b.port}: {why}") from None
    except StoreCorruptError as e:
        raise StartupError(f"store is corrupt: {e} (restore it or move it aside)") from None
    except StoreError as e:
        raise StartupError(f"store: {e}") from None
    tune_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"headrace-broker listening on {endpoint}", flush=True)
    await stop.wait()
    log.info("stopping: flushing the store")
    await broker.stop()
    log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["export"]:  # record and replay: read the store, start no server
        from broker.store.export import main as export_main

        return export_main(argv[1:])
    args = parse_args(argv)
    try:
        setup_logging(args.log_level, role="broker")
    except ValueError as e:
        print(f"broker: --log-level: {e}", file=sys.stderr)
        return 2
    try:
        cfg = build_config(args)
        return transport.run(run(cfg))
    except ConfigError as e:
        print(f"headrace-broker: config error: {e}", file=sys.stderr)
        return 2
    except StartupError as e:
        print(f"headrace-broker: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
