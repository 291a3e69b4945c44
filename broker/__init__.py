"""The headrace broker: ingest + acks, durable store, replay table, curriculum, leases.

The broker never imports torch, vllm or transformers (an import-linter contract enforces it):
it must start in well under a second and run on a machine with no accelerator stack.
"""
