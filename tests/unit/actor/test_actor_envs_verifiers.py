"""The verifiers adapter: a verifiers 0.4 taskset's tasks as a bank, each reply headrace's
engine generated scored offline by the task's own rewards (tests/unit/vf_toy_taskset.py)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("verifiers.v1")

from actor.envs import make_env  # noqa: E402
from actor.episode import run_episode  # noqa: E402
from broker.curriculum.factory import make_bank  # noqa: E402
from shared import protocol as P  # noqa: E402
from shared.config import ConfigError, EnvConfig  # noqa: E402
from shared.protocol import Role  # noqa: E402
from tests.unit.actor.test_actor_envs_reasoning_gym import CharTokenizer, ScriptedEngine  # noqa: E402

TASKSET = "tests.unit.vf_toy_taskset:SumTaskset"


def bank(**kw):
    options = {"taskset": TASKSET, "family_field": "level", **kw.pop("options", {})}
    return make_bank(EnvConfig(name="verifiers", options=options, max_tokens=9, **kw))


async def play(task: P.TaskSpec, reply: str) -> P.Trajectory:
    env = make_env(task, 0, {})
    return await run_episode(
        ScriptedEngine([reply]),
        env,
        CharTokenizer(),
        P.Lease(lease_id="L", task=task, group_size=1, deadline_s=60),
        "a",
        temperature=1.0,
        max_model_len=4096,
        needs_text=env.needs_text,
    )


def test_the_tasksets_tasks_become_a_bank_grouped_by_a_data_field() -> None:
    b = bank()
    assert {f.name: f.size for f in b.families()} == {"easy": 14, "hard": 10, "chat": 1}
    task = b.task("vf-easy-0")
    assert task.env == "verifiers" and task.payload["taskset"] == TASKSET
    data = json.loads(str(task.payload["data"]))
    assert data["prompt"] == "0 + 0 =" and data["answer"] == "0"  # the task's data travels
    assert task.payload["max_tokens"] == 9
    assert [f.name for f in bank(options={"family_field": ""}).families()] == ["default"]


async def test_replies_are_scored_by_the_tasks_rewards() -> None:
    task = bank().task("vf-easy-3")  # 0 + 3
    right, number, words = await play(task, "3"), await play(task, "7"), await play(task, "three")
    assert right.outcome_reward == 1.5 and right.success  # exact 1 + 0.5 x is_number 1
    assert number.outcome_reward == 0.5 and not number.success
    assert words.outcome_reward == 0.0
    assert right.turns[0].action == "3" and right.termination == P.Termination.DONE
    ids, role = right.array("token_ids"), right.array("role")
    # raw-text prompts (no chat template): system prompt and prompt, joined
    assert "".join(chr(i) for i in ids[role == Role.PROMPT]) == "Reply with the number.\n\n0 + 3 ="


async def test_a_chat_prompt_and_a_failing_reward() -> None:
    task = bank().task("vf-chat-0")
    traj = await play(task, "11")
    assert traj.outcome_reward == 1.5
    ids, role = traj.array("token_ids"), traj.array("role")
    assert "".join(chr(i) for i in ids[role == Role.PROMPT]) == "10 + 1 =\n\n12\n\nNo. 10 + 1 ="
    assert (await play(task, "boom")).termination == P.Termination.ENV_ERROR


def test_heldout_and_config_errors() -> None:
    a, b = bank(eval_fraction=0.3, seed=1), bank(eval_fraction=0.3, seed=1)
    held = [t.payload["data"] for ts in a.heldout(100).values() for t in ts]
    train = [t.payload["data"] for t in a.tasks]
    assert held and len(held) + len(train) == 25 and not set(held) & set(train)
    assert held == [t.payload["data"] for ts in b.heldout(100).values() for t in ts]
    for options in [{}, {"taskset": "tests.unit.vf_toy_taskset:SumData"}]:
        with pytest.raises(ConfigError):
            make_bank(EnvConfig(name="verifiers", options=options))
    with pytest.raises(ConfigError, match="taskset"):
        make_bank(EnvConfig(name="verifiers", options={"taskset": "no_such_taskset_pkg"}))


async def test_a_taskset_by_its_verifiers_id(monkeypatch, repo_root) -> None:
    # verifiers resolves an id to an installed module exporting its Taskset in `__all__`
    monkeypatch.syspath_prepend(str(repo_root / "tests" / "unit"))
    b = make_bank(EnvConfig(name="verifiers", options={"taskset": "vf_toy_taskset"}))
    task = b.task("vf-default-3")
    assert task.payload["taskset"] == "vf_toy_taskset"
    assert (await play(task, "3")).outcome_reward == 1.5
