"""Hot ops for the learner: the fused log-softmax-gather + entropy (torch chunked path on CPU,
Triton kernels on CUDA). Imports only torch (and triton where present)."""
