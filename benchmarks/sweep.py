"""Synchronous sweeps of learner settings on `symbols`, without vLLM or sockets.

The pipeline benchmarks (credit.py, `make demo`) take minutes per run; choosing defaults
needs many runs. This loop plays the real `SymbolsEnv` episodes, samples each token from the
learner's own model in torch (on-policy: no staleness, the actor's token layout and roles,
with the tokenizer's own special prefix: none for the tiny model), and calls the real
`Trainer.step`, so one 150-step run of the demo's task takes about a minute. Its figures
measure learning speed per step; the pipeline adds off-policy staleness, which `headrace run`
then confirms or refutes.

    python benchmarks/sweep.py '{"env": {...}, "learner": {...}, "steps": 150, "seed": 0}'

`env` and `learner` are `[env]` / `[learner]` tables; `groups` (default 8) is groups per
step of 8 episodes; the tiny model is built with `seed`. Prints the 10-step mean reward and
action entropy every 10 steps and, last, one JSON line: `final` (mean reward of the last 10
steps), `steps_to_0.9` and `curve`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/...`

from actor.envs.base import Generation  # noqa: E402
from actor.envs.symbols import SymbolsEnv  # noqa: E402
from actor.episode import special_prefix  # noqa: E402
from benchmarks.harness import steps_to_threshold  # noqa: E402
from broker.curriculum.banks import SymbolsBank  # noqa: E402
from learner.build import build_trainer  # noqa: E402
from learner.tiny_model import build_tiny_model  # noqa: E402
from shared.config import Config, EnvConfig  # noqa: E402
from shared.protocol import Role, Trajectory, TurnInfo, pack  # noqa: E402

GROUP = 8


class Episodes:
    """A batch of episodes played in lockstep, token by token, left-padded."""

    def __init__(self, envs: list[SymbolsEnv], tok: Any) -> None:
        self.envs, self.tok = envs, tok
        self.loop = asyncio.new_event_loop()
        first = [self.loop.run_until_complete(e.reset()) for e in envs]
        self.ids = [special_prefix(tok) + tok.encode(o, add_special_tokens=False) for o in first]
        self.roles = [[int(Role.PROMPT)] * len(x) for x in self.ids]
        self.logp = [[0.0] * len(x) for x in self.ids]
        self.turn = [[0] * len(x) for x in self.ids]
        self.rewards: list[list[float]] = [[] for _ in envs]
        self.turns: list[list[TurnInfo]] = [[] for _ in envs]  # as the actor records them
        self.done = [False] * len(envs)

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, live: list[int], n: int) -> dict[int, list]:
        out: dict[int, list] = {i: [] for i in live}
        for _ in range(n):
            width = max(len(self.ids[i]) for i in live)
            x = torch.zeros(len(live), width, dtype=torch.long)
            mask = torch.zeros_like(x)
            for r, i in enumerate(live):
                x[r, width - len(self.ids[i]) :] = torch.tensor(self.ids[i])
                mask[r, width - len(self.ids[i]) :] = 1
            pos = (mask.cumsum(1) - 1).clamp_min(0)
            logits = model(input_ids=x, attention_mask=mask, position_ids=pos).logits[:, -1]
            logp = torch.log_softmax(logits.float(), -1)
            pick = torch.multinomial(logp.exp(), 1).squeeze(1)
            for r, i in enumerate(live):
                t = int(pick[r])
                self.ids[i].append(t)
                out[i].append((t, float(logp[r, t])))
        return out

    def play(self, model: torch.nn.Module) -> None:
        t = 0
        while not all(self.done):
            live = [i for i, d in enumerate(self.done) if not d]
            gen = self.generate(model, live, self.envs[live[0]].limits().max_tokens)
            for i in live:
                env, toks = self.envs[i], [g[0] for g in gen[i]]
                act = env.parse_action(Generation(toks, []))
                roles = [int(Role.REASONING)] * len(toks)
                roles[act.span[0] : act.span[1]] = [int(Role.ACTION)] * (act.span[1] - act.span[0])
                self.roles[i] += roles
                self.logp[i] += [g[1] for g in gen[i]]
                self.turn[i] += [t] * len(toks)
                res = self.loop.run_until_complete(env.step(act))
                self.rewards[i].append(res.reward)
                self.turns[i].append(
                    TurnInfo(
                        res.reward, res.done, res.truncated, act.valid, res.state_key, act.action
                    )
                )
                self.done[i] = res.done
                if not res.done:
                    obs = self.tok.encode(" " + res.observation, add_special_tokens=False)
                    self.ids[i] += obs
                    self.roles[i] += [int(Role.OBSERVATION)] * len(obs)
                    self.logp[i] += [0.0] * len(obs)
                    self.turn[i] += [t + 1] * len(obs)
            t += 1

    def trajectories(self, task_ids: list[str], version: int) -> list[Trajectory]:
        out = []
        for i, env in enumerate(self.envs):
            role = np.array(self.roles[i])
            mask = ((role == Role.REASONING) | (role == Role.ACTION)).astype(np.uint8)
            n = len(self.ids[i])
            out.append(
                Trajectory(
                    traj_id=f"t{version}-{i}",
                    group_id=f"g{version}-{i // GROUP}",
                    task_id=task_ids[i // GROUP],
                    env="symbols",
                    actor_id="sweep",
                    lease_id="sweep",
                    token_ids=pack(np.array(self.ids[i]), "token_ids"),
                    role=pack(role, "role"),
                    loss_mask=pack(mask, "loss_mask"),
                    behav_logprob=pack(np.array(self.logp[i]), "behav_logprob"),
                    policy_version=pack(np.full(n, version), "policy_version"),
                    turn_idx=pack(np.array(self.turn[i]), "turn_idx"),
                    turns=self.turns[i],
                    outcome_reward=env.outcome(self.rewards[i]),
                    success=env.success(self.rewards[i]),
                    termination="done",
                    n_turns=len(self.rewards[i]),
                )
            )
        return out


def main(spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    seed, steps, groups = (
        int(spec.get("seed", 0)),
        int(spec.get("steps", 150)),
        spec.get("groups", 8),
    )
    torch.set_num_threads(1)
    path = Path(tempfile.mkdtemp(prefix="headrace-sweep-")) / "tiny"
    build_tiny_model(path, seed)
    tok = AutoTokenizer.from_pretrained(path)
    bank = SymbolsBank(msgspec.convert({**spec["env"], "seed": seed}, EnvConfig))
    learner = {"steps": steps, "seed": seed, **spec.get("learner", {})}
    model_cfg = {"path": str(path), "seed": seed}
    cfg = msgspec.convert({"model": model_cfg, "learner": learner}, Config)
    trainer = build_trainer(cfg)  # as the learner process builds it (seeds every RNG too)
    model = trainer.model
    rng = np.random.default_rng(seed)
    rewards: list[float] = []
    t0 = time.time()
    for step in range(steps):
        tasks = [bank.task_at(int(g)) for g in rng.integers(len(bank), size=groups)]
        eps = Episodes([SymbolsEnv(dict(t.payload), k) for t in tasks for k in range(GROUP)], tok)
        eps.play(model)
        diag, _ = trainer.step(eps.trajectories([t.task_id for t in tasks], step), None, step)
        rewards.append(diag["reward_mean"])
        if step % 10 == 9:
            h = diag.get("entropy_action", float("nan"))
            print(
                f"{step + 1} reward {np.mean(rewards[-10:]):.3f} H_act {h:.3f} "
                f"{time.time() - t0:.0f}s",
                flush=True,
            )
    return {
        "final": round(float(np.mean(rewards[-10:])), 4),
        "steps_to_0.9": steps_to_threshold(rewards, 0.9),
        "curve": [round(r, 3) for r in rewards],
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
