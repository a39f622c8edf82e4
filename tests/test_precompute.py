"""Precompute: the Lightning predict loop that fills the cache — resume, reruns, ranks, sources."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import ConfigError, DataError
from datamodules.superpixels import SOURCES, build_source
from datamodules.superpixels import precompute as precompute_module
from datamodules.superpixels.precompute import (
    ensure_superpixel_cache,
    open_superpixel_store,
    precompute_superpixels,
    resolve_source_config,
    source_identity,
)
from datamodules.superpixels.store import META_FILE, SuperpixelStore, read_parts, shard_path

GRID = {"name": "grid", "k": 4}


class FakeImages:
    """The members of `ReferDataset` that precompute uses; counts loads, can crash, logs the pid."""

    def __init__(self, root, image_ids, split="train", fail_after=None, log_dir=None):
        self.root, self.dataset, self.split_by, self.split = Path(root), "fake", "unc", split
        self.images_dir = self.root / "images"
        self.image_ids = tuple(sorted(image_ids))
        self.fail_after, self.log_dir = fail_after, log_dir
        self.loads = self.instance_loads = 0

    def image_path(self, image_id):
        return self.images_dir / f"{image_id}.png"  # not on disk: keyed by name

    def load_image(self, image_id):
        if self.fail_after is not None and self.loads >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.loads += 1
        if self.log_dir is not None:
            with open(Path(self.log_dir) / f"{os.getpid()}.log", "a") as log:
                log.write(f"{image_id}\n")
        rng = np.random.default_rng(image_id)
        return rng.integers(0, 256, (*self.size(image_id), 3), dtype=np.uint8)

    def instance_masks(self, image_id):
        self.instance_loads += 1
        h, w = self.size(image_id)
        masks = np.zeros((2, h, w), dtype=np.uint8)
        masks[0, : h // 2] = 1
        masks[1, :, : w // 3] = 1
        return masks

    @staticmethod
    def size(image_id):
        return 20 + image_id % 7, 24 + image_id % 5


def run(datasets, cache_root, source=GRID, **kwargs):
    kwargs = {"shard_size": 3, "progress": False, **kwargs}
    return precompute_superpixels(datasets, source, cache_root, **kwargs)


def shard_bytes(cache_dir):
    return {p.name: p.read_bytes() for p in sorted(cache_dir.glob("part-*.npz"))}


def cache_dir_of(datasets, cache_root, source=GRID):
    return open_superpixel_store(datasets, source, cache_root).cache_dir


def unwritten(cache_dir):
    """(part, shard) of every shard a part lists that is not on disk."""
    return [
        (part.name, k)
        for part in read_parts(cache_dir)
        for k in range(len(part.shards))
        if not shard_path(cache_dir, part.name, k).is_file()
    ]


def test_precompute_covers_the_union_of_splits(tmp_path):
    train = FakeImages(tmp_path, range(10))
    val = FakeImages(tmp_path, range(8, 14), split="val")
    cache_dir, summary = run([train, val], tmp_path / "cache")
    assert summary["images"] == summary["images_computed"] == 14 and summary["images_per_s"] > 0
    assert train.loads + val.loads == 14 and train.instance_loads == 0
    assert cache_dir == cache_dir_of([train, val], tmp_path / "cache")
    store = SuperpixelStore(cache_dir)
    assert store.image_ids == tuple(range(14)) and len(read_parts(cache_dir)[0].shards) == 5
    source = build_source(GRID)
    for image_id in range(14):
        expected = source(train.load_image(image_id))
        np.testing.assert_array_equal(store.get(image_id), expected)


def test_rerun_does_no_work_and_starts_no_trainer(tmp_path, monkeypatch, capsys):
    run([FakeImages(tmp_path, range(5))], tmp_path / "cache")
    monkeypatch.setattr(precompute_module, "Trainer", None)
    again = FakeImages(tmp_path, range(5))
    _, summary = run([again], tmp_path / "cache", progress=True)
    assert again.loads == 0 and summary["images_computed"] == 0 and summary["images"] == 5
    assert "is complete for these 5 images (source grid)" in capsys.readouterr().out


def test_resume_after_crash_equals_clean_run_byte_for_byte(tmp_path):
    clean_dir, _ = run([FakeImages(tmp_path, range(12))], tmp_path / "clean")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run([FakeImages(tmp_path, range(12), fail_after=7)], tmp_path / "crashed")
    crashed_dir = tmp_path / "crashed" / clean_dir.name
    (part,) = read_parts(crashed_dir)
    assert unwritten(crashed_dir) == [(part.name, 2), (part.name, 3)]
    assert [p.name for p in crashed_dir.iterdir() if p.name.startswith(".")] == []
    resumed = FakeImages(tmp_path, range(12))
    _, summary = run([resumed], tmp_path / "crashed")
    assert resumed.loads == summary["images_computed"] == 6
    assert shard_bytes(crashed_dir) == shard_bytes(clean_dir)
    for name in (f"{part.name}.json", META_FILE):
        clean, crashed = (json.loads((d / name).read_text()) for d in (clean_dir, crashed_dir))
        clean.pop("created", None), crashed.pop("created", None)
        assert clean == crashed
    shard_path(crashed_dir, part.name, 1).unlink()
    redo = FakeImages(tmp_path, range(12))
    run([redo], tmp_path / "crashed")
    assert redo.loads == 3 and shard_bytes(crashed_dir) == shard_bytes(clean_dir)


def test_other_configs_and_image_sets_get_their_own_cache(tmp_path):
    images = FakeImages(tmp_path, range(4))
    coarse_dir, _ = run([images], tmp_path / "cache", source={"name": "grid", "k": 2})
    fine_dir, _ = run([images], tmp_path / "cache", source=GRID)
    other_dir, _ = run([FakeImages(tmp_path / "elsewhere", range(4))], tmp_path / "cache")
    assert len({coarse_dir, fine_dir, other_dir}) == 3
    assert SuperpixelStore(coarse_dir).get(1).max() == 3
    assert SuperpixelStore(fine_dir).get(1).max() == 15
    with pytest.raises(DataError, match="draw on different images"):
        run([images, FakeImages(tmp_path / "elsewhere", range(4))], tmp_path / "cache")


def test_a_subset_of_the_images_reuses_the_cache_and_new_images_add_to_it(tmp_path, monkeypatch):
    """Evaluating on val alone after training on train + val computes nothing (it took a
    7-minute SAM recompute once); images outside the cache are computed, and only they; another
    source config gets its own folder."""
    train, val = FakeImages(tmp_path, range(10)), FakeImages(tmp_path, range(8, 14), split="val")
    full_dir, _ = run([train, val], tmp_path / "cache")
    monkeypatch.setattr(precompute_module, "Trainer", None)  # no computing from here on
    only_val = FakeImages(tmp_path, range(8, 14), split="val")
    cache_dir, summary = run([only_val], tmp_path / "cache")
    assert cache_dir == full_dir and only_val.loads == 0 and summary["images_computed"] == 0
    assert cache_dir_of([only_val], tmp_path / "cache") == full_dir
    assert SuperpixelStore(cache_dir).get(9).shape == only_val.size(9)
    monkeypatch.undo()
    outside = FakeImages(tmp_path, range(12, 16), split="test")
    cache_dir, summary = run([outside], tmp_path / "cache")
    assert cache_dir == full_dir and summary["images_computed"] == outside.loads == 2
    assert len(read_parts(full_dir)) == 2 and len(SuperpixelStore(full_dir)) == 16
    assert run([only_val], tmp_path / "cache", source={"name": "grid", "k": 2})[0] != full_dir


def test_a_missing_shard_with_images_of_others_is_replaced_by_a_new_part(tmp_path):
    """A request recomputes a missing shard in place only when it holds all the shard's images;
    else its own images of that shard go into a new part (others keep theirs)."""
    full_dir, _ = run([FakeImages(tmp_path, range(14))], tmp_path / "cache")
    (part,) = read_parts(full_dir)
    shard_path(full_dir, part.name, 2).unlink()  # images 6, 7, 8
    val = FakeImages(tmp_path, range(8, 14), split="val")
    with pytest.raises(DataError, match="incomplete: 1 of 3 shards missing"):
        cache_dir_of([val], tmp_path / "cache")
    _, summary = run([val], tmp_path / "cache")
    assert summary["images_computed"] == val.loads == 1
    assert SuperpixelStore(full_dir, val.image_ids).entries[8].part != part.name
    everything = FakeImages(tmp_path, range(14))
    _, summary = run([everything], tmp_path / "cache")
    assert summary["images_computed"] == everything.loads == 3
    assert unwritten(full_dir) == []


def test_instance_masks_only_for_sources_that_need_them(tmp_path):
    images = FakeImages(tmp_path, range(4))
    cache_dir, _ = run([images], tmp_path / "cache", source={"name": "oracle"})
    assert SOURCES["oracle"].needs_instances and images.instance_loads == 4
    oracle = build_source({"name": "oracle"})
    expected = oracle(images.load_image(2), images.instance_masks(2))
    np.testing.assert_array_equal(SuperpixelStore(cache_dir).get(2), expected)


def test_source_identity_drops_device_and_names_checkpoints_by_content(tmp_path):
    weights = tmp_path / "sam.pth"
    weights.write_bytes(b"weights v1")
    cfg = resolve_source_config({"name": "sam", "checkpoint": str(weights), "device": "cuda:3"})
    assert cfg["points_per_side"] == SOURCES["sam"].Config().points_per_side
    first = source_identity(cfg)
    assert "device" not in first and first["checkpoint"].startswith("sha256:")
    assert source_identity({**cfg, "device": "cpu"}) == first
    weights.write_bytes(b"weights v2")
    assert source_identity(cfg) != first
    with pytest.raises(ConfigError, match="unknown superpixels.name 'nope'"):
        resolve_source_config({"name": "nope"})
    with pytest.raises(ConfigError, match="superpixels.size"):
        resolve_source_config({"name": "grid", "size": 3})


def test_sam_source_runs_on_the_rank_device(tmp_path, tiny_sam_checkpoint):
    images = FakeImages(tmp_path, range(2))
    source = {"name": "sam", "checkpoint": str(tiny_sam_checkpoint), "points_per_side": 2}
    cache_dir, _ = run([images], tmp_path / "cache", source={**source, "device": "meta"})
    meta = SuperpixelStore(cache_dir).meta
    assert "device" not in meta["config"] and meta["config"]["checkpoint"].startswith("sha256:")
    assert SuperpixelStore(cache_dir).get(1).shape == FakeImages.size(1)


def test_ensure_superpixel_cache_computes_once(tmp_path):
    first = FakeImages(tmp_path, range(4))
    store = ensure_superpixel_cache([first], GRID, tmp_path / "cache", shard_size=2, progress=False)
    again = FakeImages(tmp_path, range(4))
    same = ensure_superpixel_cache([again], GRID, tmp_path / "cache", progress=False)
    assert first.loads == 4 and again.loads == 0
    assert len(store) == 4 and same.cache_dir == store.cache_dir


def test_real_refer_dataset(synthref_root, tmp_path):
    from datamodules.refer import ReferDataset

    datasets = [ReferDataset(synthref_root, "synthref", "unc", s) for s in ("val", "testA")]
    cache_dir, summary = run(datasets, tmp_path / "cache", source={"name": "oracle"})
    ids = sorted({i for ds in datasets for i in ds.image_ids})
    assert summary["images"] == len(ids)
    oracle, store = build_source({"name": "oracle"}), SuperpixelStore(cache_dir)
    assert store.meta["images"] == {  # oracle maps come from the annotations too
        "images": str((synthref_root / "images" / "synthref").resolve()),
        "annotations": str((synthref_root / "synthref" / "instances.json").resolve()),
    }
    for image_id in ids[:3]:
        ds = datasets[0] if image_id in datasets[0].image_ids else datasets[1]
        expected = oracle(ds.load_image(image_id), ds.instance_masks(image_id))
        np.testing.assert_array_equal(store.get(image_id), expected)


def check_two_ranks(tmp_path, strategy):
    """Each rank writes its own shards (k % 2 == rank); together they equal the 1-process run."""
    logs = tmp_path / "logs"
    logs.mkdir()
    images = FakeImages(tmp_path, range(11), log_dir=logs)
    kwargs = {"shard_size": 2, "devices": 2, "strategy": strategy}
    ddp_dir, summary = run([images], tmp_path / "ddp", **kwargs)
    assert summary["images_computed"] == 11
    loaded = [sorted(int(i) for i in p.read_text().split()) for p in logs.glob("*.log")]
    assert sorted(loaded) == [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7, 10]]
    one_dir, _ = run([FakeImages(tmp_path, range(11))], tmp_path / "one", shard_size=2)
    assert shard_bytes(ddp_dir) == shard_bytes(one_dir) and len(shard_bytes(one_dir)) == 6
    ddp, one = SuperpixelStore(ddp_dir), SuperpixelStore(one_dir)
    for image_id in range(11):
        np.testing.assert_array_equal(ddp.get(image_id), one.get(image_id))


def test_two_process_ddp_equals_one_process(tmp_path):
    if torch.cuda.is_initialized():
        pytest.skip("processes cannot fork after CUDA is initialised; see the ddp_spawn test")
    check_two_ranks(tmp_path, "ddp_fork")


@pytest.mark.slow
def test_two_process_ddp_spawn_equals_one_process(tmp_path):
    check_two_ranks(tmp_path, "ddp_spawn")


def test_replaced_images_are_recomputed(tmp_path):
    """A cache is keyed by what the image files are, not only their ids: regenerated SynthRef
    (same sizes, another seed) is computed anew, and of one replaced image file only that image;
    until then the cache is not ready for it."""
    from conftest import TINY_SYNTH

    from datamodules.refer import ReferDataset
    from datamodules.synthetic import SynthConfig, generate_synthref

    root = tmp_path / "data"

    def datasets():
        return [ReferDataset(root, "synthref", "unc", s) for s in ("train", "val")]

    generate_synthref(SynthConfig(root=str(root), seed=0, **TINY_SYNTH), progress=False)
    first, summary = run(datasets(), tmp_path / "cache")
    total = summary["images"]
    generate_synthref(SynthConfig(root=str(root), seed=5, **TINY_SYNTH), False, overwrite=True)
    with pytest.raises(DataError, match=rf"{total} images changed .*svp precompute"):
        cache_dir_of(datasets(), tmp_path / "cache")
    again, summary = run(datasets(), tmp_path / "cache")
    assert again == first and summary["images_computed"] == total
    newest = read_parts(first)[-1].name
    assert {e.part for e in SuperpixelStore(first).entries.values()} == {newest}
    image = datasets()[0].image_path(datasets()[0].image_ids[0])
    image.write_bytes(image.read_bytes())  # the same bytes, a new file: counted as replaced
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    with pytest.raises(DataError, match="1 images changed"):
        cache_dir_of([ReferDataset(root, "synthref", "unc", "train")], tmp_path / "cache")
    _, summary = run(datasets(), tmp_path / "cache")
    assert summary["images_computed"] == 1 and len(read_parts(first)) == 3


def test_a_damaged_shard_is_named_and_recomputed(tmp_path, capsys):
    """A truncated or emptied shard: reading it is an error naming the shard and the fix, and
    `precompute` (checksums beside the shards) recomputes it to the same bytes."""
    ds = FakeImages(tmp_path, range(7))
    cache_dir, _ = run([ds], tmp_path / "cache")
    clean = shard_bytes(cache_dir)
    (part,) = read_parts(cache_dir)
    for damage in (lambda b: b[: len(b) // 2], lambda b: b""):
        path = shard_path(cache_dir, part.name, 1)
        path.write_bytes(damage(path.read_bytes()))
        with pytest.raises(DataError, match=rf"{part.name}-00001.npz is damaged.*svp precompute"):
            SuperpixelStore(cache_dir).get(ds.image_ids[4])
        run([ds], tmp_path / "cache")
        assert shard_bytes(cache_dir) == clean
        assert SuperpixelStore(cache_dir).get(ds.image_ids[4]).ndim == 2


def test_svp_precompute_killed_then_rerun_equals_an_uninterrupted_run(synthref_root, tmp_path):
    """SIGKILL once the first shards are written, then the same command: the cache is byte for
    byte the one an uninterrupted run writes (shards and checksums)."""
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo)}

    def precompute(cache: Path) -> subprocess.Popen:
        argv = [sys.executable, "-m", "lightning_modules.cli", "precompute", "superpixels=slic"]
        argv += [f"data.root={synthref_root}", f"cache.root={cache}", "cache.shard_size=2"]
        argv += ["trainer.threads=1", "trainer.enable_progress_bar=false"]
        return subprocess.Popen(argv, env=env, cwd=repo, stdout=subprocess.DEVNULL)

    killed = precompute(tmp_path / "killed")
    deadline = time.time() + 120
    while len(list((tmp_path / "killed").glob("slic-*/part-*.npz"))) < 2:
        assert time.time() < deadline and killed.poll() is None, "precompute ended before the kill"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert precompute(tmp_path / "killed").wait() == 0
    assert precompute(tmp_path / "clean").wait() == 0
    (killed_dir,) = (tmp_path / "killed").glob("slic-*")
    (clean_dir,) = (tmp_path / "clean").glob("slic-*")
    assert killed_dir.name == clean_dir.name
    files = {p.name: p.read_bytes() for p in sorted(killed_dir.glob("part-*"))}
    assert files == {p.name: p.read_bytes() for p in sorted(clean_dir.glob("part-*"))}
    assert not list(killed_dir.glob(".*.tmp"))


def test_refcoco_refcoco_plus_and_refcocog_share_one_cache(synthref_root, tmp_path, monkeypatch):
    """RefCOCO, RefCOCO+ and RefCOCOg draw on one images folder (COCO train2014): a second data
    set computes only the images the cache lacks (none, once every split of RefCOCO is in), and
    all three read the same label maps, the source's own for each image."""
    from refer_fixture import write_synthref_as_refcoco

    from datamodules.refer import ReferDataset, available_splits

    root = write_synthref_as_refcoco(synthref_root, tmp_path / "refer")
    slic = {"name": "slic", "n_segments": 16}

    def splits(dataset, split_by, only=None):
        names = only or available_splits(root, dataset, split_by)
        return [ReferDataset(root, dataset, split_by, s) for s in names]

    def ids(datasets):
        return {i for ds in datasets for i in ds.image_ids}

    train_only = splits("refcoco", "unc", ["train"])
    first, summary = run(train_only, tmp_path / "cache", source=slic)
    assert summary["images_computed"] == len(ids(train_only))
    refcocog = splits("refcocog", "umd")  # train, val, test (RefCOCO's testA)
    cache_dir, summary = run(refcocog, tmp_path / "cache", source=slic)
    assert cache_dir == first
    assert summary["images_computed"] == len(ids(refcocog) - ids(train_only)) > 0
    refcoco = splits("refcoco", "unc")
    _, summary = run(refcoco, tmp_path / "cache", source=slic)  # testB is new
    assert summary["images_computed"] == len(ids(refcoco) - ids(refcocog)) > 0

    monkeypatch.setattr(precompute_module, "Trainer", None)  # nothing is computed from here on
    stores = {}
    for dataset, split_by in (("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd")):
        datasets = splits(dataset, split_by)
        cache_dir, summary = run(datasets, tmp_path / "cache", source=slic)
        assert cache_dir == first and summary["images_computed"] == 0
        stores[dataset] = open_superpixel_store(datasets, slic, tmp_path / "cache")
    source = build_source(slic)
    for image_id in sorted(ids(refcoco)):
        expected = source(refcoco[0].load_image(image_id))
        for dataset in ("refcoco", "refcoco+"):
            np.testing.assert_array_equal(stores[dataset].get(image_id), expected)
        if image_id in ids(refcocog):
            np.testing.assert_array_equal(stores["refcocog"].get(image_id), expected)
