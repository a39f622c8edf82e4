"""`oracle`: ground-truth instance segments — the upper bound for semantic superpixels."""

from dataclasses import dataclass

import numpy as np

from common.errors import DataError

from .base import SuperpixelSource, check_range, register_source
from .partition import MAX_SUPERPIXELS, partition_masks


@dataclass
class OracleSourceConfig:
    name: str = "oracle"
    min_area: int = 4
    max_superpixels: int = 256


@register_source("oracle")
class OracleSource(SuperpixelSource):
    """Visible instance masks plus the connected pieces of the background, via `partition_masks`."""

    Config = OracleSourceConfig
    needs_instances = True

    def __init__(self, cfg: OracleSourceConfig | None = None) -> None:
        super().__init__(cfg)
        check_range(self.cfg, "min_area", 0)
        check_range(self.cfg, "max_superpixels", 1, MAX_SUPERPIXELS)

    def partition(self, image: np.ndarray, instance_masks: np.ndarray | None) -> np.ndarray:
        if instance_masks is None:
            raise DataError(
                "superpixel source 'oracle' needs ground-truth instance masks; "
                "pass instance_masks (only datasets with instance annotations, e.g. SynthRef)"
            )
        masks = np.asarray(instance_masks)
        if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
            raise DataError(
                f"instance masks of shape {masks.shape} do not match the image {image.shape[:2]}"
            )
        return partition_masks(masks.astype(bool), self.cfg.min_area, self.cfg.max_superpixels)
