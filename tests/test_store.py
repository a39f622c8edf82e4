"""The superpixel cache: hashing, layout, atomic reproducible shards, lookup and config checks."""

import json
import pickle
import time

import numpy as np
import pytest

from common.errors import ConfigError, DataError
from datamodules.superpixels.store import (
    INDEX_FILE,
    META_FILE,
    SuperpixelStore,
    cache_dir_for,
    config_hash,
    missing_shards,
    open_or_create_cache,
    read_index,
    shard_path,
    write_shard,
)

SOURCE = {"name": "grid", "k": 4}
DATA = {"datasets": ["synthref/unc"], "num_images": 5}


def label_map(image_id: int) -> np.ndarray:
    rng = np.random.default_rng(image_id)
    shape = (8 + image_id % 5, 11 + image_id % 3)
    return rng.integers(-1, 300, shape).astype(np.int16)


def fill(cache_dir, shards=None):
    for k, ids in enumerate(read_index(cache_dir)):
        if shards is None or k in shards:
            write_shard(shard_path(cache_dir, k), ids, [label_map(i) for i in ids])


def test_config_hash_is_canonical_and_short():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": (1, 2), "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    assert len(config_hash({})) == 16 and int(config_hash({}), 16) >= 0


def test_round_trip_exact_int16_of_different_sizes(tmp_path):
    ids = [40, 3, 17, 3, 8]
    cache_dir = open_or_create_cache(tmp_path, SOURCE, DATA, ids, shard_size=2)
    assert cache_dir == cache_dir_for(tmp_path, SOURCE, DATA)
    assert cache_dir.name.startswith("grid-")
    fill(cache_dir)
    store = SuperpixelStore(cache_dir)
    assert len(store) == 4 and store.image_ids == (3, 8, 17, 40)
    assert 17 in store and np.int64(17) in store and 5 not in store
    for image_id in ids:
        got = store.get(image_id)
        assert got.dtype == np.int16
        np.testing.assert_array_equal(got, label_map(image_id))
    assert store.meta["source"] == "grid" and store.meta["config"] == SOURCE
    assert store.meta["data"] == DATA and store.meta["hash"] == cache_dir.name.split("-")[1]
    assert store.meta["num_shards"] == 2 and store.meta["shard_size"] == 2
    assert {"numpy", "torch", "segment-anything", "scikit-image"} <= set(store.meta["versions"])


def test_index_is_consecutive_sorted_shards(tmp_path):
    ids = np.arange(10, 0, -1)
    cache_dir = open_or_create_cache(tmp_path, SOURCE, DATA, ids, shard_size=4)
    index = json.loads((cache_dir / INDEX_FILE).read_text())
    assert index == {"shard_size": 4, "shards": [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]}
    fill(cache_dir)
    store = SuperpixelStore(cache_dir, max_open_shards=1)
    for image_id in (10, 1, 6, 9):
        np.testing.assert_array_equal(store.get(image_id), label_map(image_id))
    assert len(store._open) == 1
    with pytest.raises(DataError, match="image 11 is not in superpixel cache"):
        store.get(11)


def test_store_survives_pickling_with_open_shards(tmp_path):
    cache_dir = open_or_create_cache(tmp_path, SOURCE, DATA, [1, 2, 3], shard_size=2)
    fill(cache_dir)
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
    cache_dir = open_or_create_cache(tmp_path, SOURCE, DATA, range(5), shard_size=2)
    fill(cache_dir, shards={0, 2})
    assert missing_shards(cache_dir) == [1]
    with pytest.raises(DataError, match=r"incomplete: 1 of 3 shards missing .*svp precompute"):
        SuperpixelStore(cache_dir)


def test_configs_and_data_never_share_a_cache(tmp_path):
    a = open_or_create_cache(tmp_path, SOURCE, DATA, [1, 2])
    b = open_or_create_cache(tmp_path, {**SOURCE, "k": 8}, DATA, [1, 2])
    c = open_or_create_cache(tmp_path, SOURCE, {**DATA, "datasets": ["refcoco/unc"]}, [1, 2])
    assert len({a, b, c}) == 3
    assert open_or_create_cache(tmp_path, dict(reversed(SOURCE.items())), DATA, [2, 1]) == a


def test_existing_cache_keeps_its_shard_size(tmp_path):
    first = open_or_create_cache(tmp_path, SOURCE, DATA, range(5), shard_size=2)
    again = open_or_create_cache(tmp_path, SOURCE, DATA, range(5), shard_size=64)
    assert again == first and len(read_index(first)) == 3


def test_edited_meta_is_a_config_error_naming_the_key(tmp_path):
    cache_dir = open_or_create_cache(tmp_path, SOURCE, DATA, [1, 2])
    meta = json.loads((cache_dir / META_FILE).read_text())
    meta["config"]["k"] = 16
    (cache_dir / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"config\.k: cached 16, requested 4.*delete the folder"):
        open_or_create_cache(tmp_path, SOURCE, DATA, [1, 2])


def test_other_images_under_the_same_key_is_a_config_error(tmp_path):
    open_or_create_cache(tmp_path, SOURCE, DATA, [1, 2])
    with pytest.raises(ConfigError, match="covers other images"):
        open_or_create_cache(tmp_path, SOURCE, DATA, [1, 2, 3])


def test_shards_without_meta_are_not_adopted(tmp_path):
    cache_dir = cache_dir_for(tmp_path, SOURCE, DATA)
    cache_dir.mkdir()
    write_shard(shard_path(cache_dir, 0), [1], [label_map(1)])
    with pytest.raises(DataError, match="no meta.json"):
        open_or_create_cache(tmp_path, SOURCE, DATA, [1])
