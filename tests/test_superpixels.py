"""Every registered superpixel source yields a valid partition; `partition_masks` by hand."""

import dataclasses

import numpy as np
import pytest
from omegaconf import OmegaConf

from common.errors import ConfigError, DataError
from common.sam import load_sam
from datamodules.superpixels import (
    SOURCES,
    build_source,
    partition_masks,
    refine_partition,
    source_config,
)

HEIGHT, WIDTH = 48, 64
# Random weights: keep every mask the generator proposes.
SAM_TEST_CONFIG = {
    "name": "sam",
    "points_per_side": 4,
    "pred_iou_thresh": 0.0,
    "stability_score_thresh": 0.0,
    "min_area": 8,
    "max_superpixels": 16,
}


@pytest.fixture(scope="module")
def tiny_sam(tiny_sam_checkpoint):
    return load_sam(tiny_sam_checkpoint)


@pytest.fixture(scope="module")
def scene():
    """A textured image with three overlapping rectangles and their (visible) instance masks."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 40, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    instances = np.zeros((3, HEIGHT, WIDTH), dtype=np.uint8)
    for i, (y0, y1, x0, x1, colour) in enumerate(
        [
            (4, 30, 6, 30, (200, 40, 40)),
            (20, 44, 20, 50, (40, 200, 40)),
            (8, 18, 44, 60, (40, 40, 220)),
        ]
    ):
        image[y0:y1, x0:x1] = colour
        instances[:, y0:y1, x0:x1] = 0
        instances[i, y0:y1, x0:x1] = 1
    return image, instances


def make_source(name, tiny_sam):
    if name == "sam":
        return SOURCES["sam"](SAM_TEST_CONFIG, model=tiny_sam)
    return SOURCES[name]()


def assert_partition(labels, shape):
    assert labels.dtype == np.int16
    assert labels.shape == shape
    k = int(labels.max()) + 1
    assert labels.min() == 0
    assert np.array_equal(np.unique(labels), np.arange(k))


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_source_returns_deterministic_partition(name, tiny_sam, scene):
    image, instances = scene
    source = make_source(name, tiny_sam)
    assert source.needs_instances == (name == "oracle")
    labels = source(image, instances)
    assert_partition(labels, (HEIGHT, WIDTH))
    assert np.array_equal(make_source(name, tiny_sam)(image.copy(), instances.copy()), labels)


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_source_config_schema(name, tiny_sam):
    config = SOURCES[name].Config
    first = dataclasses.fields(config)[0]
    assert (first.name, first.default) == ("name", name)
    node = OmegaConf.structured(config)
    assert source_config(node) == source_config({"name": name}) == config()
    kwargs = {"model": tiny_sam} if name == "sam" else {}
    assert isinstance(build_source(node, **kwargs), SOURCES[name])
    with pytest.raises(ConfigError, match="no_such_key"):
        build_source({"name": name, "no_such_key": 1}, **kwargs)


def test_build_source_rejects_unknown_name_and_bad_type():
    with pytest.raises(ConfigError, match="superpixels.name"):
        build_source({"name": "nope"})
    with pytest.raises(ConfigError, match="superpixels.k"):
        build_source({"name": "grid", "k": "many"})
    with pytest.raises(ConfigError, match="superpixels.k"):
        build_source({"name": "grid", "k": 0})


def test_grid_cells_equal_patch_pooling():
    labels = SOURCES["grid"]({"k": 4})(np.zeros((8, 12, 3), dtype=np.uint8))
    expected = np.repeat(np.repeat(np.arange(16).reshape(4, 4), 2, axis=0), 3, axis=1)
    assert np.array_equal(labels, expected)


def test_oracle_recovers_instances(scene):
    image, instances = scene
    labels = SOURCES["oracle"]()(image, instances)
    for mask in instances.astype(bool):
        assert len(np.unique(labels[mask])) == 1
    with pytest.raises(DataError, match="instance"):
        SOURCES["oracle"]()(image)


def test_sam_missing_checkpoint_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"superpixels\.checkpoint.*svp train-sam"):
        SOURCES["sam"]({"checkpoint": str(tmp_path / "missing.pth")})


def test_sam_loads_checkpoint_and_caps_superpixels(tiny_sam_checkpoint, scene):
    cfg = SAM_TEST_CONFIG | {"checkpoint": str(tiny_sam_checkpoint), "max_superpixels": 3}
    labels = SOURCES["sam"](cfg)(scene[0])
    assert_partition(labels, (HEIGHT, WIDTH))
    assert labels.max() < 3


def masks_from(*boxes, shape=(8, 8)):
    masks = np.zeros((len(boxes), *shape), dtype=bool)
    for mask, (y0, y1, x0, x1) in zip(masks, boxes):
        mask[y0:y1, x0:x1] = True
    return masks


def test_overlap_goes_to_smaller_mask():
    labels = partition_masks(masks_from((0, 8, 0, 8), (2, 4, 2, 4)))
    expected = np.zeros((8, 8), dtype=np.int16)
    expected[2:4, 2:4] = 1
    assert np.array_equal(labels, expected)


def test_uncovered_pixels_form_one_region_per_component():
    masks = masks_from((0, 8, 0, 8))
    masks[0, 1:3, 1:3] = False
    masks[0, 5:7, 4:7] = False
    labels = partition_masks(masks)
    assert labels.max() == 2
    assert len(np.unique(labels[1:3, 1:3])) == 1
    assert len(np.unique(labels[5:7, 4:7])) == 1
    assert labels[1, 1] != labels[5, 4]


def test_disconnected_mask_pieces_are_split():
    masks = masks_from((0, 8, 0, 3))
    masks[0, :, 5:] = True
    labels = partition_masks(masks)
    assert labels.max() == 2
    assert labels[0, 0] != labels[0, 7]


def test_small_region_merges_into_longest_shared_boundary():
    masks = masks_from((0, 8, 0, 4), (0, 8, 4, 8), (3, 5, 3, 4))
    labels = partition_masks(masks, min_area=3)
    assert labels.max() == 1
    assert labels[3, 3] == labels[0, 0]
    masks = masks_from((0, 8, 0, 4), (0, 8, 4, 8), (3, 4, 3, 5))
    labels = partition_masks(masks, min_area=3)
    assert labels[3, 3] == labels[3, 4] == labels[0, 0]


def test_tied_boundaries_merge_into_larger_region():
    masks = masks_from((0, 8, 0, 3), (0, 8, 4, 8), (3, 5, 3, 4))
    labels = partition_masks(masks, min_area=3)
    assert labels[3, 3] == labels[0, 7]


def test_max_superpixels_merges_smallest_first():
    masks = masks_from((0, 8, 0, 5), (0, 8, 5, 7), (0, 2, 7, 8), (2, 8, 7, 8), shape=(8, 8))
    labels = partition_masks(masks, max_superpixels=3)
    assert labels.max() == 2
    assert labels[0, 7] == labels[0, 6]
    assert labels[7, 7] != labels[7, 6]
    assert np.array_equal(partition_masks(masks, max_superpixels=1), np.zeros((8, 8), np.int16))


def test_empty_mask_list_gives_single_region():
    labels = partition_masks(np.zeros((0, 5, 7), dtype=bool), min_area=4, max_superpixels=8)
    assert np.array_equal(labels, np.zeros((5, 7), dtype=np.int16))


def test_labels_follow_raster_order():
    labels = partition_masks(masks_from((4, 8, 0, 8), (0, 4, 4, 8)))
    assert labels[0, 0] == 0 and labels[0, 4] == 1 and labels[4, 0] == 2


def test_refine_partition_validates_arguments():
    with pytest.raises(ConfigError, match="max_superpixels"):
        refine_partition(np.zeros((4, 4), int), max_superpixels=0)
    with pytest.raises(ConfigError, match="min_area"):
        refine_partition(np.zeros((4, 4), int), min_area=-1)
    with pytest.raises(DataError, match="N×H×W"):
        partition_masks(np.zeros((4, 4), bool))
