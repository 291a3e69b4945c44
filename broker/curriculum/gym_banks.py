"""The reasoning-gym and TextArena banks: which of their datasets and games the broker leases,
at which difficulty, spelled out as payload settings without importing either package (the
broker stays light: pure Python and numpy). The actor's environments
(`actor/envs/reasoning_gym_env.py`, `actor/envs/textarena_env.py`) read those payloads."""

from __future__ import annotations

import json
from functools import partial

from broker.curriculum.banks import Family, Part, ProceduralBank, make_spec, name_key, task_seed
from shared import protocol as P
from shared.config import ConfigError, EnvConfig

# reasoning-gym: dataset -> difficulty -> dataset config. Only purely procedural datasets whose
# items are generated from (seed, index) in O(1) with no download, and whose easy variants
# have short numeric answers a small model can produce.
_MARKS = {"easy": 1.0, "medium": 2.0, "hard": 3.0}


def _span(**ranges: tuple[int, int]) -> dict[str, object]:
    """terms=(2, 4) -> {"min_terms": 2, "max_terms": 4}: reasoning-gym's config spelling."""
    return {f"{m}_{k}": v for k, (lo, hi) in ranges.items() for m, v in (("min", lo), ("max", hi))}


def _ops(ops: str, nested: bool) -> dict[str, object]:
    return {"operators": list(ops), "allow_parentheses": nested, "allow_negation": nested}


RG_PRESETS: dict[str, dict[str, dict[str, object]]] = {
    "chain_sum": {  # "3 + 4 - 2 ="
        "easy": _span(terms=(2, 2), digits=(1, 1)),
        "medium": _span(terms=(2, 4), digits=(1, 2)),
        "hard": _span(terms=(4, 6), digits=(2, 4)),
    },
    "basic_arithmetic": {  # + - * / with precedence, parentheses and negation
        "easy": {**_span(terms=(2, 2), digits=(1, 1)), **_ops("+-", False)},
        "medium": {**_span(terms=(2, 3), digits=(1, 2)), **_ops("+-*", False)},
        "hard": {**_span(terms=(3, 6), digits=(1, 3)), **_ops("+-*/", True)},
    },
    "leg_counting": {  # "how many legs do 3 ducks and 2 cats have?"
        "easy": _span(animals=(1, 2), instances=(1, 3)),
        "medium": _span(animals=(2, 4), instances=(1, 6)),
        "hard": _span(animals=(4, 10), instances=(1, 15)),
    },
    "gcd": {
        "easy": _span(numbers=(2, 2), value=(1, 20)),
        "medium": _span(numbers=(2, 2), value=(1, 200)),
        "hard": _span(numbers=(3, 4), value=(1, 5000)),
    },
}


class ReasoningGymBank(ProceduralBank):
    """reasoning-gym datasets x difficulties (actor/envs/reasoning_gym_env.py plays them).

    Family `<dataset>.<difficulty>`; task i is item i of the dataset built with the family's
    config and seed, i.e. `reasoning_gym.create_dataset(dataset, seed=seed, **config)[i]`.
    """

    def __init__(self, env: EnvConfig) -> None:
        rg = env.reasoning_gym
        if min(rg.tasks_per_family, rg.max_turns, rg.max_tokens) < 1:
            raise ConfigError(
                "env.reasoning_gym: tasks_per_family, max_turns, max_tokens must be >= 1"
            )
        self.env = env
        self.rg = rg
        parts = []
        for ds in rg.datasets:
            if ds not in RG_PRESETS:
                raise ConfigError(
                    f"env.reasoning_gym.datasets: unknown {ds!r} (known: {sorted(RG_PRESETS)})"
                )
            for diff in rg.difficulties:  # the config allows only the keys of _MARKS
                fam = Family(f"{ds}.{diff}", _MARKS[diff], rg.tasks_per_family)
                cfg = json.dumps(RG_PRESETS[ds][diff], sort_keys=True)
                seed = task_seed(env.seed, name_key(fam.name), 0)
                parts.append(Part("rg", fam, partial(self._make, fam, ds, cfg, seed)))
        super().__init__(parts, env.seed)

    def _make(self, fam: Family, ds: str, cfg: str, seed: int, index: int) -> P.TaskSpec:
        payload: dict[str, str | int | float] = {
            "dataset": ds,
            "config": cfg,  # JSON: the dataset config's fields
            "seed": seed,
            "index": index,
            "size": fam.size,
            "max_turns": self.rg.max_turns,
            "max_tokens": self.rg.max_tokens,
            "instruction": self.rg.instruction,
            "answer": self.rg.answer,
            "partial_credit": int(self.rg.partial_credit),  # the wire has no bools here
        }
        return make_spec("rg", fam, index, "reasoning_gym", payload)


