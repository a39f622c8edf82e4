"""The on-disk superpixel cache: one folder per source config and image set, grown in parts.

A cache folder `<cache_root>/<source>-<hash>` holds the label maps of one source config for the
images of one images folder (for sources that read instance masks: and one annotation file),
whichever data sets ask for them: RefCOCO, RefCOCO+ and RefCOCOg share COCO train2014, so they
share one cache. `meta.json` names the source config and the image set.

The folder grows in *parts*. A request with images that are not cached yet (or whose file changed)
writes one part, `part-<seq>-<hash>.json`: those images, sorted by id and cut into consecutive
shards of `shard_size`, each image with the identity of its file (`file_key`: path, size, mtime).
Shards (`part-<seq>-<hash>-<k>.npz`) are zip files of `.npy` members (`image_ids`, then `0`, `1`,
... one int16 label map per image) with fixed zip timestamps and a `.sha256` beside them, written
to a temporary name and renamed, so an interrupted run that resumes writes exactly the files of an
uninterrupted one. An image's entry in a later part replaces its entries in earlier ones.
"""

import hashlib
import io
import json
import os
import time
import zipfile
import zlib
from collections import OrderedDict, defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ConfigError, DataError
from common.files import atomic_write, write_json

FORMAT = 2
META_FILE = "meta.json"
DEFAULT_SHARD_SIZE = 64
VERSIONED_PACKAGES = ("svp-suite", "numpy", "torch", "segment-anything", "scikit-image")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_FIX = "delete the folder to recompute it, or set cache.root to another folder"


def config_hash(cfg: Mapping[str, Any]) -> str:
    """First 16 hex digits of the sha256 of `cfg` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(_canonical(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_dir_for(
    cache_root: str | os.PathLike, source_cfg: Mapping[str, Any], image_set: Mapping[str, Any]
) -> Path:
    """`<cache_root>/<source name>-<hash of source config and image set>`."""
    digest = config_hash({"source": source_cfg, "images": image_set})
    return Path(cache_root) / f"{source_cfg['name']}-{digest}"


def part_file(cache_dir: str | os.PathLike, part: str) -> Path:
    return Path(cache_dir) / f"{part}.json"


def shard_path(cache_dir: str | os.PathLike, part: str, shard: int) -> Path:
    return Path(cache_dir) / f"{part}-{shard:05d}.npz"


def check_shard_size(shard_size: int) -> None:
    """ConfigError, naming `cache.shard_size`, unless it is at least 1."""
    if shard_size < 1:
        raise ConfigError(f"cache.shard_size={shard_size} must be at least 1 (images per file).")


def plan_shards(files: Mapping[Hashable, str], shard_size: int) -> list[list[list]]:
    """`[image id, file identity]` pairs sorted by id and cut into consecutive shards."""
    check_shard_size(shard_size)
    pairs = [[i, files[i]] for i in sorted(files)]
    return [pairs[k : k + shard_size] for k in range(0, len(pairs), shard_size)]


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


@dataclass(frozen=True)
class Part:
    """One part of a cache: its name and, per shard, the `[image id, file identity]` pairs."""

    name: str
    shards: list[list[list]]

    @property
    def seq(self) -> int:
        return int(self.name.split("-")[1])


@dataclass(frozen=True)
class Entry:
    """Where an image's label map is: part, shard, position in the shard; and its file identity."""

    part: str
    shard: int
    pos: int
    identity: str


@dataclass(frozen=True)
class ShardJob:
    """A shard to compute: its part, its index there and its image ids, in order."""

    part: str
    shard: int
    image_ids: list


def read_parts(cache_dir: str | os.PathLike) -> list[Part]:
    """Every part of the cache, oldest first (by sequence number, then hash)."""
    parts = []
    for file in sorted(Path(cache_dir).glob("part-*.json")):
        data = _read_json(file)
        if not isinstance(data, dict) or not isinstance(data.get("shards"), list):
            raise DataError(f"superpixel cache file {file} is corrupt (no shards); {_FIX}")
        parts.append(Part(file.stem, data["shards"]))
    return parts


