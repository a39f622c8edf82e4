"""Tests for the REFER-layout reader on a small hand-made fixture."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from refer_fixture import HEIGHT, JPEG_IMAGE, WIDTH, write_refer_fixture

from common.errors import DataError
from datamodules import refer
from datamodules.refer import DATASETS, ReferDataset, available_splits, stats_table

AREA = HEIGHT * WIDTH
# split: (images, refs, sentences, objects per image, mean ref-mask area fraction), by hand.
EXPECTED_STATS = {
    "train": (2, 3, 7, (2 + 1) / 2, (16 * 12 + (8 * 8 + 12 * 10) + (32 + 80 - 16)) / 3 / AREA),
    "val": (1, 1, 2, 2.0, (96 + 80 - 16) / AREA),
    "testA": (1, 2, 3, 2.0, (30 * 22 + 10 * 20) / 2 / AREA),
    "testB": (1, 1, 3, 2.0, 20 * 10 / AREA),
}


@pytest.fixture
def fixture(tmp_path: Path) -> dict:
    return write_refer_fixture(tmp_path)


def edit_refs(root: Path, edit, name: str = "refs(unc).p") -> None:
    path = root / "refcoco" / name
    refs = pickle.loads(path.read_bytes())
    path.write_bytes(pickle.dumps(edit(refs)))


def edit_instances(root: Path, edit) -> None:
    path = root / "refcoco" / "instances.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def annotation(instances: dict, ann_id: int) -> dict:
    return next(a for a in instances["annotations"] if a["id"] == ann_id)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / np.logical_or(a, b).sum())


def test_datasets_and_splits(fixture):
    assert DATASETS == {
        "refcoco": ("unc", "google"),
        "refcoco+": ("unc",),
        "refcocog": ("umd", "google"),
        "synthref": ("unc",),
    }
    assert available_splits(fixture["root"], "refcoco", "unc") == ("train", "val", "testA", "testB")


@pytest.mark.parametrize("split", ["train", "val", "testA", "testB"])
def test_split_counts_and_order(fixture, split):
    ds = ReferDataset(fixture["root"], "refcoco", "unc", split)
    assert len(ds) == len(fixture["samples"][split]) == EXPECTED_STATS[split][2]
    assert [r["ref_id"] for r in ds.refs] == fixture["ref_ids"][split]
    assert list(ds.image_ids) == fixture["image_ids"][split]
    keys = ("ref_id", "sent_id", "sentence", "ann_id", "image_id", "category_id")
    got = [tuple(ds[i][k] for k in keys) for i in range(len(ds))]
    assert got == fixture["samples"][split]


def test_item_fields_and_dtypes(fixture):
    ds = ReferDataset(fixture["root"], "refcoco", "unc", "train")
    item = ds[0]
    assert set(item) == {
        "image", "mask", "sentence", "image_id", "ref_id", "ann_id", "sent_id", "category_id"
    }  # fmt: skip
    assert item["image"].shape == (HEIGHT, WIDTH, 3) and item["image"].dtype == np.uint8
    assert item["mask"].shape == (HEIGHT, WIDTH) and item["mask"].dtype == np.uint8
    assert set(np.unique(item["mask"])) <= {0, 1}
    assert (item["ref_id"], item["ann_id"], item["sentence"]) == (100, 10, "the left box")
    np.testing.assert_array_equal(item["image"], fixture["pixels"][1])
    assert ds[-1]["sent_id"] == fixture["samples"]["train"][-1][1]
    with pytest.raises(IndexError):
        ds[len(ds)]


@pytest.mark.parametrize("image_id", [1, 2, 3, 4, 5])
def test_load_image(fixture, image_id):
    ds = ReferDataset(fixture["root"], "refcoco", "unc", "train")
    assert ds.image_path(image_id) == fixture["image_paths"][image_id]
    image = ds.load_image(image_id)
    assert image.shape == (HEIGHT, WIDTH, 3) and image.dtype == np.uint8
    if image_id != JPEG_IMAGE:
        np.testing.assert_array_equal(image, fixture["pixels"][image_id])


@pytest.mark.parametrize("ann_id", range(10, 19))
def test_annotation_masks(fixture, ann_id):
    ds = ReferDataset(fixture["root"], "refcoco", "unc", "train")
    mask, drawn = ds.annotation_mask(ann_id), fixture["masks"][ann_id]
    assert mask.shape == (HEIGHT, WIDTH) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1}
    if fixture["kinds"][ann_id].startswith("rle"):
        np.testing.assert_array_equal(mask, drawn)
        return
    instances = json.loads((fixture["root"] / "refcoco" / "instances.json").read_text())
    polygons = annotation(instances, ann_id)["segmentation"]
    reference = mask_utils.decode(mask_utils.frPyObjects(polygons, HEIGHT, WIDTH)).max(axis=2)
    np.testing.assert_array_equal(mask, reference)
    assert iou(mask, drawn) >= 0.95


def test_instance_masks(fixture):
    ds = ReferDataset(fixture["root"], "refcoco", "unc", "val")
    for image_id, ann_ids in fixture["ann_ids"].items():
        assert ds.instance_ann_ids(image_id) == ann_ids
        masks = ds.instance_masks(image_id)
        assert masks.shape == (len(ann_ids), HEIGHT, WIDTH) and masks.dtype == np.uint8
        for mask, ann_id in zip(masks, ann_ids):
            np.testing.assert_array_equal(mask, ds.annotation_mask(ann_id))


@pytest.mark.parametrize("split", ["train", "val", "testA", "testB"])
def test_stats(fixture, split):
    images, refs, sentences, objects, area = EXPECTED_STATS[split]
    assert ReferDataset(fixture["root"], "refcoco", "unc", split).stats() == {
        "images": images,
        "refs": refs,
        "sentences": sentences,
        "objects_per_image": pytest.approx(objects),
        "mask_area_fraction": pytest.approx(area),
    }


def test_stats_table(fixture):
    lines = stats_table(fixture["root"], "refcoco", "unc").splitlines()
    assert lines[0].split() == [
        "split",
        "images",
        "refs",
        "sentences",
        "objects/image",
        "mask",
        "area",
    ]
    assert len({len(line) for line in lines}) == 1
    rows = [line.split() for line in lines[1:]]
    assert [row[0] for row in rows] == ["train", "val", "testA", "testB"]
    for row in rows:
        images, refs, sentences, objects, area = EXPECTED_STATS[row[0]]
        assert row[1:] == [str(images), str(refs), str(sentences), f"{objects:.2f}", f"{area:.3f}"]
    only_val = stats_table(fixture["root"], "refcoco", "unc", splits=["val"]).splitlines()
    assert [line.split()[0] for line in only_val] == ["split", "val"]


def test_synthref_images_live_under_their_own_folder(tmp_path):
    expected = write_refer_fixture(tmp_path, dataset="synthref", split_by="unc")
    ds = ReferDataset(tmp_path, "synthref", "unc", "val")
    assert ds.image_path(3) == tmp_path / "images" / "synthref" / "COCO_train2014_000000000003.png"
    assert not (tmp_path / "images" / "mscoco").exists()
    np.testing.assert_array_equal(ds[0]["image"], expected["pixels"][3])
    np.testing.assert_array_equal(ds[0]["mask"], expected["masks"][13])


def test_files_are_parsed_once_per_version(fixture, monkeypatch):
    calls = {"json": 0, "pickle": 0}
    json_load, pickle_load = json.load, pickle.load

    def count(name, load):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return load(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(refer.json, "load", count("json", json_load))
    monkeypatch.setattr(refer.pickle, "load", count("pickle", pickle_load))
    for split in ("train", "val", "testA", "testB", "train"):
        ReferDataset(fixture["root"], "refcoco", "unc", split)
    assert calls == {"json": 1, "pickle": 1}
    edit_refs(fixture["root"], lambda refs: [r for r in refs if r["split"] != "testB"])
    assert available_splits(fixture["root"], "refcoco", "unc") == ("train", "val", "testA")
    assert calls == {"json": 1, "pickle": 2}


# --- bad input -------------------------------------------------------------------------------


def raises(match: str):
    return pytest.raises(DataError, match=re.escape(match))


def test_root_missing(tmp_path):
    with raises(f"data root {tmp_path / 'absent'} does not exist"):
        ReferDataset(tmp_path / "absent", "refcoco", "unc", "train")


def test_dataset_folder_missing_lists_found_datasets(tmp_path):
    write_refer_fixture(tmp_path)
    write_refer_fixture(tmp_path, dataset="synthref")
    (tmp_path / "notes").mkdir()
    with raises(
        f"{tmp_path / 'refcocog'} does not exist; datasets under {tmp_path}: refcoco, synthref"
    ):
        ReferDataset(tmp_path, "refcocog", "umd", "train")


def test_unknown_dataset(fixture):
    with raises("unknown dataset 'coco'. Choose one of: refcoco, refcoco+, refcocog, synthref"):
        ReferDataset(fixture["root"], "coco", "unc", "train")


def test_unsupported_split_by(fixture):
    with raises("dataset 'refcoco+' has no split_by 'google'. Choose one of: unc"):
        ReferDataset(fixture["root"], "refcoco+", "google", "train")


def test_refs_file_missing(fixture):
    with raises("refcoco/refs(google).p does not exist (found: refs(unc).p)"):
        ReferDataset(fixture["root"], "refcoco", "google", "train")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"not a pickle at all", "is not a readable pickle"),
        (pickle.dumps({"refs": []}), "holds a dict, not a list of refs"),
        (pickle.dumps(["ref"]), "ref #0 is not a dict with the keys"),
    ],
)
def test_refs_file_malformed(fixture, content, match):
    (fixture["root"] / "refcoco" / "refs(unc).p").write_bytes(content)
    with raises(match):
        ReferDataset(fixture["root"], "refcoco", "unc", "train")


def test_ref_without_needed_key(fixture):
    edit_refs(
        fixture["root"],
        lambda refs: [{k: v for k, v in refs[0].items() if k != "ann_id"}, *refs[1:]],
    )
    with raises("ref #0 is not a dict with the keys ref_id, ann_id"):
        ReferDataset(fixture["root"], "refcoco", "unc", "train")
    with raises("(missing: ann_id)"):
        available_splits(fixture["root"], "refcoco", "unc")


def test_ref_with_malformed_sentences(fixture):
    def drop_sent(refs):
        refs[2]["sentences"][0].pop("sent")
        return refs

    edit_refs(fixture["root"], drop_sent)
    with raises("ref 102 has sentences that are not a list of dicts with the keys sent_id, sent"):
        ReferDataset(fixture["root"], "refcoco", "unc", "train")


@pytest.mark.parametrize("sent", [None, 7])
def test_a_sentence_that_is_not_text_is_named(fixture, sent):
    def blank(refs):
        refs[2]["sentences"][0]["sent"] = sent
        return refs

    edit_refs(fixture["root"], blank)
    with raises(f"the sentence is {sent!r}, not text"):
        ReferDataset(fixture["root"], "refcoco", "unc", "train")


def test_instances_missing(fixture):
    (fixture["root"] / "refcoco" / "instances.json").unlink()
    with raises("refcoco/instances.json does not exist"):
        ReferDataset(fixture["root"], "refcoco", "unc", "train")


def test_instances_not_json(fixture):
    (fixture["root"] / "refcoco" / "instances.json").write_text('{"images": [')
    with raises("instances.json is not valid JSON"):
        ReferDataset(fixture["root"], "refcoco", "unc", "train")


@pytest.mark.parametrize("key", ["images", "annotations"])
def test_instances_without_images_or_annotations(fixture, key):
    edit_instances(fixture["root"], lambda data: {k: v for k, v in data.items() if k != key})
    with raises(f"has no list '{key}'"):
        ReferDataset(fixture["root"], "refcoco", "unc", "train")


def test_instances_entry_without_needed_key(fixture):
    def drop(data):
        data["annotations"][3].pop("segmentation")
        return data

    edit_instances(fixture["root"], drop)
    with raises("annotations[3] is not a dict with the keys id, image_id, segmentation"):
        ReferDataset(fixture["root"], "refcoco", "unc", "train")


def test_split_not_in_data(fixture):
    with raises("has no split 'test'. Choose one of: train, val, testA, testB"):
        ReferDataset(fixture["root"], "refcoco", "unc", "test")


def test_ref_annotation_absent_from_instances(fixture):
    def drop(data):
        data["annotations"] = [a for a in data["annotations"] if a["id"] != 13]
        return data

    edit_instances(fixture["root"], drop)
    ReferDataset(fixture["root"], "refcoco", "unc", "train")
    with raises("ref 103 points to ann_id 13, absent from"):
        ReferDataset(fixture["root"], "refcoco", "unc", "val")


def test_ref_image_absent_from_instances(fixture):
    def drop(data):
        data["images"] = [im for im in data["images"] if im["id"] != 3]
        return data

    edit_instances(fixture["root"], drop)
    with raises("ref 103 points to image_id 3, absent from"):
        ReferDataset(fixture["root"], "refcoco", "unc", "val")


def test_ref_annotation_on_another_image(fixture):
    def move(data):
        annotation(data, 13)["image_id"] = 2
        return data

    edit_instances(fixture["root"], move)
    with raises("ref 103: ann_id 13 belongs to image 2, not to the ref's image_id 3"):
        ReferDataset(fixture["root"], "refcoco", "unc", "val")


def test_image_file_missing_raises_on_access(fixture):
    path = fixture["image_paths"][3]
    path.unlink()
    ds = ReferDataset(fixture["root"], "refcoco", "unc", "val")
    with raises(f"image file {path} (image_id 3) is missing"):
        ds[0]


def test_image_file_unreadable_raises_on_access(fixture):
    path = fixture["image_paths"][3]
    path.write_bytes(b"not an image")
    ds = ReferDataset(fixture["root"], "refcoco", "unc", "val")
    with raises(f"image file {path} (image_id 3) is unreadable"):
        ds.load_image(3)


def test_image_size_differs_from_instances(fixture):
    def grow(data):
        data["images"][2]["height"] = HEIGHT + 1
        return data

    edit_instances(fixture["root"], grow)
    ds = ReferDataset(fixture["root"], "refcoco", "unc", "val")
    with raises(f"is {HEIGHT}×{WIDTH} (H×W) but"):
        ds.load_image(3)


@pytest.mark.parametrize(
    ("segmentation", "match"),
    [
        ("bogus", "has a segmentation that is neither a polygon list nor an RLE dict"),
        ([[1, 2, 3, 4, 5, 6], 7], "has a polygon segmentation that is not a list of lists"),
        ({"size": [HEIGHT + 1, WIDTH], "counts": [0, 10]}, "has an RLE of size [33, 40]"),
    ],
)
def test_bad_segmentation(fixture, segmentation, match):
    def corrupt(data):
        annotation(data, 13)["segmentation"] = segmentation
        return data

    edit_instances(fixture["root"], corrupt)
    ds = ReferDataset(fixture["root"], "refcoco", "unc", "val")
    with raises(f"annotation 13 {match}"):
        ds[0]


def test_degenerate_polygons_are_empty(fixture):
    def flatten(data):
        annotation(data, 14)["segmentation"] = [[1.0, 1.0, 5.0, 5.0]]
        return data

    edit_instances(fixture["root"], flatten)
    ds = ReferDataset(fixture["root"], "refcoco", "unc", "val")
    assert ds.annotation_mask(14).sum() == 0
