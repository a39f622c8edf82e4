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
    data_key_for,
    ensure_superpixel_cache,
    precompute_superpixels,
    resolve_source_config,
    source_identity,
    superpixel_cache_dir,
)
from datamodules.superpixels.store import META_FILE, SuperpixelStore, missing_shards

GRID = {"name": "grid", "k": 4}


class FakeImages:
    """The members of `ReferDataset` that precompute uses; counts loads, can crash, logs the pid."""

    def __init__(self, root, image_ids, split="train", fail_after=None, log_dir=None):
        self.root, self.dataset, self.split_by, self.split = Path(root), "fake", "unc", split
        self.image_ids = tuple(sorted(image_ids))
        self.fail_after, self.log_dir = fail_after, log_dir
        self.loads = self.instance_loads = 0

    def image_path(self, image_id):
        return self.root / "images" / f"{image_id}.png"  # not on disk: keyed by name

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
    return {p.name: p.read_bytes() for p in sorted(cache_dir.glob("shard-*.npz"))}


def test_precompute_covers_the_union_of_splits(tmp_path):
    train = FakeImages(tmp_path, range(10))
    val = FakeImages(tmp_path, range(8, 14), split="val")
    cache_dir, summary = run([train, val], tmp_path / "cache")
    assert summary["images"] == summary["images_computed"] == 14 and summary["images_per_s"] > 0
    assert train.loads + val.loads == 14 and train.instance_loads == 0
    assert cache_dir == superpixel_cache_dir([train, val], GRID, tmp_path / "cache")
    store = SuperpixelStore(cache_dir)
    assert store.image_ids == tuple(range(14)) and store.meta["num_shards"] == 5
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
    assert "is complete (5 images, source grid)" in capsys.readouterr().out


def test_resume_after_crash_equals_clean_run_byte_for_byte(tmp_path):
    clean_dir, _ = run([FakeImages(tmp_path, range(12))], tmp_path / "clean")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run([FakeImages(tmp_path, range(12), fail_after=7)], tmp_path / "crashed")
    crashed_dir = tmp_path / "crashed" / clean_dir.name
    assert missing_shards(crashed_dir) == [2, 3]
    assert [p.name for p in crashed_dir.iterdir() if p.name.startswith(".")] == []
    resumed = FakeImages(tmp_path, range(12))
    _, summary = run([resumed], tmp_path / "crashed")
    assert resumed.loads == summary["images_computed"] == 6
    assert shard_bytes(crashed_dir) == shard_bytes(clean_dir)
    for name in ("index.json", META_FILE):
        clean, crashed = (json.loads((d / name).read_text()) for d in (clean_dir, crashed_dir))
        clean.pop("created", None), crashed.pop("created", None)
        assert clean == crashed
    (crashed_dir / "shard-00001.npz").unlink()
    redo = FakeImages(tmp_path, range(12))
    run([redo], tmp_path / "crashed")
    assert redo.loads == 3 and shard_bytes(crashed_dir) == shard_bytes(clean_dir)


def test_other_configs_get_their_own_cache(tmp_path):
    images = FakeImages(tmp_path, range(4))
    coarse_dir, _ = run([images], tmp_path / "cache", source={"name": "grid", "k": 2})
    fine_dir, _ = run([images], tmp_path / "cache", source=GRID)
    more_dir, _ = run([FakeImages(tmp_path, range(6))], tmp_path / "cache", source=GRID)
    assert len({coarse_dir, fine_dir, more_dir}) == 3
    assert SuperpixelStore(coarse_dir).get(1).max() == 3
    assert SuperpixelStore(fine_dir).get(1).max() == 15


