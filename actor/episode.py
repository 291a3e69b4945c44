"""One multi-turn episode, token in / token out.

The episode's token ids only ever grow: the first observation (with BOS), then each turn's
generated tokens exactly as sampled, then the next observation's tokens. Each turn's prompt is
that list itself (a vLLM `TokensPrompt`), so the model sees what the learner will train on and
no text is ever re-tokenized.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from actor.engine import Engine
from actor.envs.base import Env, EnvError, Generation, Tokenizer
from shared import protocol as P
from shared.protocol import Role


@dataclass
class EpisodeBuffer:
    token_ids: list[int] = field(default_factory=list)
    role: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    behav_logprob: list[float] = field(default_factory=list)
    policy_version: list[int] = field(default_factory=list)
    turn_idx: list[int] = field(default_factory=list)

    def extend_context(self, ids: list[int], role: Role, turn: int, version: int) -> None:
        n = len(ids)
        self.token_ids += ids
        self.role += [role] * n
        self.loss_mask += [0] * n
        self.behav_logprob += [0.0] * n
        self.policy_version += [version] * n
        self.turn_idx += [turn] * n

    def extend_generated(
        self,
        ids: list[int],
        logprobs: list[float],
        versions: list[int],
        roles: list[int],
        turn: int,
    ) -> None:
        self.token_ids += ids
        self.role += roles
        self.loss_mask += [1] * len(ids)
        self.behav_logprob += logprobs
        self.policy_version += versions
        self.turn_idx += [turn] * len(ids)

    def clip(self, n: int) -> None:
        """Keep the first `n` tokens. Generated tokens always fit (each turn generates at
        most the room left), so what goes is context no later turn will read: the tail of an
        observation that overflowed max_model_len, which the broker would refuse as too long."""
        for name in ("token_ids", "role", "loss_mask", "behav_logprob", "policy_version"):
            del getattr(self, name)[n:]
        del self.turn_idx[n:]


def decode_pieces(tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


def special_prefix(tokenizer: Tokenizer) -> list[int]:
    """The special tokens the tokenizer itself puts before a text: BOS for Llama-style
    tokenizers, nothing for GPT-2-style ones (SmolLM2, the tiny test model). An episode's
    prompt starts with exactly these, as `tokenizer(text)` would give. (Prefixing
    `bos_token_id` whenever one was defined gave GPT-2-style models a prompt their tokenizer
    never makes; on the tiny model that token alone kept credit runs at chance, README.)"""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i]
    return []


async def run_episode(
    engine: Engine,
    env: Env,
    tokenizer: Tokenizer,
    lease: P.Lease,
    actor_id: str,
    *,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    max_model_len: int,
    prefix_ids: Sequence[int],
    needs_text: bool = False,
) -> P.Trajectory:
    t0 = time.monotonic()
    buf = EpisodeBuffer()
    turns: list[P.TurnInfo] = []
    termination = P.Termination.MAX_TURNS
    try:
        obs = await env.reset()
        ids = [*prefix_ids, *tokenizer.encode(obs, add_special_tokens=False)]
        buf.extend_context(ids, Role.PROMPT, 0, engine.version)
        gen_seconds = 0.0
        for turn in range(env.max_turns):
            limits = env.limits()
            room = max_model_len - len(buf.token_ids)
            if room <= 0:
                termination = P.Termination.MAX_TOKENS
                break
            tg = time.monotonic()
            out = await engine.generate(
                list(buf.token_ids),
                max_tokens=min(limits.max_tokens, room),
                temperature=temperature,
                top_p=top_p,
                top_k=top_k if top_k > 0 else -1,  # vLLM: -1 is off
                stop_token_ids=limits.stop_token_ids,
                ignore_eos=limits.ignore_eos,
            )
            gen_seconds += time.monotonic() - tg
            pieces = decode_pieces(tokenizer, out.token_ids) if needs_text else []
            action = env.parse_action(Generation(out.token_ids, pieces))
            roles = [Role.REASONING] * len(out.token_ids)
            for i in range(*action.span):
                roles[i] = Role.ACTION
            buf.extend_generated(out.token_ids, out.logprobs, out.versions, roles, turn)
            result = await env.step(action)
            turns.append(
                P.TurnInfo(
                    reward=result.reward,
                    done=result.done,
                    truncated=result.truncated,
                    action_valid=action.valid,
                    state_key=result.state_key,
                    action=action.action,
                )
            )
            if result.done or result.truncated:
                termination = P.Termination.DONE if result.done else P.Termination.MAX_TURNS
                break
            obs_ids = tokenizer.encode(result.observation, add_special_tokens=False)
            buf.extend_context(obs_ids, Role.OBSERVATION, turn + 1, engine.version)
            if len(buf.token_ids) >= max_model_len:
                termination = P.Termination.MAX_TOKENS
                break
    except EnvError:
        termination = P.Termination.ENV_ERROR

    buf.clip(max_model_len)
    rewards = [t.reward for t in turns]
    outcome = env.outcome(rewards)
    return P.Trajectory(
        traj_id=uuid.uuid4().hex,
        group_id=lease.lease_id,
        task_id=lease.task.task_id,
        env=lease.task.env,
        actor_id=actor_id,
        lease_id=lease.lease_id,
        token_ids=P.pack(buf.token_ids, "token_ids"),
        role=P.pack(buf.role, "role"),
        loss_mask=P.pack(buf.loss_mask, "loss_mask"),
        behav_logprob=P.pack(buf.behav_logprob, "behav_logprob"),
        policy_version=P.pack(buf.policy_version, "policy_version"),
        turn_idx=P.pack(buf.turn_idx, "turn_idx"),
        turns=turns,
        outcome_reward=outcome,
        success=termination != P.Termination.ENV_ERROR and env.success(rewards),
        termination=termination,
        n_turns=len(turns),
        sampling={"temperature": temperature, "top_p": top_p, "top_k": float(top_k)},
        timings={"episode_s": time.monotonic() - t0, "generate_s": gen_seconds},
        sample_prob=lease.sample_prob,
        curator_version=lease.curator_version,
    )
