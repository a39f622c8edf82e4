"""`grid`: k×k equal cells — the superpixel equivalent of pooling patches to k×k."""

from dataclasses import dataclass

import numpy as np

from .base import SuperpixelSource, check_range, register_source
from .partition import MAX_SUPERPIXELS, refine_partition


@dataclass
class GridSourceConfig:
    name: str = "grid"
    k: int = 8


@register_source("grid")
class GridSource(SuperpixelSource):
    """Cell (i, j) spans rows floor(i·H/k)..floor((i+1)·H/k); an image smaller than k gets fewer."""

    Config = GridSourceConfig

    def __init__(self, cfg: GridSourceConfig | None = None) -> None:
        super().__init__(cfg)
        check_range(self.cfg, "k", 1, int(MAX_SUPERPIXELS**0.5))

    def partition(self, image: np.ndarray, instance_masks: np.ndarray | None) -> np.ndarray:
        h, w = image.shape[:2]
        k = self.cfg.k
        rows = np.arange(h) * k // h
        cols = np.arange(w) * k // w
        return refine_partition(rows[:, None] * k + cols[None, :])
