"""vLLM `AsyncLLM` wrapped for token-in/token-out generation with exact policy versions.

Every request records the policy version its tokens were sampled under. A weight update pauses
the engine in "keep" mode (in-flight requests freeze in the scheduler), asks the worker how many
tokens each in-flight request has sampled so far, reloads the weights in place, invalidates the
KV cache (running requests are recomputed under the new weights), and resumes. Tokens before
the recorded offset carry the old version, tokens after it the new one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from dataclasses import dataclass, field

from actor.reaper import Reaper
from shared.metrics import WEIGHTS_SYNC_SECONDS

log = logging.getLogger(__name__)

WORKER_EXTENSION = "actor.worker_ext.WeightSyncExtension"


class EngineDead(RuntimeError):
    """The vLLM engine process is gone; the actor must exit."""


@dataclass
class GenResult:
    token_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: str | None


@dataclass
class _Inflight:
    version: int
    received: int = 0
    switches: list[tuple[int, int]] = field(default_factory=list)  # (offset, new version)
    done: bool = False


class Engine:
    def __init__(
        self,
        model: str,
        *,
        seed: int = 0,
        max_model_len: int = 512,
        max_num_seqs: int = 256,
        kv_cache_gib: int = 1,
        dtype: str = "float32",
        enforce_eager: bool = True,
        gpu_memory_utilization: float = 0.3,
        tensor_parallel_size: int = 1,
    ) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        # vLLM-CPU pins its worker to one core by default; actors share machines with other
        # actors and the learner, and two engines pinned to the same core starve each other.
        # Set VLLM_CPU_OMP_THREADS_BIND yourself on a dedicated machine.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=model,
            dtype=dtype,
            seed=seed,
            enforce_eager=enforce_eager,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            # Behaviour logprobs must come from the distribution actually sampled
            # (after temperature / top-p / top-k), or the importance ratio is biased.
            logprobs_mode="processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION,
            disable_log_stats=True,
        )
        # Before the engine: its processes go when the actor does, however, and also when
        # the actor dies while the engine is still starting (a minute on a CPU).
        self._reaper = Reaper()
        try:
            self.llm = AsyncLLM.from_engine_args(args)
        except BaseException:
            self._reaper.close()  # reaps what the failed start left behind
            raise
        self._reaper.track_children()
        self.version = 0
        self._ids = itertools.count()
        self._inflight: dict[str, _Inflight] = {}
        self._ready = asyncio.Event()  # cleared while weights are being swapped
        self._ready.set()
        self._update_lock = asyncio.Lock()

    # ------------------------------------------------------------------ generation

    async def generate(
        self,
        prompt_ids: list[int],
        *,
        max_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        stop_token_ids: list[int] | None = None,
        ignore_eos: bool = False,
        seed: int | None = None,
    ) -> GenResult:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        self._check_alive()
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            logprobs=0,  # the sampled token's logprob only
            detokenize=False,
            ignore_eos=ignore_eos,
            stop_token_ids=stop_token_ids or [],
            seed=seed,
            output_kind=RequestOutputKind.DELTA,
        )
        # New requests wait out a weight swap so their first token has a well-defined version.
        await self._ready.wait()
        rid = f"g{next(self._ids)}"
        state = _Inflight(version=self.version)
        self._inflight[rid] = state
        tokens: list[int] = []
        logprobs: list[float] = []
        finish: str | None = None
        try:
            async for out in self.llm.generate(
                TokensPrompt(prompt_token_ids=prompt_ids), params, request_id=rid
            ):
                c = out.outputs[0]
                tokens.extend(c.token_ids)
                for pos, tok in zip(c.logprobs or [], c.token_ids, strict=False):
                    logprobs.append(float(pos[tok].logprob))
                state.received = len(tokens)
                finish = c.finish_reason
        except Exception as e:
            if self.dead:
                raise EngineDead(str(e)) from e
            raise
        finally:
            state.done = True
            self._inflight.pop(rid, None)
        return GenResult(tokens, logprobs, self._versions(state, len(tokens)), finish)

    @staticmethod
    def _versions(state: _Inflight, n: int) -> list[int]:
        versions = [state.version] * n
        for offset, v in state.switches:
            for i in range(max(offset, 0), n):
                versions[i] = v
        return versions

    # ------------------------------------------------------------------ weights

    async def update_weights(self, path: str, version: int) -> dict[str, float]:
        """Swap in the safetensors file at `path` as policy `version`; returns phase seconds."""
        async with self._update_lock:
            if version <= self.version:
                return {}
            self._check_alive()
            phases: dict[str, float] = {}
            self._ready.clear()
            try:
                t = time.perf_counter()
                await self.llm.pause_generation(mode="keep", clear_cache=False)
                phases["pause"] = time.perf_counter() - t

                t = time.perf_counter()
                (sampled,) = await self.llm.collective_rpc("sampled_counts")
                await self._stamp_switch(sampled, version)
                await self.llm.collective_rpc("load_safetensors", args=(path,))
                # Cached blocks (and running requests' KV) were computed by the old weights.
                await self.llm.reset_prefix_cache(reset_running_requests=True)
                self.version = version
                phases["reload"] = time.perf_counter() - t

                t = time.perf_counter()
                await self.llm.resume_generation()
                phases["resume"] = time.perf_counter() - t
            finally:
                self._ready.set()
            for phase, secs in phases.items():
                WEIGHTS_SYNC_SECONDS.labels(phase=phase).observe(secs)
            return phases

    async def _stamp_switch(self, sampled: dict[str, int], version: int) -> None:
        """Record, for every in-flight request, the offset where `version` begins.

        The worker knows exactly how many tokens each scheduled request has sampled. A request
        the worker does not know either finished just before the pause (its last output is
        still on its way to us: all its tokens are old) or was never scheduled (all new).
        """
        by_client_id = {wid.rsplit("-", 1)[0]: n for wid, n in sampled.items()}
        unknown: list[_Inflight] = []
        for rid, state in list(self._inflight.items()):
            if rid in by_client_id:
                state.switches.append((by_client_id[rid], version))
            else:
                unknown.append(state)
        deadline = time.monotonic() + 0.5
        while any(not s.done and s.received == 0 for s in unknown):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.005)
        for state in unknown:
            if not state.done and state.received == 0:
                state.switches.append((0, version))

    # ------------------------------------------------------------------ health

    @property
    def dead(self) -> bool:
        return bool(getattr(self.llm, "errored", False))

    def _check_alive(self) -> None:
        if self.dead:
            raise EngineDead("the vLLM engine process has died")

    def shutdown(self) -> None:
        try:
            self.llm.shutdown()
        except Exception:  # already dead
            log.debug("engine shutdown failed", exc_info=True)
        self._reaper.close()
