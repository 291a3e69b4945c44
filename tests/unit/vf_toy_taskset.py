"""A small verifiers (0.4) taskset for tests/unit/actor/test_actor_envs_verifiers.py: in-memory
sums, an exact-answer reward and a weighted format reward, as a rubric would have."""

from __future__ import annotations

import verifiers.v1 as vf


class SumData(vf.TaskData):
    answer: str = ""
    level: str = "easy"


class SumTask(vf.Task[SumData]):
    @vf.reward
    async def exact(self, task: SumData, trace: vf.Trace) -> float:
        return float(trace.last_reply == task.answer)

    @vf.reward(weight=0.5)
    async def is_number(self, task: SumData, trace: vf.Trace) -> float:
        if trace.last_reply == "boom":
            raise RuntimeError("the scorer broke")
        return float(trace.last_reply.lstrip("-").isdigit())


class SumTaskset(vf.Taskset[SumTask]):
    def load(self):
        for a in range(6):
            for b in range(4):
                data = SumData(
                    prompt=f"{a} + {b} =",
                    answer=str(a + b),
                    system_prompt="Reply with the number.",
                    level="easy" if a + b < 5 else "hard",
                )
                yield SumTask(data)
        chat = [vf.UserMessage(content="10 + 1 ="), vf.AssistantMessage(content="12")]
        chat.append(vf.UserMessage(content="No. 10 + 1 ="))
        yield SumTask(SumData(prompt=chat, answer="11", level="chat"))


__all__ = ["SumTaskset"]
