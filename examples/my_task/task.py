"""The README's "Train on your own task" example: single-digit sums, scored by a function.

Each row of data.jsonl is {"prompt": "3 + 2 =", "answer": "5", "family": "large"}; the
actor shows the prompt, the model replies, and `score(completion, row)` rates the reply.
Nothing here imports headrace: a reward function is plain Python, as TRL's are.
"""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d+")


def score(completion: str, row: dict) -> float:
    """The reply must start with the number: 1 for the right one, 0.2 for another (the
    format, a foothold for a model that cannot add yet), 0 for a reply that starts otherwise."""
    m = NUMBER.match(completion.strip())
    if m is None:
        return 0.0
    return 1.0 if m.group() == row["answer"] else 0.2
