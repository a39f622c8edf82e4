"""Image grids for TensorBoard: image | ground truth | prediction | superpixels."""

from __future__ import annotations

import numpy as np


def _overlay(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    out = image.astype(np.float32).copy()
    m = mask.astype(bool)
    out[m] = 0.45 * out[m] + 0.55 * np.asarray(color, dtype=np.float32)
    return out.clip(0, 255).astype(np.uint8)


def _boundaries(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    from skimage.segmentation import find_boundaries

    out = image.copy()
    if labels.shape != image.shape[:2]:
        return out
    out[find_boundaries(labels, mode="inner")] = (255, 255, 0)
    return out


def prediction_grid(samples: list[dict], tile: int = 128) -> np.ndarray:
    """One row per sample: image, GT (green), prediction (red) and, if present, superpixels."""
    from PIL import Image

    rows = []
    for s in samples:
        image = s["image"]
        tiles = [
            image,
            _overlay(image, s["gt"], (0, 220, 0)),
            _overlay(image, s["pred"], (230, 0, 0)),
        ]
        if "superpixels" in s:
            tiles.append(_boundaries(image, s["superpixels"]))
        resized = [np.asarray(Image.fromarray(t).resize((tile, tile))) for t in tiles]
        rows.append(np.concatenate(resized, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return np.concatenate(rows, axis=0)
