"""`[env]`: the environment actors play and the broker's task bank of it, with one sub-section
per built-in environment (`[env.symbols]`, `[env.reasoning_gym]`, `[env.textarena]`); gathered
into `Config` by shared/config.py."""

from __future__ import annotations

import math
from typing import Any, Literal

import msgspec

from shared.config_base import MOVED_KEYS, moved_message
from shared.config_base import Section as _Section

# "turn": each right answer scores; "pass": 1 at the end if all were right
SymbolsReward = Literal["turn", "pass"]
# How each step's tool delay is drawn: "fixed": exactly step_delay_s; "lognormal": a long tail
# (most calls quick, a few very slow) with mean step_delay_s (actor/envs/symbols.py)
StepDelayDist = Literal["fixed", "lognormal"]


class SymbolsFamily(_Section):
    """One family of a `symbols` bank (`[env.symbols] families`); unset fields take
    `[env.symbols]`'s."""

    name: str
    level: int
    n_turns: int | None = None
    reward: SymbolsReward | None = None
    tasks: int | None = None  # tasks in the family; default `tasks_per_level`


class SymbolsConfig(_Section):
    """`[env.symbols]`: the built-in environment (shared/symbols.py has the levels).

    One family per level unless `families` is set; level 0 is trivial, 1-4 the legacy rules,
    5-8 permuted (a symbol-blind policy scores exactly chance), 9 noise (nothing to learn).
    """

    levels: list[int] = msgspec.field(default_factory=lambda: [1, 2])  # task-bank levels
    tasks_per_level: int = 64
    reasoning_tokens: int = 4  # free tokens the agent writes before each action
    action_tokens: int = 1  # tokens of each action "word"; its last token decides
    n_choices: int = 4
    n_turns: int = 3
    reward: SymbolsReward = "turn"
    # explicit families instead of one per level, each overriding the fields above, e.g.
    # [{name = "short", level = 6, n_turns = 1}, {name = "long", level = 6, n_turns = 4,
    # reward = "pass"}]; families of one level share its symbol map
    families: list[SymbolsFamily] = msgspec.field(default_factory=list)
    # seconds every `step` awaits (asyncio.sleep), standing in for a tool call's latency
    # (benchmarks/async_vs_sync.py); the bank puts it in each task's payload, 0: none
    step_delay_s: float = 0.0
    # "fixed": every step waits step_delay_s; "lognormal": each step's wait is drawn from a
    # lognormal with mean step_delay_s and log-space standard deviation step_delay_sigma (1.0:
    # median 0.61x the mean, p99 6.2x), seeded by the task and the episode's index in its
    # group, so a run's delays repeat; real tool latencies are long-tailed like this
    step_delay_dist: StepDelayDist = "fixed"
    step_delay_sigma: float = 1.0

    def __post_init__(self) -> None:
        if self.action_tokens < 1:
            raise ValueError("action_tokens must be >= 1")
        if not 0.0 <= self.step_delay_s < math.inf:
            raise ValueError(f"step_delay_s must be >= 0 (0: no delay), got {self.step_delay_s}")
        if not 0.0 < self.step_delay_sigma <= 4.0:
            raise ValueError(f"step_delay_sigma must be in (0, 4], got {self.step_delay_sigma}")


class ReasoningGymConfig(_Section):
    """`[env.reasoning_gym]`: families <dataset>.<difficulty> (datasets: banks.RG_PRESETS)."""

    datasets: list[str] = msgspec.field(
        default_factory=lambda: ["chain_sum", "basic_arithmetic", "leg_counting", "gcd"]
    )
    difficulties: list[Literal["easy", "medium", "hard"]] = msgspec.field(
        default_factory=lambda: ["easy", "medium", "hard"]
    )
    tasks_per_family: int = 10000
    max_turns: int = 1  # answers per task; > 1: "Wrong, try again." after a wrong answer
    max_tokens: int = 512  # generation budget per answer (reasoning + answer)
    # text after each question ("": think step by step, then "Answer: ..." on its own line)
    instruction: str = ""
    # "marker": the answer follows the last "Answer:" (else the last line); "first_number":
    # the first number written (for instructions such as "Reply with just the number.")
    answer: Literal["marker", "first_number"] = "marker"
    # the dataset's score as it is (some give partial credit, e.g. chain_sum for a reply that
    # contains the right number: a policy can drift to long digit strings for it); false: 1
    # for a right answer, else 0
    partial_credit: bool = True


