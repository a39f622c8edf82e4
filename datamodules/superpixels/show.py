"""Overlay PNGs: the image with superpixel boundaries beside a label-colour map."""

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from skimage.color import hsv2rgb
from skimage.segmentation import mark_boundaries

from .base import SuperpixelSource

GOLDEN_RATIO = (5**0.5 - 1) / 2


def label_colours(labels: np.ndarray) -> np.ndarray:
    """H×W labels → H×W×3 uint8; label i always gets the same colour (golden-ratio hue steps)."""
    ids = np.arange(int(labels.max()) + 1)
    hsv = np.stack(
        [(ids * GOLDEN_RATIO) % 1.0, 0.45 + 0.4 * (ids % 3) / 2, 0.95 - 0.25 * (ids % 2)], axis=-1
    )
    palette = (hsv2rgb(hsv[None])[0] * 255).round().astype(np.uint8)
    return palette[labels]


def overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """H×W×3 uint8 image and labels → H×2W×3 uint8: boundaries on the image | label colours."""
    marked = (mark_boundaries(image, labels, color=(1.0, 1.0, 0.0)) * 255).round().astype(np.uint8)
    return np.concatenate([marked, label_colours(labels)], axis=1)


def write_overlays(
    dataset: Any, source: SuperpixelSource, out_dir: str | Path, image_ids: Iterable[Any]
) -> list[Path]:
    """Write `<out_dir>/<image_id>.png` for each image; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for image_id in image_ids:
        image = dataset.load_image(image_id)
        instances = dataset.instance_masks(image_id) if source.needs_instances else None
        path = out_dir / f"{image_id}.png"
        Image.fromarray(overlay(image, source(image, instances))).save(path)
        paths.append(path)
    return paths
