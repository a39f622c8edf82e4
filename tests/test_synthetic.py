"""SynthRef: layout, exact masks, unambiguous expressions, determinism and atomic writes."""

from __future__ import annotations

import json
import os
import pickle
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from common.errors import ConfigError, DataError
from datamodules.synthetic import (
    COLORS,
    SHAPES,
    SYNTHREF_SPLITS,
    Description,
    Expression,
    Ordinal,
    Placement,
    Position,
    Relation,
    SynthConfig,
    compose_scene,
    decode_segmentation,
    describes_uniquely,
    expression_kind,
    expression_text,
    generate_synthref,
    parse_expression,
    resolve_expression,
    sample_scene,
    scene_from_annotations,
    synthref_exists,
    synthref_mismatch,
    synthref_vocabulary,
)

TINY = dict(train_images=8, val_images=4, testA_images=6, testB_images=6, image_size=128)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _load(root: Path) -> tuple[dict, list]:
    instances = json.loads((root / "synthref" / "instances.json").read_text())
    with (root / "synthref" / "refs(unc).p").open("rb") as f:
        return instances, pickle.load(f)


@pytest.fixture(scope="module")
def synthref(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthref")
    generate_synthref(SynthConfig(root=str(root), seed=0, **TINY), progress=False)
    return root


@pytest.fixture(scope="module")
def data(synthref):
    instances, refs = _load(synthref)
    anns = defaultdict(list)
    for ann in instances["annotations"]:
        anns[ann["image_id"]].append(ann)
    images = {im["id"]: im for im in instances["images"]}
    return instances, refs, images, anns


def test_same_seed_same_bytes_other_seed_differs(synthref, tmp_path):
    again = tmp_path / "again"
    generate_synthref(SynthConfig(root=str(again), seed=0, **TINY), progress=False)
    assert _files(again) == _files(synthref)
    other = tmp_path / "other"
    generate_synthref(SynthConfig(root=str(other), seed=1, **TINY), progress=False)
    files = _files(other)
    assert files.keys() == _files(synthref).keys()
    assert files["synthref/instances.json"] != _files(synthref)["synthref/instances.json"]


def test_refer_layout(synthref, data):
    instances, refs, images, anns = data
    assert sorted(p.name for p in synthref.iterdir()) == ["images", "synthref"]
    assert {im["file_name"] for im in images.values()} == {
        p.name for p in (synthref / "images" / "synthref").iterdir()
    }
    assert len(images) == sum(TINY[f"{s}_images"] for s in SYNTHREF_SPLITS)
    assert [c["name"] for c in instances["categories"]] == list(SHAPES)
    ann_by_id = {a["id"]: a for a in instances["annotations"]}
    split_of_image: dict[int, str] = {}
    sent_ids = []
    for ref in refs:
        ann = ann_by_id[ref["ann_id"]]
        assert ann["image_id"] == ref["image_id"] and ref["image_id"] in images
        assert ref["category_id"] == ann["category_id"]
        assert ref["file_name"] == images[ref["image_id"]]["file_name"]
        assert 1 <= len(ref["sentences"]) <= 3
        assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
        assert len({s["sent"] for s in ref["sentences"]}) == len(ref["sentences"])
        for s in ref["sentences"]:
            assert s["tokens"] == s["sent"].split() and s["raw"] == s["sent"]
        sent_ids += ref["sent_ids"]
        assert split_of_image.setdefault(ref["image_id"], ref["split"]) == ref["split"]
    assert len(set(sent_ids)) == len(sent_ids)
    assert len({r["ref_id"] for r in refs}) == len(refs)
    assert set(split_of_image.values()) == set(SYNTHREF_SPLITS)
    for image_id, split in split_of_image.items():
        count = len(anns[image_id])
        low, high = {"testA": (1, 4), "testB": (7, 12)}.get(split, (1, 12))
        assert low <= count <= high


def test_masks_are_exact_and_coloured(synthref, data):
    from PIL import Image

    instances, _, images, anns = data
    kinds = set()
    palette = np.array(list(COLORS.values()), dtype=float)
    for image_id, image_anns in anns.items():
        im = images[image_id]
        pixels = np.asarray(Image.open(synthref / "images" / "synthref" / im["file_name"]))
        assert pixels.shape == (im["height"], im["width"], 3)
        seen = np.zeros(pixels.shape[:2], dtype=bool)
        for ann in image_anns:
            mask = decode_segmentation(ann["segmentation"], im["height"], im["width"])
            kinds.add("outline" if len(ann["segmentation"]) == 1 else "rectangles")
            ys, xs = np.nonzero(mask)
            assert ann["area"] == xs.size > 0
            assert ann["bbox"] == [xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1]
            assert not (seen & mask).any()
            seen |= mask
            mean = pixels[mask].astype(float).mean(0)
            nearest = list(COLORS)[int(((palette - mean) ** 2).sum(1).argmin())]
            assert nearest == ann["attributes"]["color"]
    assert kinds == {"outline", "rectangles"}  # unoccluded objects, and what shows of the rest


def _refer_get_mask(ann: dict, image: dict) -> np.ndarray:
    """The public REFER API's `get_mask` (refer.py, which LISA and most RIS code copy)."""
    from pycocotools import mask

    if type(ann["segmentation"][0]) is list:  # polygon
        rle = mask.frPyObjects(ann["segmentation"], image["height"], image["width"])
    else:
        rle = ann["segmentation"]
    m = mask.decode(rle)
    m = np.sum(m, axis=2)  # sometimes there are multiple binary map (one per polygon)
    return m.astype(np.uint8)


def test_read_as_refer_and_the_coco_api_read_it(synthref, data):
    """Every object reads without error, with the suite's own mask, through REFER's `get_mask`
    and pycocotools' COCO API: `iscrowd: 0` objects are polygons, as in COCO and RefCOCO."""
    from pycocotools.coco import COCO

    from datamodules.refer import ReferDataset

    instances, refs, images, _ = data
    coco = COCO(str(synthref / "synthref" / "instances.json"))
    suite = ReferDataset(str(synthref), "synthref", "unc", "train")
    for ann in instances["annotations"]:
        assert ann["iscrowd"] == 0 and isinstance(ann["segmentation"], list)
        ours = suite.annotation_mask(ann["id"])
        refer = _refer_get_mask(ann, images[ann["image_id"]])
        assert refer.max() == 1 and np.array_equal(refer.astype(bool), ours)
        assert np.array_equal(coco.annToMask(coco.anns[ann["id"]]).astype(bool), ours)
    assert {r["ann_id"] for r in refs} <= set(coco.anns)


def test_scenes_rebuild_from_annotations(data):
    _, _, images, anns = data
    for image_id, image_anns in anns.items():
        size = images[image_id]["width"]
        scene = scene_from_annotations(image_anns, size, size)
        for ann, obj in zip(sorted(image_anns, key=lambda a: a["id"]), scene.objects):
            assert not (obj.visible & ~obj.full).any()
            assert obj.area >= 0.6 * obj.full.sum()
            # the outline when nothing covers the object, else what shows, as exact rectangles
            assert (ann["segmentation"] == [obj.polygon]) == (not obj.occluded)


def test_every_sentence_names_exactly_its_target(data):
    _, refs, images, anns = data
    vocabulary = set(synthref_vocabulary())
    kinds = set()
    for ref in refs:
        im = images[ref["image_id"]]
        scene = scene_from_annotations(anns[ref["image_id"]], im["height"], im["width"])
        target = sorted(a["id"] for a in anns[ref["image_id"]]).index(ref["ann_id"])
        for s in ref["sentences"]:
            assert set(s["tokens"]) <= vocabulary
            expr = parse_expression(s["sent"])
            assert expression_text(expr) == s["sent"]
            assert resolve_expression(scene, expr) == {target}
            assert describes_uniquely(scene, expr, target)
            kinds.add(type(expr.locator).__name__)
    assert kinds == {"NoneType", "Position", "Ordinal", "Relation"}


def test_sampled_objects_stay_clearly_visible():
    rng = np.random.default_rng(3)
    for _ in range(4):
        scene = sample_scene(rng, 12, 128)
        assert len(scene.objects) == 12
        for obj in scene.objects:
            assert obj.visible.sum() >= 0.6 * obj.full.sum()
        assert any(obj.occluded for obj in scene.objects)


def _scene(*objects: tuple[str, str, float, float]):
    return compose_scene([Placement(s, c, "medium", "plain", x, y) for s, c, x, y in objects], 128)


def test_attribute_ambiguity_is_rejected():
    scene = _scene(("circle", "red", 30, 64), ("circle", "red", 98, 64), ("star", "blue", 30, 20))
    assert resolve_expression(scene, "the red circle") == {0, 1}
    assert not describes_uniquely(scene, "the red circle", 0)
    assert resolve_expression(scene, "the red circle on the left") == {0}
    assert describes_uniquely(scene, "the red circle on the left", 0)
    assert describes_uniquely(scene, "the blue shape", 2)
    # The star is clearly above one of two red circles: "the red circle" names no single anchor.
    assert not describes_uniquely(scene, "the star above the red circle", 2)


def test_positions_need_a_clear_margin():
    close = _scene(("circle", "red", 60, 30), ("circle", "red", 66, 100))
    assert resolve_expression(close, "the red circle on the left") == {0, 1}
    assert resolve_expression(close, "the highest red circle") == {0}
    assert resolve_expression(close, "the red circle at the bottom") == {1}
    assert describes_uniquely(_scene(("star", "red", 30, 64)), "the star on the left", 0)
    assert resolve_expression(_scene(("star", "red", 100, 64)), "the star on the left") == set()
    middle = _scene(("star", "red", 58, 64))
    assert resolve_expression(middle, "the star on the left") == {0}
    assert not describes_uniquely(middle, "the star on the left", 0)


def test_ordinals():
    scene = _scene(
        ("square", "red", 20, 64), ("square", "blue", 64, 64), ("square", "red", 108, 64)
    )
    assert resolve_expression(scene, "the second square from the left") == {1}
    assert resolve_expression(scene, "the second square from the right") == {1}
    assert resolve_expression(scene, "the third square from the left") == {2}
    assert resolve_expression(scene, "the second red shape from the left") == {2}
    assert resolve_expression(scene, "the third red shape from the left") == set()
    crowded = _scene(
        ("square", "red", 20, 30), ("square", "blue", 24, 100), ("square", "red", 90, 64)
    )
    assert resolve_expression(crowded, "the second square from the left") == {0, 1}


def test_relations():
    base = [("circle", "blue", 64, 95), ("triangle", "red", 64, 30), ("triangle", "red", 110, 95)]
    scene = _scene(*base)
    assert resolve_expression(scene, "the triangle above the blue circle") == {1}
    assert resolve_expression(scene, "the triangle to the right of the blue circle") == {2}
    assert resolve_expression(scene, "the circle above the triangle") == set()
    diagonal = _scene(*base, ("triangle", "green", 100, 55))
    assert resolve_expression(diagonal, "the triangle above the blue circle") == {1, 3}
    assert not describes_uniquely(diagonal, "the triangle above the blue circle", 1)


def test_grammar_round_trip_and_vocabulary():
    anchor = Description(color="blue", shape="circle")
    exprs = [
        Expression(Description(shape="star", color="red", size="small", texture="striped")),
        Expression(Description(color="pink"), Position("top", form=1)),
        Expression(Description(shape="square"), Position("right")),
        Expression(Description(), Ordinal(3, "bottom")),
        Expression(Description(shape="triangle"), Relation("below", anchor, form=1)),
        Expression(Description(texture="dotted"), Relation("left", anchor)),
    ]
    vocabulary = set(synthref_vocabulary())
    for expr in exprs:
        text = expression_text(expr)
        assert parse_expression(text) == expr
        assert set(text.split()) <= vocabulary
    assert expression_text(exprs[4]) == "the triangle under the blue circle"
    for bad in ("", "a red star", "the red", "the star from the left", "the star near the circle"):
        with pytest.raises(ValueError):
            parse_expression(bad)


def test_expression_kinds():
    kinds = {
        "the small striped red star": "attribute",
        "the pink shape at the top": "position",
        "the leftmost square": "superlative",
        "the third shape from the bottom": "ordinal",
        "the triangle under the blue circle": "relation",
        "the dog on the sofa": "other",
    }
    assert {text: expression_kind(text) for text in kinds} == kinds


def test_exists_overwrite_and_errors(tmp_path):
    cfg = SynthConfig(
        root=str(tmp_path), train_images=2, val_images=1, testA_images=1, testB_images=1
    )
    assert not synthref_exists(tmp_path)
    (tmp_path / "images" / "synthref").mkdir(parents=True)  # a leftover without annotations
    assert not synthref_exists(tmp_path)
    out = generate_synthref(cfg, progress=False)
    assert out == tmp_path / "synthref" and synthref_exists(tmp_path)
    assert len(list((tmp_path / "images" / "synthref").iterdir())) == 5
    with pytest.raises(DataError, match="--overwrite"):
        generate_synthref(cfg, progress=False)
    cfg.train_images = 1
    generate_synthref(cfg, progress=False, overwrite=True)
    assert len(list((tmp_path / "images" / "synthref").iterdir())) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "synthref"]
    with pytest.raises(ConfigError, match="image_size"):
        generate_synthref(SynthConfig(root=str(tmp_path), image_size=16), overwrite=True)
    with pytest.raises(ConfigError, match="train_images"):
        generate_synthref(SynthConfig(root=str(tmp_path), train_images=-1), overwrite=True)


