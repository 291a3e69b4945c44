"""One multi-turn episode, token in / token out.

The episode's token ids only ever grow: the first observation (with BOS), then each turn's
generated tokens exactly as sampled, then the next observation's tokens. Each turn's prompt is
that list itself (a vLLM `TokensPrompt`), so the model sees what the learner will train on and
no text is ever re-tokenized. With a chat template (actor/chat.py) the observations arrive as
messages: the template's own tokens around them have role `template`.

A generation that exhausts its token budget (or the room left in `max_model_len`) before its
stop token ends the episode: that turn is unscored and marked truncated, and the episode's
termination is `max_tokens`, which `[learner.advantage] mask_truncated` can mask. Environments
that generate a fixed number of tokens (`ignore_eos`) are exempt: their budget is the turn.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from actor.chat import OPENINGS_CACHED, ChatFormat, Tokens
from actor.engine import Engine, GenResult
from actor.envs.base import (
    Env,
    EnvError,
    Generation,
    GenerationLimits,
    Opening,
    ParsedAction,
    StepResult,
    Tokenizer,
)
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

    def extend_context(self, tokens: Tokens, turn: int, version: int) -> None:
        n = len(tokens.ids)
        self.token_ids += tokens.ids
        self.role += tokens.roles
        self.loss_mask += [0] * n
        self.behav_logprob += [0.0] * n
        self.policy_version += [version] * n
        self.turn_idx += [turn] * n

    def extend_generated(
        self,
        ids: list[int],
        logprobs: list[float],
        versions: list[int],
        roles: Sequence[int],
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


def _opening(obs: Opening, tokenizer: Tokenizer, chat: ChatFormat | None, prefix: Sequence[int]):
    if chat is not None:
        return chat.opening(obs)
    if not isinstance(obs, str):  # chat messages without a template: their texts, in order
        obs = "\n\n".join(m["content"] for m in obs)
    ids = list(_raw_opening(tokenizer.encode, obs, tuple(prefix)))  # the caller's to change
    return Tokens(ids, [int(Role.PROMPT)] * len(ids))


@functools.lru_cache(maxsize=OPENINGS_CACHED)
def _raw_opening(
    encode: Callable[..., list[int]], text: str, prefix: tuple[int, ...]
) -> tuple[int, ...]:
    """A text's opening tokens without a chat template. Cached as ChatFormat.opening is: a
    group's episodes all start from the same text, and tokenizing it was 4% of the actor's
    time on a tiny model's short episodes. `encode`: the tokenizer's bound method (hashable
    and equal for one tokenizer, where the Tokenizer protocol promises no hash)."""
    return (*prefix, *encode(text, add_special_tokens=False))


def _follow_up(
    result: StepResult, generated: list[int], tokenizer: Tokenizer, chat: ChatFormat | None
) -> Tokens:
    if chat is not None:
        return chat.follow_up(generated, result.observation, result.role)
    ids = tokenizer.encode(result.observation, add_special_tokens=False)
    return Tokens(ids, [int(Role.OBSERVATION)] * len(ids))


def _cut_short(out: GenResult, limits: GenerationLimits, room: int) -> bool:
    """The generation ran out of tokens before its stop token: of the room left in
    max_model_len always, of its own budget unless the environment asked for exactly that
    many tokens (`ignore_eos`)."""
    if out.finish_reason != "length":
        return False
    return len(out.token_ids) >= room or not limits.ignore_eos


def _action_view(out: GenResult, chat: ChatFormat | None, tokenizer, needs_text: bool):
    """What the environment's parser sees: the generation without the template's stop token."""
    ids = out.token_ids
    if chat is not None and ids and ids[-1] in chat.stop_token_ids:
        ids = ids[:-1]
    return Generation(ids, decode_pieces(tokenizer, ids) if needs_text else [])


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
    prefix_ids: Sequence[int] = (),
    needs_text: bool = False,
    chat: ChatFormat | None = None,
    seed: int | None = None,
) -> P.Trajectory:
    t0 = time.monotonic()
    buf = EpisodeBuffer()
    turns: list[P.TurnInfo] = []
    termination = P.Termination.MAX_TURNS
    gen_seconds = 0.0
    try:
        obs = await env.reset()
        buf.extend_context(_opening(obs, tokenizer, chat, prefix_ids), 0, engine.version)
        for turn in range(env.max_turns):
            limits = env.limits()
            room = max_model_len - len(buf.token_ids)
            if room <= 0:
                termination = P.Termination.MAX_TOKENS
                break
            stops = [*limits.stop_token_ids, *(chat.stop_token_ids if chat else [])]
            tg = time.monotonic()
            out = await engine.generate(
                list(buf.token_ids),
                max_tokens=min(limits.max_tokens, room),
                temperature=temperature,
                top_p=top_p,
                top_k=top_k if top_k > 0 else -1,  # vLLM: -1 is off
                stop_token_ids=stops,
                ignore_eos=limits.ignore_eos,
                seed=_turn_seed(seed, turn),
            )
            gen_seconds += time.monotonic() - tg
            action = env.parse_action(_action_view(out, chat, tokenizer, needs_text))
            roles = [Role.REASONING] * len(out.token_ids)
            for i in range(*action.span):
                roles[i] = Role.ACTION
            buf.extend_generated(out.token_ids, out.logprobs, out.versions, roles, turn)
            if _cut_short(out, limits, room):
                turns.append(P.TurnInfo(reward=0.0, done=False, truncated=True, action_valid=False))
                termination = P.Termination.MAX_TOKENS
                break
            result = await env.step(action)
            turns.append(_turn_info(result, action))
            if result.done or result.truncated:
                termination = P.Termination.DONE if result.done else P.Termination.MAX_TURNS
                break
            if turn + 1 == env.max_turns:
                break  # no turn would read the observation: it stays out of the episode
            nxt = _follow_up(result, out.token_ids, tokenizer, chat)
            buf.extend_context(nxt, turn + 1, engine.version)
            if len(buf.token_ids) >= max_model_len:
                termination = P.Termination.MAX_TOKENS
                break
    except EnvError:
        termination = P.Termination.ENV_ERROR

    buf.clip(max_model_len)
    rewards = [t.reward for t in turns]
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": float(top_k)}
    return _trajectory(
        buf, turns, termination, env, lease, actor_id, rewards, t0, gen_seconds, sampling
    )


def _turn_seed(seed: int | None, turn: int) -> int | None:
    # Evaluation: a seed per episode and turn makes its samples repeatable.
    return None if seed is None else (seed + turn) % 2**31


def _turn_info(result: StepResult, action: ParsedAction) -> P.TurnInfo:
    return P.TurnInfo(
        reward=result.reward,
        done=result.done,
        truncated=result.truncated,
        action_valid=action.valid,
        state_key=result.state_key,
        action=action.action,
    )


def _trajectory(
    buf: EpisodeBuffer,
    turns: list[P.TurnInfo],
    termination: str,
    env: Env,
    lease: P.Lease,
    actor_id: str,
    rewards: list[float],
    t0: float,
    gen_seconds: float,
    sampling: dict[str, float],
) -> P.Trajectory:
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
        outcome_reward=env.outcome(rewards),
        success=termination != P.Termination.ENV_ERROR and env.success(rewards),
        termination=termination,
        n_turns=len(turns),
        sampling=sampling,
        timings={"episode_s": time.monotonic() - t0, "generate_s": gen_seconds},
        sample_prob=lease.sample_prob,
        curator_version=lease.curator_version,
    )
