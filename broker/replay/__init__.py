"""The replay table and Reverb's three nouns: samplers, removers, rate limiters.

Items are whole GRPO groups: a group enters the table only once all its trajectories are
stored, and leaves it whole, so the learner never sees half a group.
"""

from broker.replay.build import build_table
from broker.replay.items import GroupItem
from broker.replay.rate_limiters import MinSize, RateLimiter, SampleToInsertRatio
from broker.replay.removers import (
    CapacityRemover,
    MaxTimesSampledRemover,
    Remover,
    StalenessRemover,
)
from broker.replay.samplers import FifoSampler, PrioritizedSampler, Sampler, UniformSampler
from broker.replay.sumtree import SumTree
from broker.replay.table import Table

__all__ = [
    "CapacityRemover",
    "FifoSampler",
    "GroupItem",
    "MaxTimesSampledRemover",
    "MinSize",
    "PrioritizedSampler",
    "RateLimiter",
    "Remover",
    "SampleToInsertRatio",
    "Sampler",
    "StalenessRemover",
    "SumTree",
    "Table",
    "UniformSampler",
    "build_table",
]