def test_interrupted_run_leaves_nothing_behind(tmp_path, monkeypatch):
    import datamodules.synthref.writer as writer

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "referring_expressions", crash)
    cfg = SynthConfig(
        root=str(tmp_path), train_images=2, val_images=0, testA_images=0, testB_images=0
    )
    with pytest.raises(KeyboardInterrupt):
        generate_synthref(cfg, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_mismatch_names_what_differs_and_how_to_regenerate(tmp_path):
    cfg = SynthConfig(
        root=str(tmp_path), train_images=2, val_images=1, testA_images=1, testB_images=1
    )
    generate_synthref(cfg, progress=False)
    assert synthref_mismatch(cfg) is None
    cfg.train_images, cfg.seed = 3, 4
    problem = synthref_mismatch(cfg)
    assert "train 2 (config: 3)" in problem and "seed 0 (config: 4)" in problem
    assert "--overwrite" in problem and "--train-images 3" in problem and "--seed 4" in problem
    assert "val" not in problem.split("settings:")[1].split(".")[0]  # only what differs is named


def test_a_killed_runs_staging_folder_is_removed(tmp_path):
    """`svp synth` stages its files in a hidden folder; one left by a killed run (its process is
    gone) is removed by the next run, one of a running process is left alone."""
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".synthref.{host}-{dead.pid}-abc123"
    stale.mkdir(parents=True)
    (stale / "big.bin").write_bytes(b"0" * 1000)
    live = tmp_path / f".synthref.{host}-{os.getpid()}-def456"
    elsewhere = tmp_path / f".synthref.another-{host}-{dead.pid}-ghi789"
    live.mkdir()
    elsewhere.mkdir()
    generate_synthref(SynthConfig(root=str(tmp_path), seed=0, **TINY), progress=False)
    assert not stale.exists() and live.exists() and elsewhere.exists()


def _tree_hashes(root: Path) -> dict[str, str]:
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_svp_synth_killed_then_rerun_equals_an_uninterrupted_run(tmp_path):
    """SIGKILL in the middle of `svp synth`, then the same command again: the data set is the
    one an uninterrupted run writes, and no staging folder is left."""
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo)}

    def synth(root: Path) -> subprocess.Popen:
        argv = [sys.executable, "-m", "lightning_modules.cli", "synth", "--root", str(root)]
        argv += ["--train-images", "300", "--seed", "3", "--quiet"]
        return subprocess.Popen(argv, env=env, cwd=repo)

    killed = synth(tmp_path / "killed")
    deadline = time.time() + 60
    while not list((tmp_path / "killed").glob(".synthref.*/images/synthref/*.png")):
        assert time.time() < deadline and killed.poll() is None, "synth ended before the kill"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "synthref").exists()  # nothing half-written in place
    assert synth(tmp_path / "killed").wait() == 0
    assert synth(tmp_path / "clean").wait() == 0
    assert _tree_hashes(tmp_path / "killed") == _tree_hashes(tmp_path / "clean")
    assert not list((tmp_path / "killed").glob(".synthref.*"))
