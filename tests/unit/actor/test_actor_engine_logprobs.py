"""`actor.engine.sampled_logprobs` and `Engine._versions`: the per-token results of a
generation, read out of vLLM's own logprob containers (built by vLLM's own
`append_logprobs_for_next_position`, as its output processor builds them) and stamped with
policy versions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from actor.engine import Engine, _Inflight, sampled_logprobs

vllm_logprobs = pytest.importorskip("vllm.logprobs")


def containers(ids: list[int], lps: list[float]):
    """vLLM's two sample-logprob containers for `ids`, requested with `logprobs=0`: flat
    (`flat_logprobs=True`) and the list of per-position dicts."""
    out = []
    for flat in (True, False):
        c = vllm_logprobs.create_sample_logprobs(flat)
        for tok, lp in zip(ids, lps, strict=True):
            # float32 values through tolist(), as vLLM's LogprobsProcessor passes them
            value = np.float32(lp).tolist()
            vllm_logprobs.append_logprobs_for_next_position(c, [tok], [value], [None], 1, 0)
        out.append(c)
    return out


def test_flat_and_dict_logprobs_give_the_same_floats_also_for_a_delta():
    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.integers(0, 50_000, 40)]
    lps = [float(x) for x in -rng.exponential(2.0, 40)]
    flat, dicts = containers(ids, lps)
    assert isinstance(flat, vllm_logprobs.FlatLogprobs) and isinstance(dicts, list)
    want = [np.float32(x).tolist() for x in lps]
    assert sampled_logprobs(flat, ids) == want
    assert sampled_logprobs(dicts, ids) == want
    # a DELTA output carries the last n positions: vLLM slices its container
    for n in (1, 3):
        assert sampled_logprobs(flat[-n:], ids[-n:]) == want[-n:]
        assert sampled_logprobs(dicts[-n:], ids[-n:]) == want[-n:]
    assert sampled_logprobs(flat[:0], []) == []


def test_a_logprob_of_another_token_or_a_missing_one_is_refused():
    flat, dicts = containers([5, 6, 7], [-0.5, -1.0, -1.5])
    for c in (flat, dicts):
        with pytest.raises(ValueError):
            sampled_logprobs(c, [5, 6, 8])  # not the sampled token's entry
        with pytest.raises(ValueError):
            sampled_logprobs(c, [5, 6])  # one position too many
    with pytest.raises(ValueError):
        sampled_logprobs(None, [5])
    # a position with a top-k entry besides the sampled token (logprobs=1): not one per position
    wide = vllm_logprobs.create_sample_logprobs(True)
    vllm_logprobs.append_logprobs_for_next_position(wide, [5, 9], [-0.5, -0.1], [None, None], 2, 1)
    with pytest.raises(ValueError):
        sampled_logprobs(wide, [5])


def reference_versions(version: int, switches: list[tuple[int, int]], n: int) -> list[int]:
    """The stamping rule, token by token: each switch sets every token from its offset on."""
    out = [version] * n
    for offset, v in switches:
        for i in range(max(offset, 0), n):
            out[i] = v
    return out


def test_versions_follow_every_switch_in_order():
    assert Engine._versions(_Inflight(version=3), 4) == [3, 3, 3, 3]
    state = _Inflight(version=0, switches=[(2, 1), (5, 2)])
    assert Engine._versions(state, 7) == [0, 0, 1, 1, 1, 2, 2]
    # offsets past the end, at 0 and negative, zero tokens, and every combination of two
    offsets = [-1, 0, 1, 3, 6, 9]
    for n in (0, 1, 6):
        for a, b in itertools.product(offsets, repeat=2):
            state = _Inflight(version=4, switches=[(a, 5), (b, 6)])
            assert Engine._versions(state, n) == reference_versions(4, state.switches, n)
