"""Flip augmentation: sentences flip with the pixels, every SynthRef sentence still names its
target in the flipped scene, and flipped samples get their own cached features."""

from __future__ import annotations

import json
import pickle
from collections import defaultdict

import numpy as np
import pytest
import torch

from datamodules.augment import (
    VIEW_HFLIP,
    VIEW_VFLIP,
    FlipConfig,
    flip_array,
    flip_item,
    flip_sentence,
)
from datamodules.errors import ConfigError
from datamodules.synthetic import describes_uniquely, scene_from_annotations, synthref_vocabulary
from datamodules.synthref.scene import Scene, SceneObject

BOTH = VIEW_HFLIP | VIEW_VFLIP


def test_flip_sentence_by_hand():
    s = "the second red star from the left"
    assert flip_sentence(s, 0) == s
    assert flip_sentence(s, VIEW_HFLIP) == "the second red star from the right"
    assert flip_sentence("the leftmost circle", VIEW_HFLIP) == "the rightmost circle"
    assert flip_sentence("the leftmost circle", VIEW_VFLIP) == "the leftmost circle"
    assert flip_sentence("the star under the blue square", VIEW_VFLIP) == (
        "the star above the blue square"
    )
    assert flip_sentence("the highest cross to the left of the dotted shape", BOTH) == (
        "the lowest cross to the right of the dotted shape"
    )
    # words that merely contain a spatial word are left alone
    assert flip_sentence("the topless leftover", BOTH) == "the topless leftover"


def test_flipped_words_stay_in_the_vocabulary():
    vocabulary = set(synthref_vocabulary())
    for word in vocabulary:
        for view in (VIEW_HFLIP, VIEW_VFLIP, BOTH):
            assert flip_sentence(word, view) in vocabulary


def test_flip_array_and_item():
    a = np.arange(12).reshape(3, 4)
    assert np.array_equal(flip_array(a, VIEW_HFLIP), a[:, ::-1])
    assert np.array_equal(flip_array(a, VIEW_VFLIP), a[::-1])
    assert np.array_equal(flip_array(a, BOTH), a[::-1, ::-1])
    rgb = np.random.default_rng(0).integers(0, 255, (3, 4, 3), dtype=np.uint8)
    item = {"image": rgb, "mask": a > 5, "superpixels": a, "sentence": "the left one", "x": 1}
    out = flip_item(item, VIEW_HFLIP)
    assert out["sentence"] == "the right one" and out["view"] == VIEW_HFLIP and out["x"] == 1
    assert np.array_equal(out["image"], rgb[:, ::-1]) and np.array_equal(
        out["mask"], a[:, ::-1] > 5
    )
    assert item["sentence"] == "the left one"  # the original is untouched
    assert flip_item(item, 0) is item


def test_flip_config():
    assert not FlipConfig().active
    with pytest.raises(ConfigError, match="data.augment.hflip"):
        FlipConfig(hflip=1.5)
    always = FlipConfig(hflip=1.0, vflip=1.0)
    assert always.draw(np.random.default_rng(0)) == BOTH
    views = [FlipConfig(hflip=0.5).draw(np.random.default_rng(i)) for i in range(200)]
    assert set(views) == {0, VIEW_HFLIP} and 60 < sum(v == VIEW_HFLIP for v in views) < 140


def _flipped_scene(scene: Scene, view: int) -> Scene:
    objects = [
        SceneObject(o.placement, o.polygon, flip_array(o.full, view), flip_array(o.visible, view))
        for o in scene.objects
    ]
    return Scene(scene.height, scene.width, objects)


def test_every_flipped_sentence_names_its_target_in_the_flipped_scene(synthref_root):
    """The generator's own judge (margins, edges, cones) agrees with the flipped sentences."""
    root = synthref_root / "synthref"
    instances = json.loads((root / "instances.json").read_text())
    refs = pickle.loads((root / "refs(unc).p").read_bytes())
    anns = defaultdict(list)
    for ann in instances["annotations"]:
        anns[ann["image_id"]].append(ann)
    images = {im["id"]: im for im in instances["images"]}
    checked = changed = 0
    for ref in refs:
        im = images[ref["image_id"]]
        scene = scene_from_annotations(anns[ref["image_id"]], im["height"], im["width"])
        target = sorted(a["id"] for a in anns[ref["image_id"]]).index(ref["ann_id"])
        for view in (VIEW_HFLIP, VIEW_VFLIP, BOTH):
            flipped = _flipped_scene(scene, view)
            for s in ref["sentences"]:
                text = flip_sentence(s["sent"], view)
                assert describes_uniquely(flipped, text, target), (s["sent"], text, view)
                checked += 1
                changed += text != s["sent"]
    assert checked > 300 and changed > 50


def test_dataset_flips_and_model_caches_each_view(synthref_root, tiny_sam_checkpoint, tmp_path):
    from datamodules.refer import ReferDataset
    from datamodules.ris import RISDataset
    from lightning_modules.ris_model import FrozenEncoder

    refer = ReferDataset(synthref_root, "synthref", "unc", "train")
    plain = RISDataset(refer)
    flipped = RISDataset(refer, flip=FlipConfig(hflip=1.0))
    a, b = plain[3], flipped[3]
    assert b["view"] == VIEW_HFLIP and "view" not in a
    assert np.array_equal(b["image"], a["image"][:, ::-1])
    assert np.array_equal(b["mask"], a["mask"][:, ::-1])
    assert b["sentence"] == flip_sentence(a["sentence"], VIEW_HFLIP)

    calls = []

    class Encoder(torch.nn.Module):
        def forward(self, x):
            calls.append(len(x))
            return x[:, :, :2, :2].clone()  # position-sensitive: tells the views apart

    def preprocess(images):
        return torch.stack(
            [torch.as_tensor(i, dtype=torch.float32).permute(2, 0, 1) for i in images]
        )

    enc = FrozenEncoder(Encoder(), "test-views", preprocess, disk_dir=tmp_path)
    images = [torch.from_numpy(a["image"].copy()), torch.from_numpy(b["image"].copy())]
    ids = torch.tensor([a["image_id"], a["image_id"]])
    first = enc(images, ids, torch.tensor([0, VIEW_HFLIP]))
    assert calls == [2]  # same id, two views: both computed
    again = enc(images[::-1], ids, torch.tensor([VIEW_HFLIP, 0]))
    assert calls == [2]  # both now cached, and told apart by view
    assert not torch.equal(first[0], first[1])
    assert torch.equal(again[0], first[1]) and torch.equal(again[1], first[0])
    names = sorted(p.name for p in (tmp_path / "test-views").iterdir())
    assert names == [f"{a['image_id']}-view1.npy", f"{a['image_id']}.npy"]
