"""Reward and step functions named by the dataset configs of
tests/unit/actor/test_actor_envs_dataset.py."""

from __future__ import annotations

import asyncio


def exact(completion: str, row: dict) -> float:
    return float(completion.strip() == row["answer"])


async def exact_async(completion: str, row: dict) -> float:
    await asyncio.sleep(0)
    return float(completion.strip() == row["answer"])


def broken(completion: str, row: dict) -> float:
    raise ZeroDivisionError("the scorer is broken")


def not_a_number(completion: str, row: dict) -> str:
    return "high"


def again(completion: str, row: dict, turn: int) -> str | None:
    """Ask once more after a wrong first answer."""
    return None if completion.strip() == row["answer"] else f"wrong ({turn}), try again"
