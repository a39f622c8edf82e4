"""Overlapping masks and raw label maps → a clean partition: int16 labels 0..K-1, all used.

Conventions shared by every source:
- regions are 4-connected; pieces of one mask or one label that are not 4-connected become separate
  regions (a superpixel is always one connected piece);
- merging picks the neighbour with the longest shared boundary (ties: the larger region, then the
  one whose first pixel comes first in raster order);
- final labels follow the raster order of each region's first pixel.
"""

import heapq

import numpy as np
from skimage.measure import label as connected_components

from common.errors import ConfigError, DataError

MAX_SUPERPIXELS = int(np.iinfo(np.int16).max) + 1


def resolve_overlaps(masks: np.ndarray) -> np.ndarray:
    """N×H×W boolean masks → int32 H×W owner map; the smaller mask wins, N marks uncovered pixels.

    Equal areas: the mask with the higher index wins.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise DataError(f"expected masks of shape N×H×W, got shape {masks.shape}")
    n = masks.shape[0]
    owner = np.full(masks.shape[1:], n, dtype=np.int32)
    areas = masks.sum(axis=(1, 2))
    for i in np.argsort(-areas, kind="stable"):
        owner[masks[i]] = i
    return owner


def partition_masks(
    masks: np.ndarray, min_area: int = 0, max_superpixels: int = MAX_SUPERPIXELS
) -> np.ndarray:
    """Overlapping boolean masks (N×H×W, N may be 0) → int16 H×W partition with labels 0..K-1.

    At overlaps the smaller mask wins; uncovered pixels form their own connected regions; regions
    smaller than `min_area` merge into their largest neighbour; then the smallest region merges
    until at most `max_superpixels` remain.
    """
    return refine_partition(resolve_overlaps(masks), min_area, max_superpixels)


def refine_partition(
    labels: np.ndarray, min_area: int = 0, max_superpixels: int = MAX_SUPERPIXELS
) -> np.ndarray:
    """Any integer H×W label map → int16 partition: split into 4-connected regions, merge, relabel.

    Regions merge smallest first while a region is below `min_area` or more than `max_superpixels`
    regions remain.
    """
    if min_area < 0:
        raise ConfigError(f"min_area must be >= 0, got {min_area}")
    if not 1 <= max_superpixels <= MAX_SUPERPIXELS:
        raise ConfigError(
            f"max_superpixels must be in 1..{MAX_SUPERPIXELS} (int16 labels), got {max_superpixels}"
        )
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.size == 0:
        raise DataError(f"expected a non-empty H×W label map, got shape {labels.shape}")
    labels = labels.astype(np.int64)
    regions = connected_components(labels, background=labels.min() - 1, connectivity=1) - 1
    flat = regions.ravel()
    count = int(flat.max()) + 1
    area = np.bincount(flat, minlength=count)
    if area.min() < min_area or count > max_superpixels:
        regions = _merge_regions(regions, area, min_area, max_superpixels)
    return _relabel_raster(regions)


def _merge_regions(
    regions: np.ndarray, area: np.ndarray, min_area: int, max_superpixels: int
) -> np.ndarray:
    """Greedy smallest-first merging on the region adjacency graph; returns the merged label map."""
    count = len(area)
    _, first_index = np.unique(regions.ravel(), return_index=True)
    adjacency = _adjacency(regions, count)
    area_of, first_of = area.tolist(), first_index.tolist()
    target = np.arange(count)
    heap = [(area_of[r], first_of[r], r) for r in range(count)]
    heapq.heapify(heap)
    alive = count
    while heap and alive > 1:
        size, first, r = heap[0]
        if target[r] != r or size != area_of[r]:
            heapq.heappop(heap)
            continue
        if size >= min_area and alive <= max_superpixels:
            break
        heapq.heappop(heap)
        neighbours = adjacency.pop(r)
        t = max(neighbours, key=lambda n: (neighbours[n], area_of[n], -first_of[n]))
        for n, shared in neighbours.items():
            del adjacency[n][r]
            if n != t:
                adjacency[t][n] = adjacency[t].get(n, 0) + shared
                adjacency[n][t] = adjacency[n].get(t, 0) + shared
        target[r] = t
        area_of[t] += size
        first_of[t] = min(first_of[t], first)
        alive -= 1
        heapq.heappush(heap, (area_of[t], first_of[t], t))
    while True:
        jumped = target[target]
        if np.array_equal(jumped, target):
            return target[regions]
        target = jumped


def _adjacency(regions: np.ndarray, count: int) -> dict[int, dict[int, int]]:
    """Region adjacency graph: {region: {neighbour: shared boundary length in pixel edges}}."""
    a = np.concatenate([regions[:, :-1].ravel(), regions[:-1, :].ravel()])
    b = np.concatenate([regions[:, 1:].ravel(), regions[1:, :].ravel()])
    differ = a != b
    a, b = a[differ], b[differ]
    pairs, lengths = np.unique(np.minimum(a, b) * count + np.maximum(a, b), return_counts=True)
    adjacency: dict[int, dict[int, int]] = {r: {} for r in range(count)}
    for lo, hi, length in zip(
        (pairs // count).tolist(), (pairs % count).tolist(), lengths.tolist()
    ):
        adjacency[lo][hi] = length
        adjacency[hi][lo] = length
    return adjacency


def _relabel_raster(labels: np.ndarray) -> np.ndarray:
    """Relabel to 0..K-1 in the raster order of each label's first pixel, as int16."""
    values, first_index, inverse = np.unique(labels.ravel(), return_index=True, return_inverse=True)
    rank = np.empty(len(values), dtype=np.int16)
    rank[np.argsort(first_index, kind="stable")] = np.arange(len(values), dtype=np.int16)
    return rank[inverse].reshape(labels.shape)
