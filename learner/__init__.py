"""The headrace learner: training loop, advantages, losses, weight publisher, checkpoints."""
