"""Methods vLLM mixes into its worker (`worker_extension_cls`); they run in the engine process.

Called through `AsyncLLM.collective_rpc` while the engine is paused.
"""

from __future__ import annotations

from typing import Any


class WeightSyncExtension:
    model_runner: Any  # provided by the vLLM worker this class is mixed into

    def sampled_counts(self) -> dict[str, int]:
        """Tokens sampled so far by every request the worker holds (engine paused)."""
        requests = getattr(self.model_runner, "requests", {})
        return {rid: len(state.output_token_ids) for rid, state in requests.items()}

    def load_safetensors(self, path: str) -> int:
        """Reload all weights in place from a safetensors file with HF parameter names."""
        from safetensors.torch import load_file

        state = load_file(path)
        self.model_runner.reload_weights(weights_iterator=iter(state.items()))
        return len(state)