def latest_entries(parts: Iterable[Part]) -> dict[Hashable, Entry]:
    """Image id → its entry in the newest part that holds it."""
    entries: dict[Hashable, Entry] = {}
    for part in parts:
        for k, shard in enumerate(part.shards):
            for pos, (image_id, identity) in enumerate(shard):
                entries[image_id] = Entry(part.name, k, pos, identity)
    return entries


def add_part(
    cache_dir: str | os.PathLike,
    files: Mapping[Hashable, str],
    shard_size: int,
    parts: Sequence[Part],
) -> Part:
    """Write the part for `files` (image id → file identity) after `parts`; its name is a
    function of its content, so every process that plans the same part writes the same file."""
    shards = plan_shards(files, shard_size)
    seq = 1 + max((p.seq for p in parts), default=-1)
    part = Part(f"part-{seq:05d}-{config_hash({'shards': shards})}", shards)
    write_json(
        part_file(cache_dir, part.name),
        {"format": FORMAT, "shard_size": shard_size, "shards": shards},
        indent=1,
        sort_keys=True,
    )
    return part


def plan_work(
    cache_dir: str | os.PathLike,
    files: Mapping[Hashable, str],
    shard_size: int = DEFAULT_SHARD_SIZE,
    verify: bool = False,
) -> list[ShardJob]:
    """The shards to compute so that every image of `files` (image id → file identity) has a
    written entry of its current file, in (part, shard) order.

    A shard that is not written yet (with `verify`: or does not match its checksum) and holds only
    images of `files`, at their current identity, is recomputed in place: a resumed or repaired
    run writes the bytes of an uninterrupted one. Images that are not cached, whose file changed,
    or whose shard holds images this request cannot load go into a new part.
    """
    files = dict(zip(_canonical(list(files)), files.values()))
    parts = read_parts(cache_dir)
    latest = latest_entries(parts)
    shards = {p.name: p.shards for p in parts}
    intact = shard_intact if verify else Path.is_file
    fresh: list[Hashable] = []
    current: dict[tuple[str, int], list] = defaultdict(list)
    for image_id, identity in files.items():
        entry = latest.get(image_id)
        if entry is None or entry.identity != identity:
            fresh.append(image_id)
        else:
            current[entry.part, entry.shard].append(image_id)
    jobs = []
    for (part, k), ids in sorted(current.items()):
        if intact(shard_path(cache_dir, part, k)):
            continue
        if all(files.get(i) == identity for i, identity in shards[part][k]):
            jobs.append(ShardJob(part, k, [i for i, _ in shards[part][k]]))
        else:
            fresh.extend(ids)
    if fresh:
        new = add_part(cache_dir, {i: files[i] for i in fresh}, shard_size, parts)
        jobs += [ShardJob(new.name, k, [i for i, _ in ids]) for k, ids in enumerate(new.shards)]
    return jobs


