"""The superpixel cache: hashing, layout, parts, reproducible shards, lookup, config checks."""

import json
import pickle
import time

import numpy as np
import pytest

from common.errors import ConfigError, DataError
from datamodules.superpixels.store import (
    META_FILE,
    SuperpixelStore,
    cache_dir_for,
    config_hash,
    open_or_create_cache,
    part_file,
    plan_work,
    read_parts,
    shard_path,
    write_shard,
)

SOURCE = {"name": "grid", "k": 4}
IMAGES = {"images": "/data/images/synthref"}


def label_map(image_id: int, version: str = "v1") -> np.ndarray:
    rng = np.random.default_rng([image_id, len(version)])
    shape = (8 + image_id % 5, 11 + image_id % 3)
    return rng.integers(-1, 300, shape).astype(np.int16)


def files(ids, version: str = "v1") -> dict:
    """Image id → a stand-in for its file's identity."""
    return {int(i): f"{i}.png:{version}" for i in ids}


def compute(cache_dir, jobs, version: str = "v1") -> None:
    for job in jobs:
        maps = [label_map(i, version) for i in job.image_ids]
        write_shard(shard_path(cache_dir, job.part, job.shard), job.image_ids, maps)


def cache_with(tmp_path, ids, shard_size=2):
    cache_dir = open_or_create_cache(tmp_path, SOURCE, IMAGES)
    compute(cache_dir, plan_work(cache_dir, files(ids), shard_size))
    return cache_dir


def test_config_hash_is_canonical_and_short():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": (1, 2), "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    assert len(config_hash({})) == 16 and int(config_hash({}), 16) >= 0


def test_round_trip_exact_int16_of_different_sizes(tmp_path):
    ids = [40, 3, 17, 3, 8]
    cache_dir = cache_with(tmp_path, ids)
    assert cache_dir == cache_dir_for(tmp_path, SOURCE, IMAGES)
    assert cache_dir.name.startswith("grid-")
    store = SuperpixelStore(cache_dir)
    assert len(store) == 4 and store.image_ids == (3, 8, 17, 40)
    assert 17 in store and np.int64(17) in store and 5 not in store
    for image_id in ids:
        got = store.get(image_id)
        assert got.dtype == np.int16
        np.testing.assert_array_equal(got, label_map(image_id))
    assert store.meta["source"] == "grid" and store.meta["config"] == SOURCE
    assert store.meta["images"] == IMAGES and store.meta["hash"] == cache_dir.name.split("-")[1]
    assert {"numpy", "torch", "segment-anything", "scikit-image"} <= set(store.meta["versions"])


def test_a_part_is_consecutive_sorted_shards_named_by_content(tmp_path):
    cache_dir = open_or_create_cache(tmp_path, SOURCE, IMAGES)
    jobs = plan_work(cache_dir, files(range(10, 0, -1)), shard_size=4)
    assert [job.image_ids for job in jobs] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    (part,) = read_parts(cache_dir)
    assert part.name.startswith("part-00000-") and {job.part for job in jobs} == {part.name}
    assert json.loads(part_file(cache_dir, part.name).read_text())["shards"][2] == [
        [9, "9.png:v1"],
        [10, "10.png:v1"],
    ]
    again = open_or_create_cache(tmp_path / "again", SOURCE, IMAGES)
    assert [j.part for j in plan_work(again, files(range(1, 11)), shard_size=4)][0] == part.name
    compute(cache_dir, jobs)
    store = SuperpixelStore(cache_dir, max_open_shards=1)
    for image_id in (10, 1, 6, 9):
        np.testing.assert_array_equal(store.get(image_id), label_map(image_id))
    assert len(store._open) == 1
    with pytest.raises(DataError, match="image 11 is not in superpixel cache"):
        store.get(11)


def test_new_images_go_into_a_new_part_and_cached_ones_are_not_planned(tmp_path):
    cache_dir = cache_with(tmp_path, range(5))
    assert plan_work(cache_dir, files(range(5)), shard_size=2) == []
    jobs = plan_work(cache_dir, files(range(3, 8)), shard_size=2)
    assert [job.image_ids for job in jobs] == [[5, 6], [7]]
    assert jobs[0].part.startswith("part-00001-")
    compute(cache_dir, jobs)
    store = SuperpixelStore(cache_dir)
    assert store.image_ids == tuple(range(8)) and store.entries[4].part != store.entries[5].part


def test_a_changed_file_is_recomputed_and_its_newest_entry_wins(tmp_path):
    cache_dir = cache_with(tmp_path, range(4))
    changed = {**files(range(4)), 2: "2.png:v2"}
    jobs = plan_work(cache_dir, changed, shard_size=2)
    assert [job.image_ids for job in jobs] == [[2]]
    compute(cache_dir, jobs, version="v22")
    store = SuperpixelStore(cache_dir)
    np.testing.assert_array_equal(store.get(2), label_map(2, "v22"))
    np.testing.assert_array_equal(store.get(3), label_map(3))
    assert plan_work(cache_dir, changed, shard_size=2) == []


