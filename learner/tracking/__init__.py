"""Experiment tracking: the backends `[logging] backends` chooses, behind one `Tracker`.

`build_tracker` checks that every chosen backend's package is installed (a `ConfigError`
naming the pip package otherwise), then opens each one and returns their fan-out. Nothing here
imports torch or a backend's package until a backend is opened, so `headrace plot` and the
config checks stay light.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from learner.tracking.base import Completion, FanOut, Tracker
from shared.config import ConfigError
from shared.logging_config import BACKENDS, LoggingConfig

__all__ = ["Completion", "FanOut", "Tracker", "build_tracker", "require_backends", "tracking_dir"]

# backend -> (the module it imports, the pip package that provides it)
PACKAGES: dict[str, tuple[str, str] | None] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
    "jsonl": None,  # the standard library
}
assert set(PACKAGES) == set(BACKENDS)


def tracking_dir(cfg: LoggingConfig, checkpoint_dir: Path) -> Path:
    """`[logging] dir`, or `<checkpoint_dir>/tb` when it is empty."""
    return Path(cfg.dir) if cfg.dir else Path(checkpoint_dir) / "tb"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, a broken one
        return False


def require_backends(backends: Sequence[str]) -> None:
    """ConfigError unless every backend is known and its package importable."""
    for name in backends:
        if name not in PACKAGES:
            raise ConfigError(
                f"[logging] backends: unknown backend {name!r} ({', '.join(BACKENDS)})"
            )
        need = PACKAGES[name]
        if need is not None and not _installed(need[0]):
            raise ConfigError(
                f"[logging] backends: {name!r} needs the {need[1]!r} package, which is not "
                f"installed (pip install {need[1]}; or drop {name!r} from backends)"
            )


def build_tracker(
    cfg: LoggingConfig,
    directory: Path,
    *,
    resume_step: int = 0,
    run_name: str = "",
    config: dict[str, Any] | None = None,
) -> FanOut:
    """Open every backend of `cfg.backends` writing into `directory` (made if missing).

    `resume_step`: the checkpoint step a resumed run continues from (what was recorded after
    it is dropped where the backend allows); `config`: the run's whole config, for the
    backends that keep one."""
    require_backends(cfg.backends)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = cfg.run_name or run_name or directory.resolve().name
    conf = config or {}
    opened: list[Tracker] = []
    try:
        for backend in cfg.backends:
            opened.append(_open(backend, cfg, directory, resume_step, name, conf))
    except BaseException:
        FanOut(opened).close()
        raise
    return FanOut(opened)


def _open(
    backend: str, cfg: LoggingConfig, d: Path, resume: int, name: str, conf: dict[str, Any]
) -> Tracker:
    # One small module per backend, imported only when chosen.
    if backend == "tensorboard":
        from learner.tracking.tensorboard_tracker import TensorBoardTracker

        return TensorBoardTracker(d, resume)
    if backend == "jsonl":
        from learner.tracking.jsonl_tracker import JsonlTracker

        return JsonlTracker(d, resume)
    if backend == "wandb":
        from learner.tracking.wandb_tracker import WandbTracker

        return WandbTracker(d, cfg.project, name, conf)
    if backend == "mlflow":
        from learner.tracking.mlflow_tracker import MlflowTracker

        return MlflowTracker(d, cfg.project, name, conf)
    from learner.tracking.trackio_tracker import TrackioTracker

    return TrackioTracker(cfg.project, name, conf)
