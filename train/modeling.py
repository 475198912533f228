"""The learning-rate schedule shared by the trainer and SFT.

(Log-probs of a batch under a model are computed in exactly one place, `treegym.train.logprobs`.)
"""

from __future__ import annotations

import math


def warmup_lambda(warmup_steps: int, total_steps: int | None = None, final_ratio: float = 1.0):
    """Linear warm-up to the base lr over `warmup_steps`, then constant (verl's default) or, with
    `total_steps` and `final_ratio` < 1, cosine decay to `final_ratio` of the base lr."""

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if total_steps is None or final_ratio >= 1.0 or total_steps <= warmup_steps:
            return 1.0
        p = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * p))

    return f
