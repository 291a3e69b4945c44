"""The replay table `[broker]` and `[broker.replay]` describe, from explicit arguments.

The one place where config names become Reverb's three nouns, so that table.py and the nouns
know nothing of the config: the config has validated every value when it was decoded.
"""

from __future__ import annotations

from broker.replay.rate_limiters import MinSize, RateLimiter, SampleToInsertRatio
from broker.replay.removers import (
    CapacityRemover,
    MaxTimesSampledRemover,
    Remover,
    StalenessRemover,
)
from broker.replay.samplers import FifoSampler, PrioritizedSampler, Sampler, UniformSampler
from broker.replay.table import Table
from shared.config import ReplayConfig


def build_sampler(r: ReplayConfig) -> Sampler:
    if r.sampler == "prioritized":
        return PrioritizedSampler(
            alpha=r.alpha,
            beta0=r.beta0,
            beta_anneal_steps=r.beta_anneal_steps,
            eps=r.priority_eps,
            seed=r.seed,
        )
    if r.sampler == "uniform":
        return UniformSampler(seed=r.seed)
    return FifoSampler()


def build_rate_limiter(r: ReplayConfig, min_size_to_sample: int) -> RateLimiter:
    if r.rate_limiter == "sample_to_insert":
        return SampleToInsertRatio(r.samples_per_insert, max(1, min_size_to_sample), r.error_buffer)
    return MinSize(min_size_to_sample)


def build_table(
    replay: ReplayConfig, *, capacity: int, max_times_sampled: int, min_size_to_sample: int
) -> Table:
    """`replay`'s sampler and rate limiter, and the removers `[broker]`'s `replay_capacity`,
    `max_staleness` (given with each sample) and `max_times_sampled` ask for."""
    removers: list[Remover] = [
        CapacityRemover(capacity),
        StalenessRemover(),
        MaxTimesSampledRemover(max_times_sampled),
    ]
    return Table(
        build_sampler(replay),
        removers,
        build_rate_limiter(replay, min_size_to_sample),
        priority_reduce=replay.priority_reduce,
    )
