"""The actor role: drives vLLM through many concurrent multi-turn episodes."""
