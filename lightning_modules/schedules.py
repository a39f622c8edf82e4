"""The learning-rate schedule every trainer here uses: linear warm-up, then cosine decay."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(warmup: int, total: int, floor: float = 0.0) -> Callable[[int], float]:
    """LR factor by step for `torch.optim.lr_scheduler.LambdaLR`: (step + 1) / `warmup` during the
    warm-up, then a cosine from 1 down to `floor` at step `total` (and `floor` after it)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
