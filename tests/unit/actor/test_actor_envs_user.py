"""Users' environments by import path and by entry point, `[env.options]` on both sides, and
`heldout` on every bank (README "Train on your own task")."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from actor.envs import make_env
from actor.envs.base import EnvError, Generation
from broker.curriculum.banks import SymbolsBank
from broker.curriculum.factory import make_bank
from broker.curriculum.gym_banks import ReasoningGymBank, TextArenaBank
from shared import protocol as P
from shared.config import (
    ConfigError,
    EnvConfig,
    ReasoningGymConfig,
    SymbolsConfig,
    TextArenaConfig,
)
from tests.unit import user_env_module as U

ECHO = "tests.unit.user_env_module:EchoEnv"
OPTIONS = {"words": ["yes", "ok", "answer"], "repeat": 4, "say": "please say"}


def reply(text: str) -> Generation:
    words = text.split(" ")
    return Generation(
        list(range(len(words))), [w if i == 0 else " " + w for i, w in enumerate(words)]
    )


async def play(task, options, text: str) -> tuple[str, float]:
    env = make_env(task, 0, options)
    first = await env.reset()
    result = await env.step(env.parse_action(reply(text)))
    return first, result.reward


async def test_an_env_by_import_path_gives_its_tasks_and_plays_them_with_the_options() -> None:
    U.SEEN_OPTIONS.clear()
    bank = make_bank(EnvConfig(name=ECHO, options=OPTIONS))
    assert U.SEEN_OPTIONS == [OPTIONS]  # the broker side got [env.options]
    # families in order of first appearance, difficulty their tasks' mean
    assert [(f.name, f.size, f.difficulty) for f in bank.families()] == [
        ("long", 8, 4.5),
        ("short", 4, 2.0),
    ]
    task = bank.task(f"{ECHO}-short-1")
    assert task.env == ECHO and task.family == "short" and task.payload["word"] == "ok"
    assert json.loads(str(task.payload["meta"])) == {"i": 1}
    first, reward = await play(task, OPTIONS, "ok then")
    assert first == "please say ok" and reward == 1.0  # the actor side got them too
    assert (await play(task, {}, "no"))[1] == 0.0


async def test_an_env_by_entry_point(tmp_path, monkeypatch) -> None:
    dist = tmp_path / "fake_headrace_env-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-headrace-env\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[headrace.envs]\necho-ep = {ECHO}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    bank = make_bank(EnvConfig(name="echo-ep", options={"words": ["yes"], "repeat": 1}))
    (task,) = list(bank.tasks)
    assert task.env == "echo-ep" and task.task_id == "echo_ep-long-0"
    assert bank.task(task.task_id) == task
    assert (await play(task, {}, "yes"))[1] == 1.0
    with pytest.raises(ConfigError, match="no task bank"):
        make_bank(EnvConfig(name="not-an-entry-point"))


def test_bad_user_envs_are_config_errors() -> None:
    for name, match in [
        ("tests.unit.user_env_module:NotAnEnv", "not a subclass"),
        ("tests.unit.user_env_module:Nope", "has no"),
        ("tests.unit.no_such_module:Env", "cannot import"),
        ("tests.unit.user_env_module:BadPayloadEnv", "flat str / int / float"),
    ]:
        with pytest.raises(ConfigError, match=match):
            make_bank(EnvConfig(name=name))
    with pytest.raises(EnvError, match="unknown environment"):
        make_env(P.TaskSpec(task_id="x", env="nope"), 0)


def test_user_heldout_tasks_given_or_split_by_eval_fraction() -> None:
    held = make_bank(EnvConfig(name="tests.unit.user_env_module:HeldEnv")).heldout(5)
    assert {f: [t.payload["word"] for t in ts] for f, ts in held.items()} == {"default": ["z"]}
    (z,) = held["default"]
    assert z.task_id.endswith("-default-3")  # numbered after the 3 training tasks
    opts = {"words": [f"w{i}" for i in range(40)], "repeat": 2}
    cfg = EnvConfig(name=ECHO, options=opts, eval_fraction=0.25, seed=3)
    a, b = make_bank(cfg), make_bank(cfg)
    train = {(t.payload["word"], t.payload["k"]) for t in a.tasks}
    out = [(t.payload["word"], t.payload["k"]) for ts in a.heldout(1000).values() for t in ts]
    assert out and len(train) + len(out) == 80 and not train & set(out)
    assert out == [
        (t.payload["word"], t.payload["k"]) for ts in b.heldout(1000).values() for t in ts
    ]
    for t in (t for ts in a.heldout(1000).values() for t in ts):
        with pytest.raises(KeyError):
            a.task(t.task_id)  # training never leases a held-out task


def test_heldout_on_every_procedural_bank() -> None:
    env = EnvConfig(
        symbols=SymbolsConfig(levels=[1, 5], tasks_per_level=8),
        reasoning_gym=ReasoningGymConfig(
            datasets=["chain_sum"], difficulties=["easy"], tasks_per_family=5
        ),
        textarena=TextArenaConfig(games=["guess_the_number.easy"], tasks_per_family=4),
        mixed=["symbols", "reasoning_gym", "textarena", ECHO],
        options={"words": ["yes"], "repeat": 8},
        eval_fraction=0.5,
    )
    banks = [SymbolsBank(env), ReasoningGymBank(env), TextArenaBank(env)]
    mixed = make_bank(msgspec_replace(env, name="mixed"))
    for bank in [*banks, mixed]:
        held = bank.heldout(3)
        if bank is not mixed:  # procedural: every family, n each
            assert set(held) == {f.name for f in bank.families()}
            assert all(len(ts) == 3 for ts in held.values())
        train_ids = {t.task_id for t in bank.tasks}
        for family, tasks in held.items():
            assert len(tasks) <= 3 and all(t.family == family for t in tasks)
            assert not {t.task_id for t in tasks} & train_ids
            for t in tasks:
                with pytest.raises(KeyError):
                    bank.task(t.task_id)
    sym = SymbolsBank(env).heldout(2)["L5"]
    assert [t.task_id for t in sym] == ["symbols-L5-8", "symbols-L5-9"]
    seeds = {t.payload["seed"] for t in SymbolsBank(env).tasks}
    assert not seeds & {t.payload["seed"] for t in sym}
    assert SymbolsBank(env).heldout(0) == {"L1": [], "L5": []}


def msgspec_replace(env: EnvConfig, **kw) -> EnvConfig:
    import msgspec

    return msgspec.structs.replace(env, **kw)


def test_the_broker_side_of_user_code_imports_no_heavy_stack(tmp_path, repo_root) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "1 + 1 =", "answer": "2"}\n')
    code = textwrap.dedent(f"""
        import sys
        from broker.curriculum.factory import make_bank
        from shared.config import EnvConfig, load_config
        make_bank(EnvConfig(name={ECHO!r}))
        reward = "tests.unit.user_rewards:exact"
        make_bank(EnvConfig(name="dataset", path={str(rows)!r}, reward=reward))
        make_bank(load_config("examples/my_task/config.toml").env)
        heavy = ("torch", "vllm", "transformers", "actor", "datasets")
        heavy = [m for m in heavy if m in sys.modules]
        assert not heavy, heavy
        print("light")
    """)
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and "light" in res.stdout, res.stderr[-2000:]


def test_an_actor_without_the_users_module_exits_2_at_start(tmp_path, tiny_model) -> None:
    """Not one failed episode per lease, forever: the actor refuses to start, in one line."""
    from actor.envs import check_env

    with pytest.raises(ConfigError, match="no_such_pkg"):
        check_env(EnvConfig(name="no_such_pkg.envs:Task"))
    with pytest.raises(ConfigError, match="reward"):
        check_env(EnvConfig(name="dataset", reward="no_such_pkg.rewards:score"))
    check_env(EnvConfig(name="tests.unit.user_env_module:EchoEnv"))  # importable: fine
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[model]\npath = "{tiny_model}"\n[env]\nname = "no_such_pkg.envs:Task"\n')
    argv = [sys.executable, "-m", "actor", "--config", str(cfg), "--broker", "tcp://127.0.0.1:9"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "no_such_pkg" in res.stderr.strip().splitlines()[-1]
