"""Chaos run: SIGKILL random roles (broker, learner, actors) of a live run, again and again.

Builds the tiny model in a temp dir, starts a durable broker, a learner with checkpoints, real
vLLM actors (`--real-actors`, default 1) and stub actors (`tests.synthetic_actor`, default
2), and kills `--kills` roles in a random order (broker, learner and actor in turn), starting
each again at once with the same arguments; between kills the learner must take a step. Then
the run must reach `--steps`. See `tests/chaos/harness.py` for what is checked.

`--aimed P` arms the broker's crash points (shared/crashpoints.py: between fdatasync and
commit, during compaction, between claim and send) with probability P per pass (`--aimed-at
POINT=P` sets one point's own: `store.compact`, reached a few times a run, wants more); the
harness
restarts it at once and counts `aimed_kills` (`aimed_by_point`: which windows). Retention
runs throughout (`tests/chaos/harness.py` RETENTION), so compaction does too.

Last line: one JSON object with `kills` by role, `aimed_kills`, `aimed_by_point`,
`steps_reached`, `acked`, `stored`, `deleted_by_retention`, `lost`, `trained_twice`,
`never_trained_unexplained`, `orphans`,
`version_regressions`, `seconds` (and `trained`, `unconsumed`, `evicted` by reason,
`real_acked`, ...). Exit 1 if an invariant broke.

    python benchmarks/chaos.py [--kills 12] [--steps 40] [--seed 0] [--real-actors 1] [--aimed P]
        [--aimed-at store.compact=0.5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from learner.tiny_model import build_tiny_model  # noqa: E402
from shared.crashpoints import POINTS  # noqa: E402
from tests.chaos.harness import ROLES, Chaos  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=12, help="kills in all, spread over the roles")
    ap.add_argument("--steps", type=int, default=0, help="learner steps (0: 10 + 6 per kill)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real-actors", type=int, default=1, help="vLLM actors")
    ap.add_argument("--stub-actors", type=int, default=2)
    ap.add_argument("--between-s", type=float, default=2.0, help="random pause before a kill")
    ap.add_argument("--keep", type=Path, help="run in this dir and keep it (default: temp)")
    ap.add_argument(
        "--aimed",
        type=float,
        default=0.0,
        help="the broker also kills itself at each crash point (between fdatasync and commit,"
        " during compaction, between claim and send) with this probability per pass",
    )
    ap.add_argument(
        "--aimed-at",
        action="append",
        default=[],
        metavar="POINT=P",
        help="this crash point's own probability (repeatable), e.g. store.compact=0.5: a"
        " compaction is reached a few times a run, an fdatasync every commit",
    )
    args = ap.parse_args(argv)
    odds = {p: args.aimed for p in POINTS}
    odds.update({p: float(q) for p, _, q in (a.partition("=") for a in args.aimed_at)})
    steps = args.steps or 10 + 6 * args.kills
    kills = {role: args.kills // len(ROLES) for role in ROLES}
    for role in ROLES[: args.kills % len(ROLES)]:
        kills[role] += 1
    with tempfile.TemporaryDirectory(prefix="headrace-chaos-") as tmp:
        work = args.keep or Path(tmp)
        build_tiny_model(work / "tiny", seed=0)
        chaos = Chaos(
            work / "run",
            work / "tiny",
            steps=steps,
            real_actors=args.real_actors,
            stub_actors=args.stub_actors,
            seed=args.seed,
            aimed=odds,
        )
        try:
            result = chaos.run(kills, between_s=args.between_s)
        except AssertionError as e:
            print(f"chaos run failed: {e}", file=sys.stderr)
            return 1
        finally:
            chaos.close()
    ok = (
        result.kills == kills
        and result.steps_reached == steps
        and result.lost == 0
        and result.real_acked_over_stored == 0
        and result.trained_twice == 0
        and result.never_trained_unexplained == 0
        and result.sampled_over_cap == 0
        and result.orphans == 0
        and result.version_regressions == 0
    )
    for r in result.regressions:
        print(f"regression: {r}", file=sys.stderr)
    print(result.as_json())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
