"""The on-disk superpixel cache: `meta.json`, `index.json` and byte-reproducible npz shards.

A cache directory `<cache_root>/<source>-<hash>` holds one source config's label maps for one set of
images. The sorted image ids are cut into consecutive shards of `shard_size`; `index.json` lists
each shard's ids (an image's position in its shard is its index there). Shards are zip files of
`.npy` members (`image_ids`, then `0`, `1`, ... one int16 label map per image) with fixed zip
timestamps, written to a temporary name and renamed, so an interrupted run that resumes writes
exactly the files of an uninterrupted one.
"""

import hashlib
import io
import json
import os
import time
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ConfigError, DataError
from common.files import atomic_write, write_json

FORMAT = 1
META_FILE = "meta.json"
INDEX_FILE = "index.json"
DEFAULT_SHARD_SIZE = 64
VERSIONED_PACKAGES = ("svp-suite", "numpy", "torch", "segment-anything", "scikit-image")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_FIX = "delete the folder to recompute it, or set cache.root to another folder"


def config_hash(cfg: Mapping[str, Any]) -> str:
    """First 16 hex digits of the sha256 of `cfg` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(_canonical(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_dir_for(
    cache_root: str | os.PathLike, source_cfg: Mapping[str, Any], data_key: Mapping[str, Any]
) -> Path:
    """`<cache_root>/<source name>-<hash of source config and data key>`."""
    digest = config_hash({"source": source_cfg, "data": data_key})
    return Path(cache_root) / f"{source_cfg['name']}-{digest}"


def shard_path(cache_dir: str | os.PathLike, shard: int) -> Path:
    return Path(cache_dir) / f"shard-{shard:05d}.npz"


def plan_shards(image_ids: Sequence[Hashable], shard_size: int) -> list[list]:
    """Sorted unique ids cut into consecutive shards: shard k always holds the same ids."""
    if shard_size < 1:
        raise ConfigError(f"superpixels shard_size must be >= 1, got {shard_size}")
    ids = sorted(set(image_ids))
    return [ids[k : k + shard_size] for k in range(0, len(ids), shard_size)]


def write_shard(
    path: Path, image_ids: Sequence[Hashable], label_maps: Sequence[np.ndarray]
) -> None:
    """Write one shard atomically (`atomic_write`), byte-identical for equal inputs."""
    members = {"image_ids": np.asarray(image_ids)}
    members.update({str(i): np.asarray(labels) for i, labels in enumerate(label_maps)})

    data = io.BytesIO()
    with zipfile.ZipFile(data, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, array in members.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, array, allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, buffer.getvalue())
    atomic_write(path, data.getvalue())
    # the shard's checksum, written after it: a shard without one, or another, is damaged
    atomic_write(_checksum_path(path), hashlib.sha256(data.getvalue()).hexdigest())


# what reading a truncated, emptied or bit-flipped shard raises
_DAMAGE = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)


def _damaged(shard: Path, err: BaseException) -> DataError:
    return DataError(
        f"superpixel cache shard {shard} is damaged ({type(err).__name__}: {err}); "
        "`svp precompute` with the run's settings recomputes it."
    )


def _checksum_path(shard: Path) -> Path:
    return shard.with_name(shard.name + ".sha256")


def shard_intact(shard: Path) -> bool:
    """The shard exists and its bytes match the checksum written beside it."""
    try:
        expected = _checksum_path(shard).read_text().strip()
        return hashlib.sha256(shard.read_bytes()).hexdigest() == expected
    except OSError:
        return False


def read_index(cache_dir: str | os.PathLike) -> list[list]:
    """The image ids of every shard, from `index.json`."""
    return _read_json(Path(cache_dir) / INDEX_FILE)["shards"]


def missing_shards(cache_dir: str | os.PathLike, verify: bool = False) -> list[int]:
    """Indices of the shards in `index.json` whose file does not exist yet or, with `verify`,
    does not match its checksum (truncated, emptied, written by a crashed process)."""
    shards = read_index(cache_dir)
    intact = shard_intact if verify else Path.is_file
    return [k for k in range(len(shards)) if not intact(shard_path(cache_dir, k))]


def find_covering_cache(
    cache_root: str | os.PathLike,
    source_cfg: Mapping[str, Any],
    data_key: Mapping[str, Any],
    image_ids: Sequence[Hashable],
    files: Callable[[Sequence[Hashable]], str] | None = None,
) -> Path | None:
    """A complete cache under `cache_root` for the same source config, data roots and datasets
    whose images include every one of `image_ids` — e.g. the train + val + testA + testB cache
    when only val is asked for — or None. With `files` (image ids → the key of what their files
    are), the cache's recorded key must also match its images' files as they are now. The first
    such folder by name, so the choice is stable."""
    source_cfg, data_key = _canonical(source_cfg), _canonical(data_key)
    wanted = set(_canonical(list(image_ids)))
    same = ("roots", "datasets")
    for meta_file in sorted(Path(cache_root).glob(f"{source_cfg['name']}-*/{META_FILE}")):
        try:
            meta = _read_json(meta_file)
            if meta.get("format") != FORMAT or meta.get("config") != source_cfg:
                continue
            if any((meta.get("data") or {}).get(k) != data_key.get(k) for k in same):
                continue
            cache_dir = meta_file.parent
            if missing_shards(cache_dir):
                continue
            cached = [i for shard in read_index(cache_dir) for i in shard]
            if not wanted <= set(cached):
                continue
            if files is None or meta["data"].get("files") == files(cached):
                return cache_dir
        except (DataError, ConfigError, OSError, ValueError, KeyError, TypeError):
            continue  # a damaged or foreign folder is not a candidate
    return None


def open_or_create_cache(
    cache_root: str | os.PathLike,
    source_cfg: Mapping[str, Any],
    data_key: Mapping[str, Any],
    image_ids: Sequence[Hashable],
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> Path:
    """Create the cache folder with `meta.json` and `index.json`, or check an existing one.

    An existing cache keeps its own shard size; a `meta.json` that disagrees with the request
    (an edited file, a hash collision) or an `index.json` that covers other images is a ConfigError.
    """
    source_cfg, data_key = _canonical(source_cfg), _canonical(data_key)
    cache_dir = cache_dir_for(cache_root, source_cfg, data_key)
    meta_file, index_file = cache_dir / META_FILE, cache_dir / INDEX_FILE
    if meta_file.is_file():
        meta = _read_json(meta_file)
        requested = {"format": FORMAT, "config": source_cfg, "data": data_key}
        diffs = _differences({k: meta.get(k) for k in requested}, requested)
        if diffs:
            raise ConfigError(
                f"superpixel cache {meta_file} was written for another config: "
                f"{'; '.join(diffs)}; {_FIX}"
            )
        cached_ids = [i for shard in read_index(cache_dir) for i in shard]
        if cached_ids != sorted(set(_canonical(list(image_ids)))):
            raise ConfigError(
                f"superpixel cache {index_file} covers other images than requested "
                f"({len(cached_ids)} cached, {len(set(image_ids))} requested); {_FIX}"
            )
        return cache_dir
    if cache_dir.is_dir() and any(cache_dir.glob("shard-*.npz")):
        raise DataError(f"superpixel cache {cache_dir} has shards but no {META_FILE}; {_FIX}")
    shards = plan_shards(image_ids, shard_size)
    if not shards:
        raise DataError(f"no images to precompute superpixels for (cache {cache_dir})")
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        index_file,
        {"shard_size": shard_size, "shards": _canonical(shards)},
        indent=1,
        sort_keys=True,
    )
    meta = {
        "format": FORMAT,
        "source": source_cfg["name"],
        "hash": cache_dir.name.rsplit("-", 1)[1],
        "config": source_cfg,
        "data": data_key,
        "shard_size": shard_size,
        "num_images": sum(len(shard) for shard in shards),
        "num_shards": len(shards),
        "versions": {name: _version(name) for name in VERSIONED_PACKAGES},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(meta_file, meta, indent=1, sort_keys=True)
    return cache_dir


class SuperpixelStore:
    """Read access to a finished cache: `get(image_id)` → int16 H×W label map.

    Shards open lazily (only the requested member is decompressed); up to `max_open_shards` stay
    open. Open files are per process, so a store may be shared with forked DataLoader workers.
    """

    def __init__(self, cache_dir: str | os.PathLike, max_open_shards: int = 8) -> None:
        self.cache_dir = Path(cache_dir)
        meta_file = self.cache_dir / META_FILE
        if not meta_file.is_file():
            raise DataError(
                f"no superpixel cache at {self.cache_dir} ({META_FILE} is missing); "
                "run `svp precompute` first"
            )
        self.meta = _read_json(meta_file)
        shards = read_index(self.cache_dir)
        missing = missing_shards(self.cache_dir)
        if missing:
            example = shard_path(self.cache_dir, missing[0]).name
            raise DataError(
                f"superpixel cache {self.cache_dir} is incomplete: {len(missing)} of "
                f"{len(shards)} shards missing (e.g. {example}); "
                "run `svp precompute` to finish it"
            )
        self._where = {i: (k, pos) for k, shard in enumerate(shards) for pos, i in enumerate(shard)}
        self.image_ids = tuple(i for shard in shards for i in shard)
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[int, tuple[Any, np.ndarray]] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.image_ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._where

    def get(self, image_id: Hashable) -> np.ndarray:
        if image_id not in self._where:
            raise DataError(
                f"image {image_id!r} is not in superpixel cache {self.cache_dir} "
                f"({len(self)} images of {self.meta['data']}); run `svp precompute` for the "
                "datasets and splits that contain it"
            )
        shard, pos = self._where[image_id]
        archive, ids = self._shard(shard)
        if ids[pos] != image_id:
            raise DataError(
                f"superpixel cache shard {shard_path(self.cache_dir, shard)} does not match "
                f"{INDEX_FILE}; {_FIX}"
            )
        try:
            return archive[str(pos)]
        except _DAMAGE as err:
            raise _damaged(shard_path(self.cache_dir, shard), err) from None

    def close(self) -> None:
        for archive, _ in self._open.values():
            archive.close()
        self._open.clear()

    def _shard(self, shard: int) -> tuple[Any, np.ndarray]:
        if self._pid != os.getpid():
            self._open, self._pid = OrderedDict(), os.getpid()
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        path = shard_path(self.cache_dir, shard)
        archive = None
        try:
            archive = np.load(path, allow_pickle=False)
            self._open[shard] = archive, archive["image_ids"]
        except _DAMAGE as err:
            if archive is not None:
                archive.close()
            raise _damaged(path, err) from None
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)[1][0].close()
        return self._open[shard]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": OrderedDict()}


def _canonical(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples → lists, numpy scalars → numbers, paths → str)."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else str(value)


def _differences(cached: Any, requested: Any, prefix: str = "") -> list[str]:
    if isinstance(cached, dict) and isinstance(requested, dict):
        keys = sorted(set(cached) | set(requested), key=str)
        return [
            d for k in keys for d in _differences(cached.get(k), requested.get(k), f"{prefix}{k}.")
        ]
    if cached == requested:
        return []
    return [f"{prefix.rstrip('.')}: cached {cached!r}, requested {requested!r}"]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise DataError(f"superpixel cache file {path} is missing; {_FIX}") from err
    except json.JSONDecodeError as err:
        raise DataError(f"superpixel cache file {path} is corrupt ({err}); {_FIX}") from err


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None
