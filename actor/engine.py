"""vLLM `AsyncLLM` wrapped for token-in/token-out generation with exact policy versions.

Every request records the policy version its tokens were sampled under. A weight update pauses
the engine in "keep" mode (in-flight requests freeze in the scheduler), asks the worker how many
tokens each in-flight request has sampled so far, reloads the weights in place, invalidates the
KV cache (running requests are recomputed under the new weights), and resumes. Tokens before
the recorded offset carry the old version, tokens after it the new one.

With `[learner.lora]` rank > 0 the engine serves one LoRA slot ("policy", id 1) and every
request runs through it from the first one on, starting with an all-zero adapter: version 0,
the base model exactly (actor/lora.py). A policy update then replaces the adapter in place
(`add_lora(..., load_inplace=True)`) inside the same pause / count / reset / resume window, and
the requests in flight, which already hold the slot, continue on the new adapter from the
recorded offset. Were version 0 served without an adapter instead, requests started before the
first adapter would keep running without one after it, stamped with the new version.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from actor.lora import write_adapter, write_zero_adapter
from actor.reaper import Reaper
from shared.affinity import omp_threads_bind
from shared.lora_config import LoraConfig
from shared.metrics import WEIGHTS_SYNC_SECONDS

log = logging.getLogger(__name__)

WORKER_EXTENSION = "actor.worker_ext.WeightSyncExtension"
LORA_NAME, LORA_ID = "policy", 1  # the one LoRA slot (ids must be > 0)
STREAM_INTERVAL = 8  # tokens per streamed output of a running request (generate)


class EngineDead(RuntimeError):
    """The vLLM engine process is gone; the actor must exit."""


class PolicyRejected(ValueError):
    """A policy this engine cannot load (wrong kind, or an adapter vLLM refused); the engine
    keeps running the policy it had."""


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


def sampled_logprobs(logprobs: Any, token_ids: Sequence[int]) -> list[float]:
    """The sampled tokens' logprobs out of one vLLM output requested with `logprobs=0`.

    `FlatLogprobs` (`flat_logprobs=True`) holds exactly one entry per position then: the
    sampled token's, whose ids are checked against `token_ids` in one list comparison, and
    its logprobs are the list itself. The list of per-position dicts (older vLLM, or
    `flat_logprobs` off) is read token by token. Raises ValueError when a position lacks the
    sampled token's entry."""
    if not token_ids:
        return []
    if logprobs is None:
        raise ValueError("vLLM returned no logprobs (requested with logprobs=0)")
    flat = getattr(logprobs, "logprobs", None)
    if flat is not None:
        if logprobs.token_ids != list(token_ids) or len(flat) != len(token_ids):
            raise ValueError("vLLM's flat logprobs are not one sampled token per position")
        return flat
    try:
        return [float(pos[tok].logprob) for pos, tok in zip(logprobs, token_ids, strict=True)]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"vLLM's logprobs lack a sampled token: {e!r}") from e


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
        cpus: Sequence[int] | None = None,  # the cores the engine's threads are bound to
        lora: LoraConfig | None = None,  # rank > 0: serve LoRA adapters, not full weights
    ) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        # vLLM-CPU pins its worker to one core by default; actors share machines with other
        # actors and the learner, and two engines pinned to the same core starve each other.
        # So the worker's OpenMP threads stay unbound ("nobind") unless `cpus` (`[actor]
        # cpus`) names the cores: then one thread per core, bound there. A
        # VLLM_CPU_OMP_THREADS_BIND in the environment wins over both.
        if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            bind = omp_threads_bind(cpus or [], tensor_parallel_size)
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self._lora_root: Path | None = None  # adapter dirs, under LoRA
        self._lora_request: Any = None  # the slot's vLLM LoRARequest, under LoRA
        lora_args = self._start_lora(model, lora) if lora is not None and lora.enabled else {}
        args = AsyncEngineArgs(
            model=model,
            dtype=cast(Any, dtype),  # one of vLLM's names: [model] dtype is checked at load
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
            **lora_args,
        )
        # Before the engine: its processes go when the actor does, however, and also when
        # the actor dies while the engine is still starting (a minute on a CPU).
        self._reaper = Reaper()
        try:
            self.llm = AsyncLLM.from_engine_args(args)
        except BaseException:
            self._reaper.close()  # reaps what the failed start left behind
            self._remove_lora_root()
            raise
        self._reaper.track_children()
        self.version = 0  # with LoRA, the zero adapter `_start_lora` wrote
        self._ids = itertools.count()
        self._inflight: dict[str, _Inflight] = {}
        self._ready = asyncio.Event()  # cleared while weights are being swapped
        self._ready.set()
        self._update_lock = asyncio.Lock()

    def _start_lora(self, model: str, lora: LoraConfig) -> dict[str, Any]:
        """Engine arguments for one LoRA slot, holding version 0: the zero adapter."""
        from vllm.lora.request import LoRARequest

        self._lora_root = Path(tempfile.mkdtemp(prefix="headrace-lora-"))
        try:
            v0 = write_zero_adapter(model, lora, self._lora_root / "v0")
        except BaseException:
            self._remove_lora_root()
            raise
        # vLLM loads it from there when it schedules the first request that names the slot.
        self._lora_request = LoRARequest(
            lora_name=LORA_NAME, lora_int_id=LORA_ID, lora_path=str(v0)
        )
        return {"enable_lora": True, "max_lora_rank": lora.vllm_max_rank(), "max_loras": 1}

    @property
    def lora_enabled(self) -> bool:
        return self._lora_root is not None

    def _remove_lora_root(self) -> None:
        if self._lora_root is not None:
            shutil.rmtree(self._lora_root, ignore_errors=True)

    # ------------------------------------------------------------------ generation

    @property
    def generating(self) -> int:
        """Requests submitted and not yet finished."""
        return len(self._inflight)

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
            # Flat lists rather than a dict and a Logprob object per token, in vLLM's output
            # processor and here (sampled_logprobs).
            flat_logprobs=True,
            # A running request's output every STREAM_INTERVAL tokens (and its first and last
            # at once), not every engine step: vLLM builds each output and wakes this
            # coroutine for it. The tokens and logprobs are the same; `received` lags by up
            # to STREAM_INTERVAL - 1, which no version depends on (the worker counts).
            stream_interval=STREAM_INTERVAL,
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
                TokensPrompt(prompt_token_ids=prompt_ids),
                params,
                request_id=rid,
                lora_request=self._lora_request,  # None without LoRA
            ):
                # Runs once per engine step for every running request: list extends only.
                c = out.outputs[0]
                logprobs += sampled_logprobs(c.logprobs, c.token_ids)
                tokens += c.token_ids
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
        for offset, v in state.switches:  # in order: a later switch overrides an earlier one
            start = min(max(offset, 0), n)
            versions[start:] = [v] * (n - start)
        return versions

    # ------------------------------------------------------------------ weights

    async def update_weights(
        self, path: str, version: int, adapter_config: dict[str, Any] | None = None
    ) -> dict[str, float]:
        """Swap in the safetensors file at `path` as policy `version`; returns phase seconds.

        Full weights are read in place: the engine's process maps `path` (the actor's shared
        memory buffer, actor/weights.py) and copies each tensor into its parameter; the file
        must not change before this returns.

        Under LoRA, `path` holds a PEFT adapter's tensors and `adapter_config` is its
        adapter_config.json; otherwise every weight, and no config. Raises PolicyRejected
        (the engine keeps its policy) for the other kind or an adapter vLLM refuses.
        """
        async with self._update_lock:
            if version <= self.version:
                return {}
            self._check_alive()
            if (adapter_config is None) == self.lora_enabled:
                want = "a LoRA adapter" if self.lora_enabled else "full weights"
                raise PolicyRejected(f"v{version}: this engine loads {want} only")
            adapter = None
            if adapter_config is not None and self._lora_root is not None:
                # file work before the pause: generation stops only for the load itself
                adapter = write_adapter(self._lora_root / f"v{version}", path, adapter_config)
            phases: dict[str, float] = {}
            self._ready.clear()
            try:
                t = time.perf_counter()
                await self.llm.pause_generation(mode="keep", clear_cache=False)
                phases["pause"] = time.perf_counter() - t

                t = time.perf_counter()
                (sampled,) = await self.llm.collective_rpc("sampled_counts")
                if adapter is None:
                    await self._stamp_switch(sampled, version)
                    await self.llm.collective_rpc("load_safetensors", args=(path,))
                else:  # stamped only once the adapter is in: a refused one changes nothing
                    await self._swap_adapter(adapter)
                    await self._stamp_switch(sampled, version)
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

    async def _swap_adapter(self, adapter: Path) -> None:
        """Replace the slot's adapter by the one in `adapter` (engine paused)."""
        from vllm.lora.request import LoRARequest

        request = LoRARequest(
            lora_name=LORA_NAME, lora_int_id=LORA_ID, lora_path=str(adapter), load_inplace=True
        )
        try:
            loaded = await self.llm.add_lora(request)
            error = None if loaded else "not loaded"
        except Exception as e:
            if self.dead:
                raise EngineDead(str(e)) from e
            error = str(e)
        if error is not None:
            shutil.rmtree(adapter, ignore_errors=True)
            # vLLM reads and checks a new adapter before it evicts the old one: the slot still
            # holds the previous policy, so generation goes on under it, stamps unchanged.
            await self.llm.resume_generation()
            raise PolicyRejected(f"vLLM refused the adapter {adapter.name}: {error}")
        previous = Path(self._lora_request.lora_path)
        self._lora_request = LoRARequest(
            lora_name=LORA_NAME, lora_int_id=LORA_ID, lora_path=str(adapter)
        )
        # Requests in flight still name the old dir; vLLM never reads it again, since the slot
        # stays loaded. Should it ever, a missing dir fails loudly where the old adapter would
        # have been served silently under the new version.
        shutil.rmtree(previous, ignore_errors=True)

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
        self._remove_lora_root()
