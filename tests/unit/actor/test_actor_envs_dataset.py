"""`[env] name = "dataset"`: the bank (JSONL, parquet, HF directories; bad rows; held-out
splits) and the environment (sync / async reward functions, a raising one, the step hook,
chat-message rows)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from actor.chat import ChatFormat
from actor.envs import make_env
from actor.envs.base import EnvError, Generation
from actor.episode import run_episode
from broker.curriculum.factory import make_bank
from shared import protocol as P
from shared.config import ConfigError, EnvConfig
from shared.protocol import Role
from tests.unit.actor.test_actor_envs_reasoning_gym import CharTokenizer, ScriptedEngine

R = "tests.unit.user_rewards"
ROWS = [
    {"prompt": "1 + 1 =", "answer": "2", "family": "add"},
    {"prompt": "3 - 1 =", "answer": "2", "family": "sub"},
    {
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "2+2"},
        ],
        "answer": "4",
    },
]


def write_jsonl(path: Path, rows: list, extra_lines: list[str] = ()) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(extra_lines))
    return path


def bank_of(path: Path, **kw):
    return make_bank(EnvConfig(name="dataset", path=str(path), reward=f"{R}:exact", **kw))


def bad_rows_metric(reason: str) -> float:
    value = REGISTRY.get_sample_value("headrace_broker_dataset_bad_rows_total", {"reason": reason})
    return value or 0.0


def test_jsonl_rows_become_tasks_by_family_carrying_the_row(tmp_path) -> None:
    bank = bank_of(write_jsonl(tmp_path / "d.jsonl", ROWS), max_tokens=7, step=f"{R}:again")
    assert [(f.name, f.size) for f in bank.families()] == [("add", 1), ("sub", 1), ("default", 1)]
    task = bank.task("ds-default-0")
    assert task.env == "dataset"
    assert json.loads(str(task.payload["row"])) == ROWS[2]  # the row itself, not an index
    assert task.payload["reward"] == f"{R}:exact" and task.payload["step"] == f"{R}:again"
    assert task.payload["max_tokens"] == 7
    limits = make_env(task, 0).limits()
    assert limits.max_tokens == 7 and not limits.ignore_eos
    fixed = bank_of(write_jsonl(tmp_path / "d.jsonl", ROWS), max_tokens=3, fixed_length=True)
    assert make_env(fixed.tasks[0], 0).limits().ignore_eos


def test_bad_rows_are_named_counted_and_skipped(tmp_path, caplog) -> None:
    before = {r: bad_rows_metric(r) for r in ("unparsable", "no_prompt", "bad_prompt")}
    lines = [
        "{not json\n",
        json.dumps({"answer": "1"}) + "\n",
        json.dumps({"prompt": 5}) + "\n",
        json.dumps({"messages": "hi"}) + "\n",
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n",
        json.dumps({"prompt": "x", "family": ["a"]}) + "\n",
        json.dumps([1, 2]) + "\n",
        "\n",  # blank lines are not rows
    ]
    with caplog.at_level(logging.WARNING):
        bank = bank_of(write_jsonl(tmp_path / "d.jsonl", ROWS[:1], lines))
    assert len(bank) == 1
    rows = [(n, reason.split(":")[0]) for _, n, reason in bank.bad_rows]
    assert [n for n, _ in rows] == [2, 3, 4, 5, 6, 7, 8]  # JSONL line numbers
    assert "unparsable JSON" in bank.bad_rows[0][2]
    assert "neither `prompt` nor `messages`" in bank.bad_rows[1][2]
    assert "row 4 skipped: `prompt` must be a non-empty string" in caplog.text
    assert "dataset: 7 bad rows skipped (first: " in caplog.text
    for reason in before:
        assert bad_rows_metric(reason) == before[reason] + 1


def test_parquet_and_hf_datasets_directories(tmp_path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = [
        {"prompt": f"q{i}", "answer": str(i), "family": "f" if i % 2 else "g"} for i in range(6)
    ]
    pq.write_table(pa.Table.from_pylist(flat), tmp_path / "d.parquet")
    datasets.Dataset.from_list(flat).save_to_disk(str(tmp_path / "hf"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(flat[:2])}).save_to_disk(
        str(tmp_path / "hfdict")
    )
    for path, n in [("d.parquet", 6), ("hf", 6), ("hfdict", 2)]:
        bank = bank_of(tmp_path / path)
        assert len(bank) == n, path
        rows = [json.loads(str(t.payload["row"])) for t in bank.tasks]
        assert sorted(r["prompt"] for r in rows) == sorted(r["prompt"] for r in flat[:n]), path
    msgs = [{"messages": [{"role": "user", "content": "hi"}], "answer": "x"}]
    datasets.Dataset.from_list(msgs).save_to_disk(str(tmp_path / "chat"))
    (task,) = list(bank_of(tmp_path / "chat").tasks)
    assert json.loads(str(task.payload["row"]))["messages"] == msgs[0]["messages"]


def test_eval_fraction_is_deterministic_and_disjoint_and_eval_path_is_used(tmp_path) -> None:
    rows = [{"prompt": f"question {i}", "answer": str(i)} for i in range(200)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    a, b = bank_of(path, eval_fraction=0.2, seed=1), bank_of(path, eval_fraction=0.2, seed=1)

    def prompts(tasks) -> list[str]:
        return [json.loads(str(t.payload["row"]))["prompt"] for t in tasks]

    held = prompts(a.heldout(1000)["default"])
    train = prompts(a.tasks)
    assert 20 <= len(held) <= 60 and len(held) + len(train) == 200
    assert not set(held) & set(train)
    assert held == prompts(b.heldout(1000)["default"]) and train == prompts(b.tasks)
    other = prompts(bank_of(path, eval_fraction=0.2, seed=2).heldout(1000)["default"])
    assert other != held  # the seed chooses the split
    assert len(a.heldout(5)["default"]) == 5
    assert bank_of(path).heldout(5) == {}  # no eval_fraction, no eval_path: nothing held out

    evals = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "held", "answer": "1", "family": "x"}])
    c = bank_of(path, eval_path=str(evals))
    assert len(c) == 200 and prompts(c.heldout(3)["x"]) == ["held"]


def test_config_errors(tmp_path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    for cfg in [
        EnvConfig(name="dataset", reward=f"{R}:exact"),  # no path
        EnvConfig(name="dataset", path=str(tmp_path / "missing.jsonl"), reward=f"{R}:exact"),
        EnvConfig(name="dataset", path=str(path)),  # no reward function
        EnvConfig(name="dataset", path=str(write_jsonl(tmp_path / "e.jsonl", [{}])), reward="a:b"),
    ]:
        with pytest.raises(ConfigError):
            make_bank(cfg)


async def play(task: P.TaskSpec, replies: list[str], chat: ChatFormat | None = None, tok=None):
    lease = P.Lease(lease_id="L", task=task, group_size=1, deadline_s=60)
    env = make_env(task, 0, {})
    return await run_episode(
        ScriptedEngine(replies),
        env,
        tok or CharTokenizer(),
        lease,
        "a",
        temperature=1.0,
        max_model_len=4096,
        needs_text=env.needs_text,
        chat=chat,
    )


def task_with(tmp_path: Path, reward: str, rows=ROWS, **kw) -> P.TaskSpec:
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = EnvConfig(name="dataset", path=str(path), reward=f"{R}:{reward}", **kw)
    return make_bank(cfg).tasks[0]


async def test_sync_and_async_reward_functions_score_the_reply(tmp_path) -> None:
    for reward in ("exact", "exact_async"):
        task = task_with(tmp_path, reward)
        right, wrong = await play(task, ["2"]), await play(task, ["3"])
        assert right.outcome_reward == 1.0 and right.success, reward
        assert wrong.outcome_reward == 0.0 and not wrong.success, reward
        assert right.termination == P.Termination.DONE
        ids, role = right.array("token_ids"), right.array("role")
        assert "".join(chr(i) for i in ids[role == Role.ACTION]) == "2"
        assert "".join(chr(i) for i in ids[role == Role.PROMPT]) == "1 + 1 ="


async def test_a_raising_or_non_numeric_reward_function_is_an_env_error(tmp_path) -> None:
    for reward in ("broken", "not_a_number", "missing_function"):
        traj = await play(task_with(tmp_path, reward), ["2"])
        assert traj.termination == P.Termination.ENV_ERROR and not traj.success, reward
    env = make_env(task_with(tmp_path, "broken"), 0)
    await env.reset()
    with pytest.raises(EnvError, match="ZeroDivisionError"):
        await env.step(env.parse_action(Generation([1], ["2"])))


async def test_the_step_hook_asks_again_until_right_or_out_of_turns(tmp_path) -> None:
    task = task_with(tmp_path, "exact", step=f"{R}:again", max_turns=3)
    traj = await play(task, ["5", "2", "unused"])
    assert [t.reward for t in traj.turns] == [0.0, 1.0] and traj.success
    ids, role = traj.array("token_ids"), traj.array("role")
    assert "wrong (0), try again" in "".join(chr(i) for i in ids[role == Role.OBSERVATION])
    out = await play(task, ["5", "6", "7"])
    assert out.n_turns == 3 and out.outcome_reward == 0.0
    assert (await play(task_with(tmp_path, "exact", step=f"{R}:again"), ["5"])).n_turns == 1


async def test_a_messages_row_opens_with_its_conversation_under_the_chat_template(tmp_path) -> None:
    from tests.chat_tokenizers import llama3_tokenizer

    tok = llama3_tokenizer()
    rows = [
        {
            "messages": ROWS[2]["messages"]
            + [{"role": "assistant", "content": "5"}, {"role": "user", "content": "No: 2+2"}],
            "answer": "4",
        }
    ]
    task = task_with(tmp_path, "exact", rows=rows)
    fmt = ChatFormat(tok, tok.chat_template, system_prompt="Ignored: the row has its own.")
    opening = fmt.opening(rows[0]["messages"])
    whole = tok.apply_chat_template(rows[0]["messages"], tokenize=False, add_generation_prompt=True)
    assert opening.ids == list(tok(whole, add_special_tokens=False)["input_ids"])
    pairs = zip(opening.ids, opening.roles, strict=True)
    prompt_text = tok.decode([i for i, r in pairs if r == Role.PROMPT])
    for m in rows[0]["messages"]:
        assert m["content"] in prompt_text
    assert "<|start_header_id|>" not in prompt_text  # the template's own tokens stay template
    # the config's system prompt goes first when the row has none
    plain = fmt.opening([{"role": "user", "content": "hi"}])
    assert plain.ids == fmt.opening("hi").ids

    class TextTok:  # no chat template: the messages' texts, joined by blank lines
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    traj = await play(task, ["4"], tok=TextTok())
    assert traj.success
    text = "".join(chr(i) for i in traj.array("token_ids")[traj.array("role") == Role.PROMPT])
    assert text == "Be terse.\n\n2+2\n\n5\n\nNo: 2+2"
    assert np.all(traj.array("loss_mask")[traj.array("role") == Role.PROMPT] == 0)