def test_a_missing_shard_is_recomputed_in_place_when_the_request_holds_its_images(tmp_path):
    cache_dir = cache_with(tmp_path, range(6))
    (part,) = read_parts(cache_dir)
    shard_path(cache_dir, part.name, 1).unlink()
    assert [(j.part, j.shard) for j in plan_work(cache_dir, files(range(6)), 2)] == [(part.name, 1)]
    # a request with only image 2 of that shard [2, 3] cannot rewrite it: a new part holds 2
    jobs = plan_work(cache_dir, files([2]), shard_size=2)
    assert [job.image_ids for job in jobs] == [[2]] and jobs[0].part != part.name


def test_store_survives_pickling_with_open_shards(tmp_path):
    cache_dir = cache_with(tmp_path, [1, 2, 3])
    store = SuperpixelStore(cache_dir)
    store.get(1)
    copy = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(copy.get(3), label_map(3))


def test_shards_are_byte_identical_whenever_written(tmp_path, monkeypatch):
    maps = [label_map(i) for i in (1, 2)]
    write_shard(tmp_path / "a.npz", [1, 2], maps)
    monkeypatch.setattr(time, "time", lambda: 2e9)
    monkeypatch.setattr(time, "localtime", lambda *_: time.gmtime(2e9))
    write_shard(tmp_path / "b.npz", [1, 2], maps)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    assert list(np.load(tmp_path / "a.npz").keys()) == ["image_ids", "0", "1"]


def test_failed_write_leaves_no_partial_shard(tmp_path):
    path = tmp_path / "shard-00000.npz"
    unwritable = np.array([None], dtype=object)
    with pytest.raises(ValueError):
        write_shard(path, [1, 2], [label_map(1), unwritable])
    assert list(tmp_path.iterdir()) == []
    write_shard(path, [1], [label_map(1)])
    before = path.read_bytes()
    with pytest.raises(ValueError):
        write_shard(path, [1, 2], [label_map(1), unwritable])
    names = sorted(p.name for p in tmp_path.iterdir())  # the shard and its checksum, unchanged
    assert names == [path.name, path.name + ".sha256"] and path.read_bytes() == before


def test_missing_or_incomplete_cache_says_to_precompute(tmp_path):
    with pytest.raises(DataError, match="svp precompute"):
        SuperpixelStore(tmp_path)
    cache_dir = open_or_create_cache(tmp_path, SOURCE, IMAGES)
    jobs = plan_work(cache_dir, files(range(5)), shard_size=2)
    compute(cache_dir, [jobs[0], jobs[2]])
    with pytest.raises(DataError, match=r"incomplete: 1 of 3 shards missing .*svp precompute"):
        SuperpixelStore(cache_dir)
    assert len(SuperpixelStore(cache_dir, image_ids=[0, 1, 4])) == 5  # their shards are there
    with pytest.raises(DataError, match=r"lacks 1 of the 2 images asked for .*image 9"):
        SuperpixelStore(cache_dir, image_ids=[0, 9])


def test_configs_and_image_sets_never_share_a_cache(tmp_path):
    a = open_or_create_cache(tmp_path, SOURCE, IMAGES)
    b = open_or_create_cache(tmp_path, {**SOURCE, "k": 8}, IMAGES)
    c = open_or_create_cache(tmp_path, SOURCE, {"images": "/data/images/mscoco/train2014"})
    assert len({a, b, c}) == 3
    assert open_or_create_cache(tmp_path, dict(reversed(SOURCE.items())), IMAGES) == a


def test_edited_meta_is_a_config_error_naming_the_key(tmp_path):
    cache_dir = open_or_create_cache(tmp_path, SOURCE, IMAGES)
    meta = json.loads((cache_dir / META_FILE).read_text())
    meta["config"]["k"] = 16
    (cache_dir / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"config\.k: cached 16, requested 4.*delete the folder"):
        open_or_create_cache(tmp_path, SOURCE, IMAGES)


def test_parts_without_meta_are_not_adopted(tmp_path):
    cache_dir = cache_with(tmp_path, [1])
    (cache_dir / META_FILE).unlink()
    with pytest.raises(DataError, match="no meta.json"):
        open_or_create_cache(tmp_path, SOURCE, IMAGES)


def test_a_corrupt_part_file_is_named(tmp_path):
    cache_dir = cache_with(tmp_path, [1, 2])
    (part,) = read_parts(cache_dir)
    part_file(cache_dir, part.name).write_text("{not json")
    with pytest.raises(DataError, match=rf"{part.name}.json is corrupt"):
        SuperpixelStore(cache_dir)
