"""`slic`: scikit-image SLIC superpixels (colour + position k-means)."""

from dataclasses import dataclass

import numpy as np
from skimage.segmentation import slic

from .base import SuperpixelSource, check_range, register_source
from .partition import refine_partition


@dataclass
class SlicSourceConfig:
    name: str = "slic"
    n_segments: int = 64
    compactness: float = 10.0
    sigma: float = 1.0


@register_source("slic")
class SlicSource(SuperpixelSource):
    Config = SlicSourceConfig

    def __init__(self, cfg: SlicSourceConfig | None = None) -> None:
        super().__init__(cfg)
        check_range(self.cfg, "n_segments", 1)
        check_range(self.cfg, "compactness", 0)
        check_range(self.cfg, "sigma", 0)

    def partition(self, image: np.ndarray, instance_masks: np.ndarray | None) -> np.ndarray:
        labels = slic(
            image,
            n_segments=self.cfg.n_segments,
            compactness=self.cfg.compactness,
            sigma=self.cfg.sigma,
            start_label=0,
            channel_axis=-1,
        )
        return refine_partition(labels)
