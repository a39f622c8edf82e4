"""Superpixel quality against ground-truth instances: ASA, boundary recall, K per image."""

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.ndimage import maximum_filter
from tqdm import tqdm

from common.errors import DataError

from .base import SuperpixelSource
from .partition import resolve_overlaps


def ground_truth_segments(labels: np.ndarray, gt_instances: np.ndarray) -> np.ndarray:
    """N×H×W instance masks → H×W segment ids (N = background); overlaps go to the smaller mask."""
    gt_instances = np.asarray(gt_instances)
    if gt_instances.ndim != 3 or gt_instances.shape[1:] != labels.shape:
        raise DataError(
            f"instance masks of shape {gt_instances.shape} do not match the superpixels "
            f"{labels.shape}"
        )
    return resolve_overlaps(gt_instances.astype(bool))


def achievable_segmentation_accuracy(labels: np.ndarray, gt_instances: np.ndarray) -> float:
    """Fraction of pixels right when each superpixel takes the GT segment it overlaps most.

    GT segments are the instances plus the background.
    """
    labels = np.asarray(labels)
    segments = ground_truth_segments(labels, gt_instances)
    n_segments = len(gt_instances) + 1
    joint = labels.astype(np.int64).ravel() * n_segments + segments.ravel()
    counts = np.bincount(joint, minlength=(int(labels.max()) + 1) * n_segments)
    return float(counts.reshape(-1, n_segments).max(axis=1).sum() / labels.size)


def boundary_recall(labels: np.ndarray, gt_instances: np.ndarray, tolerance: int = 2) -> float:
    """Fraction of GT boundary pixels within `tolerance` px (Chebyshev) of a superpixel boundary.

    Boundary pixels are those with a 4-neighbour in another segment (both sides count). An image
    without GT boundaries scores 1.0.
    """
    labels = np.asarray(labels)
    gt_boundary = boundary_pixels(ground_truth_segments(labels, gt_instances))
    if not gt_boundary.any():
        return 1.0
    near = maximum_filter(boundary_pixels(labels), size=2 * tolerance + 1, mode="constant")
    return float((gt_boundary & near).sum() / gt_boundary.sum())


def boundary_pixels(labels: np.ndarray) -> np.ndarray:
    """H×W bool: pixels with a 4-neighbour of another label (the image border is no boundary)."""
    edge = np.zeros(labels.shape, dtype=bool)
    horizontal = labels[:, 1:] != labels[:, :-1]
    vertical = labels[1:, :] != labels[:-1, :]
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    return edge


def evaluate_sources(
    dataset: Any,
    sources: Mapping[str, SuperpixelSource],
    limit: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Score each source on the first `limit` images of `dataset`; one row per source.

    Row keys: source, images, mean_k, mean_objects, asa, boundary_recall, seconds_per_image
    (the time of the source call alone).
    """
    image_ids = list(dataset.image_ids)[:limit]
    if not image_ids:
        raise DataError("no images to evaluate superpixels on: the dataset split is empty")
    totals = {name: {"k": 0.0, "asa": 0.0, "recall": 0.0, "seconds": 0.0} for name in sources}
    objects = 0
    for image_id in tqdm(image_ids, desc="superpixel quality", disable=not progress):
        image = dataset.load_image(image_id)
        instances = np.asarray(dataset.instance_masks(image_id))
        objects += len(instances)
        for name, source in sources.items():
            start = time.perf_counter()
            labels = source(image, instances if source.needs_instances else None)
            totals[name]["seconds"] += time.perf_counter() - start
            totals[name]["k"] += int(labels.max()) + 1
            totals[name]["asa"] += achievable_segmentation_accuracy(labels, instances)
            totals[name]["recall"] += boundary_recall(labels, instances)
    n = len(image_ids)
    return [
        {
            "source": name,
            "images": n,
            "mean_k": total["k"] / n,
            "mean_objects": objects / n,
            "asa": total["asa"] / n,
            "boundary_recall": total["recall"] / n,
            "seconds_per_image": total["seconds"] / n,
        }
        for name, total in totals.items()
    ]


def format_quality_table(rows: list[dict[str, Any]]) -> str:
    """Rows from `evaluate_sources` → a Markdown table."""
    lines = [
        "| source | images | mean K | mean objects | ASA | boundary recall | s/image |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['source']} | {row['images']} | {row['mean_k']:.1f} | "
            f"{row['mean_objects']:.1f} | {row['asa']:.4f} | {row['boundary_recall']:.4f} | "
            f"{row['seconds_per_image']:.4f} |"
        )
    return "\n".join(lines)
