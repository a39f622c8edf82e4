"""`sam`: semantic superpixels from segment-anything's automatic ("segment everything") masks."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import Sam

from common.errors import ConfigError
from common.sam import MODEL_TYPES, load_sam

from .base import SuperpixelSource, check_range, register_source
from .partition import MAX_SUPERPIXELS, partition_masks

# per SAM model, what `points_per_side`, `pred_iou_thresh` and `stability_score_thresh` left
# unset (null) become: SAM's own defaults for the official models; for the small SAM of the tiny
# preset, whose IoU head is not calibrated, every mask is kept and filtered by stability only
THRESHOLDS = {
    "custom": (16, 0.0, 0.5),
    "vit_b": (32, 0.88, 0.95),
    "vit_l": (32, 0.88, 0.95),
    "vit_h": (32, 0.88, 0.95),
}


@dataclass
class SamSourceConfig:
    name: str = "sam"
    checkpoint: str = ""
    model_type: str = "custom"
    points_per_side: int | None = None  # null: by model_type (THRESHOLDS)
    points_per_batch: int = 64
    pred_iou_thresh: float | None = None
    stability_score_thresh: float | None = None
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    min_mask_region_area: int = 0
    min_area: int = 16
    max_superpixels: int = 64
    device: str = "auto"  # auto: CUDA when there is a GPU (`svp precompute` uses its ranks')

    def __post_init__(self) -> None:
        keys = ("points_per_side", "pred_iou_thresh", "stability_score_thresh")
        for key, value in zip(keys, THRESHOLDS.get(self.model_type, THRESHOLDS["custom"])):
            if getattr(self, key) is None:
                setattr(self, key, value)


@register_source("sam")
class SamSource(SuperpixelSource):
    """`SamAutomaticMaskGenerator` masks → `partition_masks(masks, min_area, max_superpixels)`.

    `model` skips loading `checkpoint` (tests, or a SAM already in memory).
    """

    Config = SamSourceConfig

    def __init__(self, cfg: SamSourceConfig | None = None, model: Sam | None = None) -> None:
        super().__init__(cfg)
        cfg = self.cfg
        if cfg.model_type not in MODEL_TYPES:
            raise ConfigError(
                f"superpixels.model_type must be one of {', '.join(MODEL_TYPES)}, "
                f"got {cfg.model_type!r}"
            )
        check_range(cfg, "points_per_side", 1)
        check_range(cfg, "points_per_batch", 1)
        check_range(cfg, "crop_n_layers", 0)
        check_range(cfg, "min_mask_region_area", 0)
        check_range(cfg, "min_area", 0)
        check_range(cfg, "max_superpixels", 1, MAX_SUPERPIXELS)
        if cfg.min_mask_region_area > 0:
            _require_opencv()
        try:
            auto = "cuda" if torch.cuda.is_available() else "cpu"
            device = torch.device(auto if cfg.device == "auto" else cfg.device)
        except RuntimeError as err:
            raise ConfigError(f"superpixels.device: {err}") from err
        if model is None:
            model = _load_checkpoint(cfg.checkpoint, cfg.model_type)
        self.model = model.to(device).eval()
        self.generator = SamAutomaticMaskGenerator(
            self.model,
            points_per_side=cfg.points_per_side,
            points_per_batch=cfg.points_per_batch,
            pred_iou_thresh=cfg.pred_iou_thresh,
            stability_score_thresh=cfg.stability_score_thresh,
            stability_score_offset=cfg.stability_score_offset,
            box_nms_thresh=cfg.box_nms_thresh,
            crop_n_layers=cfg.crop_n_layers,
            crop_nms_thresh=cfg.crop_nms_thresh,
            min_mask_region_area=cfg.min_mask_region_area,
        )

    def partition(self, image: np.ndarray, instance_masks: np.ndarray | None) -> np.ndarray:
        found = self.generator.generate(image)
        if found:
            masks = np.stack([m["segmentation"] for m in found])
        else:
            masks = np.zeros((0, *image.shape[:2]), dtype=bool)
        return partition_masks(masks, self.cfg.min_area, self.cfg.max_superpixels)


def _load_checkpoint(checkpoint: str, model_type: str) -> Sam:
    if not checkpoint:
        raise ConfigError(
            "superpixels.checkpoint is empty: set it to a SAM checkpoint, "
            "e.g. one written by `svp train-sam`"
        )
    if not Path(checkpoint).is_file():
        raise ConfigError(
            f"superpixels.checkpoint: no such file {checkpoint}; train a small SAM with "
            "`svp train-sam` or point it at a segment-anything checkpoint"
        )
    return load_sam(checkpoint, model_type)


def _require_opencv() -> None:
    try:
        import cv2  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            "superpixels.min_mask_region_area > 0 needs OpenCV (segment-anything's "
            "post-processing); install opencv-python-headless or set it to 0 "
            "(superpixels.min_area merges small regions anyway)"
        ) from err