def test_a_subset_of_the_images_reuses_a_complete_cache(tmp_path, monkeypatch):
    """Evaluating on val alone after training on train + val needs no second cache (it took a
    7-minute SAM recompute before); an incomplete cache, another source config or an image outside
    the cache still gets its own folder."""
    train, val = FakeImages(tmp_path, range(10)), FakeImages(tmp_path, range(8, 14), split="val")
    full_dir, _ = run([train, val], tmp_path / "cache")
    monkeypatch.setattr(precompute_module, "Trainer", None)  # no computing from here on
    only_val = FakeImages(tmp_path, range(8, 14), split="val")
    cache_dir, summary = run([only_val], tmp_path / "cache")
    assert cache_dir == full_dir and only_val.loads == 0 and summary["images_computed"] == 0
    assert superpixel_cache_dir([only_val], GRID, tmp_path / "cache") == full_dir
    assert SuperpixelStore(cache_dir).get(9).shape == only_val.size(9)
    monkeypatch.undo()
    outside = FakeImages(tmp_path, range(12, 16), split="val")
    assert run([outside], tmp_path / "cache")[0] != full_dir
    assert run([only_val], tmp_path / "cache", source={"name": "grid", "k": 2})[0] != full_dir
    (full_dir / "shard-00000.npz").unlink()  # an incomplete cache is not reused for others
    again = FakeImages(tmp_path, range(8, 14), split="val")
    assert superpixel_cache_dir([again], GRID, tmp_path / "cache") != full_dir


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
    assert data_key_for(datasets)["datasets"] == ["synthref/unc"]
    oracle, store = build_source({"name": "oracle"}), SuperpixelStore(cache_dir)
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


def test_replaced_data_gets_its_own_cache(tmp_path):
    """A cache is keyed by what the images and annotations are, not only their ids: regenerated
    SynthRef (same sizes, another seed) or one replaced image file is computed anew."""
    from conftest import TINY_SYNTH

    from datamodules.refer import ReferDataset
    from datamodules.synthetic import SynthConfig, generate_synthref

    root = tmp_path / "data"

    def datasets():
        return [ReferDataset(root, "synthref", "unc", s) for s in ("train", "val")]

    generate_synthref(SynthConfig(root=str(root), seed=0, **TINY_SYNTH), progress=False)
    first, _ = run(datasets(), tmp_path / "cache")
    assert superpixel_cache_dir(datasets(), GRID, tmp_path / "cache") == first
    generate_synthref(SynthConfig(root=str(root), seed=5, **TINY_SYNTH), False, overwrite=True)
    again, _ = run(datasets(), tmp_path / "cache")
    assert again != first
    image = datasets()[0].image_path(datasets()[0].image_ids[0])
    image.write_bytes(image.read_bytes())  # the same bytes, a new file: counted as replaced
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    third, _ = run(datasets(), tmp_path / "cache")
    assert third not in (first, again)
    # a subset of the images no longer finds the complete cache of the old files either
    val = [ReferDataset(root, "synthref", "unc", "val")]
    assert superpixel_cache_dir(val, GRID, tmp_path / "cache") in (third,)


def test_a_damaged_shard_is_named_and_recomputed(tmp_path, capsys):
    """A truncated or emptied shard: reading it is an error naming the shard and the fix, and
    `precompute` (checksums beside the shards) recomputes it to the same bytes."""
    from datamodules.superpixels.store import shard_path

    ds = FakeImages(tmp_path, range(7))
    cache_dir, _ = run([ds], tmp_path / "cache")
    clean = shard_bytes(cache_dir)
    for damage in (lambda b: b[: len(b) // 2], lambda b: b""):
        path = shard_path(cache_dir, 1)
        path.write_bytes(damage(path.read_bytes()))
        with pytest.raises(DataError, match=r"shard-00001.npz is damaged.*svp precompute"):
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
    while len(list((tmp_path / "killed").glob("slic-*/shard-*.npz"))) < 2:
        assert time.time() < deadline and killed.poll() is None, "precompute ended before the kill"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert precompute(tmp_path / "killed").wait() == 0
    assert precompute(tmp_path / "clean").wait() == 0
    (killed_dir,) = (tmp_path / "killed").glob("slic-*")
    (clean_dir,) = (tmp_path / "clean").glob("slic-*")
    assert killed_dir.name == clean_dir.name
    files = {p.name: p.read_bytes() for p in sorted(killed_dir.glob("shard-*"))}
    assert files == {p.name: p.read_bytes() for p in sorted(clean_dir.glob("shard-*"))}
    assert not list(killed_dir.glob(".*.tmp"))