def open_or_create_cache(
    cache_root: str | os.PathLike, source_cfg: Mapping[str, Any], image_set: Mapping[str, Any]
) -> Path:
    """Create the cache folder with its `meta.json`, or check an existing one: a `meta.json`
    that disagrees with the request (an edited file, a hash collision) is a ConfigError."""
    source_cfg, image_set = _canonical(source_cfg), _canonical(image_set)
    cache_dir = cache_dir_for(cache_root, source_cfg, image_set)
    meta_file = cache_dir / META_FILE
    requested = {"format": FORMAT, "config": source_cfg, "images": image_set}
    if meta_file.is_file():
        meta = _read_json(meta_file)
        diffs = _differences({k: meta.get(k) for k in requested}, requested)
        if diffs:
            raise ConfigError(
                f"superpixel cache {meta_file} was written for another config: "
                f"{'; '.join(diffs)}; {_FIX}"
            )
        return cache_dir
    if cache_dir.is_dir() and any(cache_dir.glob("part-*")):
        raise DataError(f"superpixel cache {cache_dir} has parts but no {META_FILE}; {_FIX}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        **requested,
        "source": source_cfg["name"],
        "hash": cache_dir.name.rsplit("-", 1)[1],
        "versions": {name: _version(name) for name in VERSIONED_PACKAGES},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(meta_file, meta, indent=1, sort_keys=True)
    return cache_dir


class SuperpixelStore:
    """Read access to a cache: `get(image_id)` → the int16 H×W label map of its newest entry.

    Opening checks that every one of `image_ids` (default: every cached image) is in the cache
    and its shard is written. Shards open lazily (only the requested member is decompressed); up
    to `max_open_shards` stay open. Open files are per process, so a store may be shared with
    DataLoader workers (forked or pickled).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        image_ids: Iterable[Hashable] | None = None,
        max_open_shards: int = 8,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        meta_file = self.cache_dir / META_FILE
        if not meta_file.is_file():
            raise DataError(
                f"no superpixel cache at {self.cache_dir} ({META_FILE} is missing); "
                "run `svp precompute` first"
            )
        self.meta = _read_json(meta_file)
        self.entries = latest_entries(read_parts(self.cache_dir))
        self.image_ids = tuple(sorted(self.entries))
        self._check(self.image_ids if image_ids is None else _canonical(list(image_ids)))
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[tuple[str, int], tuple[Any, np.ndarray]] = OrderedDict()
        self._pid = os.getpid()

    def _check(self, image_ids: Sequence[Hashable]) -> None:
        absent = [i for i in image_ids if i not in self.entries]
        if absent:
            raise DataError(
                f"superpixel cache {self.cache_dir} lacks {len(absent)} of the "
                f"{len(set(image_ids))} images asked for (e.g. image {absent[0]!r}); run "
                "`svp precompute` for the data sets and splits that contain them"
            )
        shards = sorted({(self.entries[i].part, self.entries[i].shard) for i in image_ids})
        missing = [s for s in shards if not shard_path(self.cache_dir, *s).is_file()]
        if missing:
            example = shard_path(self.cache_dir, *missing[0]).name
            raise DataError(
                f"superpixel cache {self.cache_dir} is incomplete: {len(missing)} of "
                f"{len(shards)} shards missing (e.g. {example}); "
                "run `svp precompute` to finish it"
            )

    def __len__(self) -> int:
        return len(self.image_ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self.entries

    def get(self, image_id: Hashable) -> np.ndarray:
        entry = self.entries.get(image_id)
        if entry is None:
            raise DataError(
                f"image {image_id!r} is not in superpixel cache {self.cache_dir} "
                f"({len(self)} images of {self.meta['images']}); run `svp precompute` for the "
                "data sets and splits that contain it"
            )
        archive, ids = self._shard(entry.part, entry.shard)
        path = shard_path(self.cache_dir, entry.part, entry.shard)
        if entry.pos >= len(ids) or ids[entry.pos] != image_id:
            raise DataError(
                f"superpixel cache shard {path} does not match "
                f"{part_file(self.cache_dir, entry.part).name}; {_FIX}"
            )
        try:
            return archive[str(entry.pos)]
        except _DAMAGE as err:
            raise _damaged(path, err) from None

    def close(self) -> None:
        for archive, _ in self._open.values():
            archive.close()
        self._open.clear()

    def _shard(self, part: str, shard: int) -> tuple[Any, np.ndarray]:
        if self._pid != os.getpid():
            self._open, self._pid = OrderedDict(), os.getpid()
        key = part, shard
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        path = shard_path(self.cache_dir, part, shard)
        archive = None
        try:
            archive = np.load(path, allow_pickle=False)
            self._open[key] = archive, archive["image_ids"]
        except _DAMAGE as err:
            if archive is not None:
                archive.close()
            raise _damaged(path, err) from None
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)[1][0].close()
        return self._open[key]

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
