"""`verifiers`: one task of a verifiers (0.4) taskset, scored offline by the task's rewards.

headrace's own engine generates the reply (token in / token out, as every episode); verifiers
only scores it. The task is rebuilt from its data (JSON in the payload) with the taskset's
task class and config (shared/verifiers_taskset.py); the opening is its system prompt and
prompt. After the one reply, a verifiers `Trace` holding the conversation (the reply as a
sampled assistant message) goes through `Task.score`, which runs the task's `@vf.reward`
methods and the config's plugged reward functions and judges that need no runtime; the
episode's reward is the trace's weighted sum (`Trace.reward`), each reward also in the turn's
info. verifiers 0.4 has no separate parser: reward functions read `trace.last_reply` and
parse it themselves (e.g. `vf.extract_boxed_answer`).

Not supported: tools, multi-turn harnesses, runtimes (containers, sandboxes): rewards that
require a runtime are skipped by verifiers itself, with a log line. A scoring error ends the
episode as env_error.
"""

from __future__ import annotations

import hashlib
from typing import Any

from shared.env_api import EnvError, Opening, ParsedAction, StepResult, TextEnv
from shared.env_loader import EnvLoadError
from shared.verifiers_taskset import load_taskset, opening_messages, taskset_class


class VerifiersEnv(TextEnv):
    name = "verifiers"
    success_threshold = 1.0

    def __init__(self, payload: dict, episode_seed: int, options: dict | None = None) -> None:
        super().__init__(payload, episode_seed, options)
        try:
            self.spec = str(payload["taskset"])
            self.config_json = str(payload.get("config", "{}"))
            self.data_json = str(payload["data"])
        except KeyError as e:
            raise EnvError(f"verifiers: bad task payload: missing {e}") from None
        self.key = hashlib.blake2b(self.data_json.encode(), digest_size=8).hexdigest()
        self.messages: list[dict[str, str]] = []

    async def reset(self) -> Opening:
        try:
            cls = taskset_class(self.spec)
            task_cls = cls.task_type()
            self.data = task_cls.data_type().model_validate_json(self.data_json)
            config = _task_config(self.spec, self.config_json)
            self.task = task_cls(self.data, config)
        except EnvLoadError as e:
            raise EnvError(str(e)) from e
        except Exception as e:  # pydantic validation of the data: the task is broken
            raise EnvError(f"verifiers task of {self.spec}: {e}") from e
        self.messages = opening_messages(self.data)
        if not self.messages:
            raise EnvError(f"verifiers task of {self.spec} has no prompt")
        return self.messages

    async def step(self, action: ParsedAction) -> StepResult:
        trace = self._trace(action.action)
        try:
            await self.task.score(trace)
        except Exception as e:
            raise EnvError(f"verifiers scoring raised {e!r}") from e
        info = {k: float(r.score) for k, r in trace.rewards.items() if r is not None}
        return StepResult(
            observation="", reward=float(trace.reward), done=True, state_key=self.key, info=info
        )

    def _trace(self, completion: str) -> Any:
        import verifiers.v1 as vf
        from verifiers.v1.configs.agent import AgentConfig

        kinds = {
            "system": vf.SystemMessage,
            "user": vf.UserMessage,
            "assistant": vf.AssistantMessage,
        }
        nodes = []
        for i, m in enumerate(self.messages):
            msg = kinds.get(m["role"], vf.UserMessage)(content=m["content"])
            nodes.append(vf.MessageNode(parent=i - 1 if i else None, message=msg))
        reply = vf.AssistantMessage(content=completion)
        nodes.append(vf.MessageNode(parent=len(nodes) - 1, message=reply, sampled=True))
        return vf.Trace(
            task=vf.TraceTask(type=type(self.task).__name__, data=self.data),
            agent=vf.AgentInfo(config=AgentConfig()),
            nodes=nodes,
        )


def _task_config(spec: str, config_json: str) -> Any:
    """The taskset's per-task config (plugged rewards, judges), from its taskset config."""
    return _taskset(spec, config_json).config.task


_TASKSETS: dict[tuple[str, str], Any] = {}


def _taskset(spec: str, config_json: str) -> Any:
    # Built once per (taskset, config) in a process: its constructor only stores the config,
    # its `load()` (which may read data) is never called on the actor.
    key = (spec, config_json)
    if key not in _TASKSETS:
        _TASKSETS[key] = load_taskset(spec, config_json)
    return _TASKSETS[key]
