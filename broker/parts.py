"""What `Broker` (broker/server.py) provides to the handler mixins it is built from
(`actor_side.ActorSide`, `learner_side.LearnerSide`)."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from broker.replay import GroupItem
from shared import protocol as P


class BrokerParts:
    async def _send(self, ident: bytes, msg: P.Base) -> None:
        raise NotImplementedError

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        raise NotImplementedError

    def _retire(self, removals: list[tuple[GroupItem, str]]) -> None:
        raise NotImplementedError

    def _update_gauges(self) -> None:
        raise NotImplementedError
