"""CPU thread count: part of what a CPU result depends on.

Float sums are split across threads, so the same seed gives bit-identical weights only at the same
thread count (a 20-step `svp train-sam` differs by 1e-4 between 1 and 2 threads and is identical
between two 1-thread runs; after 500 steps the two SAMs differ in val mIoU and superpixel count).
`trainer.threads` / `train_sam.threads` pin it; every metrics.json records it.
"""

from __future__ import annotations

import torch

from common.errors import ConfigError


def check_threads(threads: int | None, key: str) -> None:
    """Raise a ConfigError naming `key` unless `threads` is None or a positive count."""
    if threads is not None and int(threads) < 1:
        raise ConfigError(f"{key}={threads} must be a positive thread count or null")


def use_threads(threads: int | None, key: str) -> int:
    """Set torch's intra-op thread count to `threads` (None: leave it) and return the count in use.

    `key` names the config entry in the error for a non-positive value."""
    check_threads(threads, key)
    if threads is not None:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()
