"""Superpixel quality metrics on hand-computed arrays, the quality table, and overlay PNGs."""

import numpy as np
import pytest
from PIL import Image

from common.errors import DataError
from datamodules.superpixels import SOURCES
from datamodules.superpixels.quality import (
    achievable_segmentation_accuracy,
    boundary_recall,
    evaluate_sources,
    format_quality_table,
)
from datamodules.superpixels.show import label_colours, write_overlays


def left_columns(width, shape=(4, 4)):
    """One instance covering the first `width` columns."""
    instances = np.zeros((1, *shape), dtype=np.uint8)
    instances[0, :, :width] = 1
    return instances


def split_at(column, shape=(4, 4)):
    labels = np.zeros(shape, dtype=np.int16)
    labels[:, column:] = 1
    return labels


class FakeDataset:
    """The three members of `ReferDataset` that quality and overlays use."""

    def __init__(self, count=3, shape=(24, 32)):
        rng = np.random.default_rng(0)
        self.image_ids = list(range(100, 100 + count))
        self.images = {i: rng.integers(0, 255, (*shape, 3), dtype=np.uint8) for i in self.image_ids}
        self.instances = {}
        for n, i in enumerate(self.image_ids):
            masks = np.zeros((n + 1, *shape), dtype=np.uint8)
            for j in range(n + 1):
                masks[j, 2 + 6 * j : 6 + 6 * j, 3:20] = 1
            self.instances[i] = masks

    def load_image(self, image_id):
        return self.images[image_id]

    def instance_masks(self, image_id):
        return self.instances[image_id]


def test_asa_by_hand():
    instances = left_columns(1)
    assert achievable_segmentation_accuracy(split_at(1), instances) == 1.0
    assert achievable_segmentation_accuracy(np.zeros((4, 4), np.int16), instances) == 0.75
    assert achievable_segmentation_accuracy(split_at(2), instances) == 0.75
    assert achievable_segmentation_accuracy(split_at(3), left_columns(2)) == 0.75
    no_objects = np.zeros((0, 4, 4), dtype=np.uint8)
    assert achievable_segmentation_accuracy(split_at(2), no_objects) == 1.0


def test_boundary_recall_by_hand():
    instances = left_columns(2)
    assert boundary_recall(split_at(2), instances, tolerance=0) == 1.0
    assert boundary_recall(np.zeros((4, 4), np.int16), instances) == 0.0
    assert boundary_recall(split_at(3), instances, tolerance=0) == 0.5
    assert boundary_recall(split_at(3), instances, tolerance=1) == 1.0
    assert boundary_recall(split_at(2), np.zeros((0, 4, 4), np.uint8)) == 1.0


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(DataError, match="do not match"):
        achievable_segmentation_accuracy(split_at(2), left_columns(2, shape=(5, 4)))


def test_evaluate_sources_rows_and_table():
    dataset = FakeDataset()
    sources = {"grid": SOURCES["grid"]({"k": 2}), "oracle": SOURCES["oracle"]()}
    rows = evaluate_sources(dataset, sources, limit=2, progress=False)
    assert [row["source"] for row in rows] == ["grid", "oracle"]
    grid, oracle = rows
    assert grid["images"] == 2 and grid["mean_k"] == 4.0 and grid["mean_objects"] == 1.5
    assert oracle["asa"] == 1.0 and oracle["boundary_recall"] == 1.0
    assert 0 < grid["asa"] < 1 and grid["seconds_per_image"] >= 0
    table = format_quality_table(rows).splitlines()
    assert table[0].startswith("| source | images | mean K")
    assert len(table) == 4 and table[3].startswith("| oracle | 2 | ")


def test_write_overlays(tmp_path):
    dataset = FakeDataset(count=2)
    paths = write_overlays(dataset, SOURCES["oracle"](), tmp_path / "show", dataset.image_ids)
    assert [p.name for p in paths] == ["100.png", "101.png"]
    for path in paths:
        with Image.open(path) as png:
            assert png.size == (64, 24) and png.mode == "RGB"
    labels = split_at(2)
    assert np.array_equal(label_colours(labels), label_colours(labels.copy()))
    assert len({tuple(c) for c in label_colours(np.arange(8).reshape(2, 4)).reshape(-1, 3)}) == 8