class TextArenaConfig(_Section):
    """`[env.textarena]`: families are game presets (banks.TA_PRESETS)."""

    games: list[str] = msgspec.field(
        default_factory=lambda: ["guess_the_number.easy", "guess_the_number.medium"]
    )
    tasks_per_family: int = 10000
    max_tokens: int = 256  # generation budget per move
    max_turns: int = 0  # cap on moves per game; 0: the game's limit (x2 for retries)


class EnvConfig(_Section):
    """`[env]`: the environment actors play and the broker's task bank of it.

    `name` picks the bank (broker/curriculum/banks.py) and with it the environment:
      "symbols"        built-in, learnable by the tiny model (actor/envs/symbols.py)
      "reasoning_gym"  reasoning-gym datasets x difficulties (actor/envs/reasoning_gym_env.py)
      "textarena"      offline single-player TextArena games (actor/envs/textarena_env.py)
      "mixed"          the banks listed in `mixed`, together, uniform over all their tasks
      "dataset"        rows of a JSONL / parquet / HF datasets file scored by `reward`
                       (broker/curriculum/dataset_bank.py, actor/envs/dataset_env.py)
      "verifiers"      a verifiers taskset scored offline (actor/envs/verifiers_env.py)
      "pkg.module:Name" or a `headrace.envs` entry point: a user's environment class, its
                       tasks and episodes both (shared/env_api.py, shared/env_loader.py)
    The built-in banks read their own sub-section (`[env.symbols]`, `[env.reasoning_gym]`,
    `[env.textarena]`); datasets and verifiers the keys below. Task seeds derive from `seed`,
    so a task id means the same task in every process.
    """

    name: str = "symbols"
    seed: int = 0
    # mixed: which banks, each built from its own section
    mixed: list[str] = msgspec.field(default_factory=lambda: ["symbols", "reasoning_gym"])
    symbols: SymbolsConfig = msgspec.field(default_factory=SymbolsConfig)
    reasoning_gym: ReasoningGymConfig = msgspec.field(default_factory=ReasoningGymConfig)
    textarena: TextArenaConfig = msgspec.field(default_factory=TextArenaConfig)
    # --- user environments, datasets, verifiers (README "Train on your own task")
    # free-form, passed to a user's env class on the broker (`tasks(options)`) and actor
    # (`options`); the verifiers adapter reads `taskset` (and `taskset_config`) from it
    options: dict[str, Any] = msgspec.field(default_factory=dict)
    # dataset: a JSONL file, a parquet file or a `datasets` save_to_disk directory; rows
    # have `prompt` (text) or `messages` (chat), optionally `family`, and any other fields
    path: str = ""
    reward: str = ""  # dataset: "pkg.module:score", score(completion, row) -> float
    step: str = ""  # dataset: "pkg.module:fn", fn(completion, row, turn) -> next message | None
    max_turns: int = 1  # dataset: turns per episode (with `step`)
    max_tokens: int = 256  # dataset, verifiers: generation budget per turn
    # dataset: every reply is exactly max_tokens tokens (EOS does not stop it) and is scored;
    # for models that never stop on their own, such as the tiny test model. Otherwise a reply
    # that runs out of tokens is unscored and truncated (README "Chat templates")
    fixed_length: bool = False
    # held-out tasks (`heldout`, never leased for training): a deterministic fraction of the
    # rows / tasks by content hash and `seed`, or (dataset) the rows of another file
    eval_fraction: float = 0.0
    eval_path: str = ""

    def __post_init__(self) -> None:
        if self.reward in ("turn", "pass"):  # [env] reward was the symbols' reward mode too
            new = moved_message(("env", "reward"), ("env", "symbols", "reward"))
            raise ValueError(f"{new} ([env] reward is the dataset's 'pkg.module:score')")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError("eval_fraction must be in [0, 1)")
        if min(self.max_turns, self.max_tokens) < 1:
            raise ValueError("max_turns and max_tokens must be >= 1")


# The flat keys [env] had before each built-in environment got its own section
MOVED_KEYS.update(
    {("env", f"rg_{k}"): ("env", "reasoning_gym", k) for k in ReasoningGymConfig.__struct_fields__}
)
MOVED_KEYS.update(
    {("env", f"ta_{k}"): ("env", "textarena", k) for k in TextArenaConfig.__struct_fields__}
)
MOVED_KEYS.update(
    {("env", k): ("env", "symbols", k) for k in SymbolsConfig.__struct_fields__ if k != "reward"}
)
