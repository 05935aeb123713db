"""Learning-rate schedule shared by every domain: linear warm-up, then cosine decay."""

from __future__ import annotations

import math


class WarmupCosine:
    """Multiplier for ``LambdaLR``: ``(step+1)/warmup`` during warm-up, then cosine to ``min_ratio``.

    A small class rather than a lambda so that the scheduler's state pickles into checkpoints.

    Args:
        warmup_steps: steps of linear warm-up.
        total_steps: step at which the cosine reaches ``min_ratio``.
        min_ratio: final learning rate as a fraction of the peak.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float) -> None:
        self.warmup_steps = max(0, int(warmup_steps))
        self.total_steps = max(1, int(total_steps))
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
