"""Hot ops for the learner (torch fallback everywhere, Triton on GPU later). Imports only torch."""
