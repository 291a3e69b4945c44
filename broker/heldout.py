"""`python -m broker.heldout --config FILE --n N --out FILE`: the task bank's held-out tasks.

Writes a `shared.heldout.HeldoutSet`: up to N tasks per family that training never leases
(`TaskBank.heldout`), each family with its blind ceiling where its bank knows one (symbols).
`headrace eval` runs this, then `python -m actor.evaluate` on the file: the bank is the
broker's, and the actor, which plays the tasks, never imports the broker.

Exit codes: 0, or 2 with one line (a bad config, or an [env] with nothing held out).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from broker.curriculum.banks import TaskBank
from broker.curriculum.factory import make_bank
from shared import heldout as H
from shared import protocol as P
from shared.config import ConfigError, load_config
from shared.overrides import add_set_argument


def _blind_ceiling(bank: Any, tasks: list[P.TaskSpec]) -> dict[str, float] | None:
    """The ceiling of the bank (of a mixed bank: of the part) holding these tasks, if any."""
    family = tasks[0].family
    for part in getattr(bank, "banks", None) or [bank]:
        ceiling = getattr(part, "blind_ceiling", None)
        if ceiling is not None and family in {f.name for f in part.families()}:
            return {k: float(v) for k, v in ceiling(tasks).items()}
    return None


def heldout_set(bank: TaskBank, env: str, n: int) -> H.HeldoutSet:
    """`bank.heldout(n)` with the families' blind ceilings; ConfigError when nothing is held
    out (there would be nothing to evaluate)."""
    if n < 1:
        raise ConfigError(f"held-out tasks per family must be >= 1, not {n}")
    families = {
        family: H.HeldoutFamily(list(tasks), _blind_ceiling(bank, list(tasks)))
        for family, tasks in bank.heldout(n).items()
        if tasks
    }
    if not families:
        raise ConfigError(
            f"[env] {env}: the task bank holds no held-out tasks (training may lease every"
            " task it has), so there is nothing to evaluate on"
        )
    return H.HeldoutSet(env=env, n=n, families=families)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m broker.heldout", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--config", help="TOML config; its [env] makes the bank")
    ap.add_argument("--n", type=int, default=32, help="tasks per family (default %(default)s)")
    ap.add_argument("--out", required=True, help="where the HeldoutSet JSON goes")
    add_set_argument(ap)
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        H.write(args.out, heldout_set(make_bank(cfg.env), cfg.env.name, args.n))
    except ConfigError as e:
        print(f"headrace eval: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
