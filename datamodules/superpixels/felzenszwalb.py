"""`felzenszwalb`: scikit-image graph-based segmentation (Felzenszwalb & Huttenlocher)."""

from dataclasses import dataclass

import numpy as np
from skimage.segmentation import felzenszwalb

from .base import SuperpixelSource, check_range, register_source
from .partition import refine_partition


@dataclass
class FelzenszwalbSourceConfig:
    name: str = "felzenszwalb"
    scale: float = 100.0
    sigma: float = 0.8
    min_size: int = 20


@register_source("felzenszwalb")
class FelzenszwalbSource(SuperpixelSource):
    """Segments are 8-connected in scikit-image; 4-connected pieces under `min_size` merge back."""

    Config = FelzenszwalbSourceConfig

    def __init__(self, cfg: FelzenszwalbSourceConfig | None = None) -> None:
        super().__init__(cfg)
        check_range(self.cfg, "scale", 0)
        check_range(self.cfg, "sigma", 0)
        check_range(self.cfg, "min_size", 0)

    def partition(self, image: np.ndarray, instance_masks: np.ndarray | None) -> np.ndarray:
        labels = felzenszwalb(
            image,
            scale=self.cfg.scale,
            sigma=self.cfg.sigma,
            min_size=self.cfg.min_size,
            channel_axis=-1,
        )
        return refine_partition(labels, min_area=self.cfg.min_size)