# TextArena single-player games: family -> (registry id without wrappers, game kwargs,
# difficulty). All seed their state from the reset seed and need no downloads (word games
# such as Hangman/Wordle need NLTK corpora, so they are left out).
def _guess(hi: int, turns: int) -> dict[str, object]:
    return {"min_number": 1, "max_number": hi, "max_turns": turns}


TA_PRESETS: dict[str, tuple[str, dict[str, object], float]] = {
    "guess_the_number.easy": ("GuessTheNumber-v0-raw", _guess(10, 6), 1.0),
    "guess_the_number.medium": ("GuessTheNumber-v0-raw", _guess(20, 10), 2.0),
    "guess_the_number.hard": ("GuessTheNumber-v0-raw", _guess(100, 7), 3.0),  # exact bisection
    "tower_of_hanoi.easy": ("TowerOfHanoi-v0-raw", {"num_disks": 3, "max_turns": 14}, 2.0),
    "tower_of_hanoi.hard": ("TowerOfHanoi-v0-raw", {"num_disks": 4, "max_turns": 30}, 3.0),
    "mastermind.medium": (
        "Mastermind-v0-raw",
        {"code_length": 4, "num_numbers": 6, "max_turns": 20, "duplicate_numbers": False},
        3.0,
    ),
}


class TextArenaBank(ProceduralBank):
    """TextArena games (actor/envs/textarena_env.py plays them); task i = one reset seed."""

    def __init__(self, env: EnvConfig) -> None:
        ta = env.textarena
        if min(ta.tasks_per_family, ta.max_tokens) < 1 or ta.max_turns < 0:
            raise ConfigError("env.textarena: tasks_per_family, max_tokens >= 1; max_turns >= 0")
        self.env = env
        self.ta = ta
        parts = []
        for game in ta.games:
            if game not in TA_PRESETS:
                raise ConfigError(
                    f"env.textarena.games: unknown {game!r} (known: {sorted(TA_PRESETS)})"
                )
            fam = Family(game, TA_PRESETS[game][2], ta.tasks_per_family)
            parts.append(Part("ta", fam, partial(self._make, fam)))
        super().__init__(parts, env.seed)

    def _make(self, fam: Family, index: int) -> P.TaskSpec:
        game_id, kwargs, _ = TA_PRESETS[fam.name]
        # Each game turn allows one invalid-move retry (TextArena's error allowance), so 2x the
        # game's turn limit bounds the agent's turns; `max_turns` may cap it lower.
        turns = 2 * int(kwargs.get("max_turns", 50))  # type: ignore[call-overload]
        if self.ta.max_turns:
            turns = min(turns, self.ta.max_turns)
        payload: dict[str, str | int | float] = {
            "game": game_id,
            "kwargs": json.dumps(kwargs, sort_keys=True),
            "seed": task_seed(self.env.seed, name_key(fam.name), index),
            "max_turns": turns,
            "max_tokens": self.ta.max_tokens,
        }
        return make_spec("ta", fam, index, "textarena", payload)
