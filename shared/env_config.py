"""`[env]`: the environment actors play and the broker's task bank of it (gathered into
`Config` by shared/config.py)."""

from __future__ import annotations

from typing import Any

import msgspec

from shared.config_base import Section as _Section
from shared.config_base import check_choice as _check_choice


class SymbolsFamily(_Section):
    """One family of a `symbols` bank (`[env] families`); unset fields take `[env]`'s."""

    name: str
    level: int
    n_turns: int | None = None
    reward: str | None = None
    tasks: int | None = None  # tasks in the family; default `tasks_per_level`

    def __post_init__(self) -> None:
        if self.reward not in (None, "turn", "pass"):
            raise ValueError("reward must be one of turn, pass")


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
    Each bank reads only its own fields below; task seeds derive from `seed`, so a task id
    means the same task in every process.
    """

    name: str = "symbols"
    # symbols (shared/symbols.py has the levels): one family per level unless `families` is
    # set; level 0 is trivial, 1-4 the legacy rules, 5-8 permuted (a symbol-blind policy
    # scores exactly chance), 9 noise (nothing to learn)
    levels: list[int] = msgspec.field(default_factory=lambda: [1, 2])  # task-bank levels
    tasks_per_level: int = 64
    reasoning_tokens: int = 4  # free tokens the agent writes before each action
    action_tokens: int = 1  # tokens of each action "word"; its last token decides
    n_choices: int = 4
    n_turns: int = 3
    reward: str = "turn"  # "turn": each right answer; "pass": 1 at the end if all were right
    # symbols: explicit families instead of one per level, each overriding the fields above,
    # e.g. [{name = "short", level = 6, n_turns = 1}, {name = "long", level = 6, n_turns = 4,
    # reward = "pass"}]; families of one level share its symbol map
    families: list[SymbolsFamily] = msgspec.field(default_factory=list)
    seed: int = 0
    # reasoning_gym: families <dataset>.<difficulty> (datasets: banks.RG_PRESETS)
    rg_datasets: list[str] = msgspec.field(
        default_factory=lambda: ["chain_sum", "basic_arithmetic", "leg_counting", "gcd"]
    )
    rg_difficulties: list[str] = msgspec.field(default_factory=lambda: ["easy", "medium", "hard"])
    rg_tasks_per_family: int = 10000
    rg_max_turns: int = 1  # answers per task; > 1: "Wrong, try again." after a wrong answer
    rg_max_tokens: int = 512  # generation budget per answer (reasoning + answer)
    # text after each question ("": think step by step, then "Answer: ..." on its own line)
    rg_instruction: str = ""
    # "marker": the answer follows the last "Answer:" (else the last line); "first_number":
    # the first number written (for instructions such as "Reply with just the number.")
    rg_answer: str = "marker"
    # textarena: families are game presets (banks.TA_PRESETS)
    ta_games: list[str] = msgspec.field(
        default_factory=lambda: ["guess_the_number.easy", "guess_the_number.medium"]
    )
    ta_tasks_per_family: int = 10000
    ta_max_tokens: int = 256  # generation budget per move
    ta_max_turns: int = 0  # cap on moves per game; 0: the game's limit (x2 for retries)
    # mixed: which banks, each built from its fields above
    mixed: list[str] = msgspec.field(default_factory=lambda: ["symbols", "reasoning_gym"])
    # symbols: seconds every `step` awaits (asyncio.sleep), standing in for a tool call's
    # latency (benchmarks/async_vs_sync.py); the actor passes it to the env, 0: none
    step_delay_s: float = 0.0
    # --- user environments, datasets, verifiers (README "Train on your own task")
    # free-form, passed to a user's env class on the broker (`tasks(options)`) and actor
    # (`options`); the verifiers adapter reads `taskset` (and `taskset_config`) from it
    options: dict[str, Any] = msgspec.field(default_factory=dict)
    # dataset: a JSONL file, a parquet file or a `datasets` save_to_disk directory; rows
    # have `prompt` (text) or `messages` (chat), optionally `family`, and any other fields
    path: str = ""
    reward: str = "turn"  # dataset: "pkg.module:score", score(completion, row) -> float
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
        if ":" not in self.reward:  # with one: the dataset env's reward function
            _check_choice(self, "reward", ("turn", "pass"))
        _check_choice(self, "rg_answer", ("marker", "first_number"))
        if self.action_tokens < 1:
            raise ValueError("action_tokens must be >= 1")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError("eval_fraction must be in [0, 1)")
        if min(self.max_turns, self.max_tokens) < 1:
            raise ValueError("max_turns and max_tokens must be >= 1")
