"""`svp precompute`: fill a superpixel cache with a Lightning predict loop, one shard per batch.

A request is the images of some data sets (the union of their ids), each with the identity of its
file; the cache of their image set computes only what it lacks (`plan_work`). Every rank takes the
shard jobs k with k % world_size == rank (no DistributedSampler, so no padding duplicates),
computes their label maps in `predict_step` with its own copy of the source on its own device, and
`ShardWriter` writes each shard atomically. The same call runs on one CPU or on many GPUs and nodes
(`strategy="ddp"`).
"""

import hashlib
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset, Subset

from common.errors import DataError
from common.files import file_key, remove_stale_temps

from .base import SOURCES, build_source, source_config
from .store import (
    DEFAULT_SHARD_SIZE,
    ShardJob,
    SuperpixelStore,
    cache_dir_for,
    check_shard_size,
    config_hash,
    open_or_create_cache,
    plan_work,
    shard_path,
    write_shard,
)

RUNTIME_KEYS = ("device",)


class ImageDataset(Protocol):
    """What precompute needs of a `ReferDataset`."""

    root: Path
    dataset: str
    split_by: str
    image_ids: Sequence[Hashable]
    images_dir: Path

    def image_path(self, image_id: Hashable) -> Path: ...

    def load_image(self, image_id: Hashable) -> np.ndarray: ...

    def instance_masks(self, image_id: Hashable) -> np.ndarray: ...


def resolve_source_config(source_cfg: Any) -> dict[str, Any]:
    """The full source config (every field, defaults filled in) as a plain dict."""
    return asdict(source_config(source_cfg))


def source_identity(source_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What defines the label maps: the config without runtime keys (`device`), and a checkpoint
    file named by its content (sha256) rather than its path, so retrained weights get a new cache.
    """
    identity = {k: v for k, v in source_cfg.items() if k not in RUNTIME_KEYS}
    checkpoint = identity.get("checkpoint")
    if checkpoint and Path(checkpoint).is_file():
        identity["checkpoint"] = f"sha256:{_file_sha256(Path(checkpoint))}"
    return identity


def image_set(ds: ImageDataset, needs_instances: bool) -> dict[str, str]:
    """What a data set's label maps are computed from: its images folder, and for sources that
    read instance masks, its annotation file. Data sets with the same image set share a cache."""
    key = {"images": str(Path(ds.images_dir).resolve())}
    if needs_instances:
        key["annotations"] = str(_instances_file(ds).resolve())
    return key


def by_image_set(datasets: Sequence[ImageDataset], source_cfg: Any) -> list[list[ImageDataset]]:
    """`datasets` grouped by `image_set` for this source, in order of first appearance."""
    needs_instances = SOURCES[resolve_source_config(source_cfg)["name"]].needs_instances
    groups: dict[str, list[ImageDataset]] = {}
    for ds in datasets:
        groups.setdefault(config_hash(image_set(ds, needs_instances)), []).append(ds)
    return list(groups.values())


@dataclass
class Request:
    """The images of some data sets over one image set: each id's file identity and the data set
    that loads it."""

    image_set: dict[str, str]
    files: dict[Hashable, str]
    owners: dict[Hashable, ImageDataset]


def request_for(datasets: Sequence[ImageDataset], needs_instances: bool) -> Request:
    """The union of the data sets' images, each named by `file_key` of its image file (and, for
    sources that read instance masks, of the annotation file): a replaced file is recomputed."""
    datasets = list(datasets)
    if not datasets:
        raise DataError("no datasets given to precompute superpixels for")
    groups = {config_hash(image_set(ds, needs_instances)): ds for ds in datasets}
    if len(groups) > 1:
        a, b = list(groups.values())[:2]
        raise DataError(
            f"{a.dataset} and {b.dataset} draw on different images ({a.images_dir}, "
            f"{b.images_dir}) and so have separate superpixel caches; precompute each on its own"
        )
    owners: dict[Hashable, ImageDataset] = {}
    for ds in datasets:
        for image_id in ds.image_ids:
            first = owners.setdefault(image_id, ds)
            if first is not ds and first.image_path(image_id) != ds.image_path(image_id):
                raise DataError(
                    f"image_id {image_id} is {first.image_path(image_id)} in {first.dataset} but "
                    f"{ds.image_path(image_id)} in {ds.dataset}; data sets that share an images "
                    "folder must give each file one id. Fix their instances.json files."
                )
    extra = [_instances_file(datasets[0])] if needs_instances else []
    files = {i: file_key(ds.image_path(i), *extra) for i, ds in owners.items()}
    return Request(image_set(datasets[0], needs_instances), files, owners)


def open_superpixel_store(
    datasets: Sequence[ImageDataset], source_cfg: Any, cache_root: str | Path
) -> SuperpixelStore:
    """The store that holds the current label maps of every image of `datasets` (one image set);
    a DataError naming `svp precompute` when it lacks any or an image file changed since."""
    build_cfg = resolve_source_config(source_cfg)
    request = request_for(datasets, SOURCES[build_cfg["name"]].needs_instances)
    cache_dir = cache_dir_for(cache_root, source_identity(build_cfg), request.image_set)
    store = SuperpixelStore(cache_dir, request.files)
    changed = [i for i, key in request.files.items() if store.entries[i].identity != key]
    if changed:
        path = request.owners[changed[0]].image_path(changed[0])
        raise DataError(
            f"{len(changed)} images changed since their superpixels were computed into "
            f"{cache_dir} (e.g. {path}); run `svp precompute` to recompute them"
        )
    return store


def precompute_superpixels(
    datasets: Sequence[ImageDataset],
    source_cfg: Any,
    cache_root: str | Path,
    shard_size: int = DEFAULT_SHARD_SIZE,
    accelerator: str = "cpu",
    devices: int | str = 1,
    strategy: str = "auto",
    num_nodes: int = 1,
    progress: bool = True,
    verify: bool = True,
) -> tuple[Path, dict[str, float]]:
    """Compute the label maps that the cache of the data sets' image set lacks for their images
    (the union of their ids); the data sets must share one image set (`by_image_set`).

    What is cached is skipped, so an interrupted run resumes and a second data set over the same
    images computes only the images the first did not have; with nothing left no Trainer starts.
    With `verify`, a shard that does not match its checksum counts as not written: `svp
    precompute` repairs damaged caches; a training start, which reads every shard it needs
    anyway, skips the hashing. `superpixels.device` is ignored here: each rank runs the source on
    its own device.

    Returns:
      the cache folder and a summary: images, images_computed, seconds, images_per_s.
    """
    check_shard_size(shard_size)  # before the cache folder is made
    build_cfg = resolve_source_config(source_cfg)
    name = build_cfg["name"]
    request = request_for(datasets, SOURCES[name].needs_instances)
    if not request.files:
        raise DataError(f"no images to precompute superpixels for ({len(datasets)} data sets)")
    cache_dir = open_or_create_cache(cache_root, source_identity(build_cfg), request.image_set)
    remove_stale_temps(cache_dir)  # what a killed run was writing
    jobs = plan_work(cache_dir, request.files, shard_size, verify=verify)
    total = len(request.files)
    if not jobs:
        message = f"superpixel cache {cache_dir} is complete for these {total} images"
        _say(progress, f"{message} (source {name})")
        return cache_dir, _summary(total, 0, 0.0)

    trainer = Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        num_nodes=num_nodes,
        callbacks=[ShardWriter(cache_dir)],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        use_distributed_sampler=False,
    )
    start = time.perf_counter()
    shard_jobs = ShardJobs(jobs, request.owners, SOURCES[name].needs_instances)
    trainer.predict(SuperpixelPredictor(build_cfg, shard_jobs), return_predictions=False)
    trainer.strategy.barrier("superpixel shards written")
    seconds = time.perf_counter() - start
    summary = _summary(total, sum(len(job.image_ids) for job in jobs), seconds)
    if trainer.is_global_zero:
        SuperpixelStore(cache_dir, request.files)
        _say(
            progress,
            f"superpixels {name}: {summary['images_computed']} images in {seconds:.1f} s "
            f"({summary['images_per_s']:.2f} images/s) -> {cache_dir}",
        )
    return cache_dir, summary


def ensure_superpixel_cache(
    datasets: Sequence[ImageDataset],
    source_cfg: Any,
    cache_root: str | Path,
    shard_size: int = DEFAULT_SHARD_SIZE,
    **trainer_kwargs: Any,
) -> SuperpixelStore:
    """Open the store for these data sets (one image set) and source, precomputing what is
    missing first (shards are checked for presence; `svp precompute` checks their checksums)."""
    cache_dir, _ = precompute_superpixels(
        datasets, source_cfg, cache_root, shard_size=shard_size, verify=False, **trainer_kwargs
    )
    return SuperpixelStore(cache_dir, [i for ds in datasets for i in ds.image_ids])


class ShardJobs(Dataset):
    """Shard jobs as items: the part and shard, its image ids, images and instance masks."""

    def __init__(
        self,
        jobs: list[ShardJob],
        owners: Mapping[Hashable, ImageDataset],
        with_instances: bool,
    ) -> None:
        self.jobs, self.owners, self.with_instances = jobs, owners, with_instances

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        job = self.jobs[index]
        ids = job.image_ids
        return {
            "part": job.part,
            "shard": job.shard,
            "image_ids": ids,
            "images": [self.owners[i].load_image(i) for i in ids],
            "instances": [
                self.owners[i].instance_masks(i) if self.with_instances else None for i in ids
            ],
        }


class SuperpixelPredictor(LightningModule):
    """`predict_step`: one shard's images → label maps. The source is built once per process."""

    def __init__(self, source_cfg: dict[str, Any], jobs: ShardJobs) -> None:
        super().__init__()
        self.source_cfg, self.jobs, self.source = source_cfg, jobs, None
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def predict_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        mine = Subset(self.jobs, range(rank, len(self.jobs), world))
        return DataLoader(mine, batch_size=1, collate_fn=_only_item)

    def on_predict_start(self) -> None:
        if self.source is None:
            cfg = dict(self.source_cfg)
            if "device" in cfg:
                cfg["device"] = str(self.trainer.strategy.root_device)
            self.source = build_source(cfg)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        items = zip(batch["image_ids"], batch["images"], batch["instances"])
        labels = [self._partition(image_id, image, masks) for image_id, image, masks in items]
        return {**{k: batch[k] for k in ("part", "shard", "image_ids")}, "labels": labels}

    def _partition(self, image_id: Hashable, image: np.ndarray, masks: Any) -> np.ndarray:
        labels = self.source(image, masks)
        if labels.dtype != np.int16 or labels.shape != image.shape[:2]:
            raise DataError(
                f"superpixel source {self.source_cfg['name']!r} returned a {labels.dtype} "
                f"{labels.shape} map for image {image_id} of size {image.shape[:2]}; "
                "a source must return an int16 label map of the image's size"
            )
        return labels


class ShardWriter(BasePredictionWriter):
    """Writes each predicted shard to the cache as soon as it is computed."""

    def __init__(self, cache_dir: Path) -> None:
        super().__init__(write_interval="batch")
        self.cache_dir = cache_dir

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: dict[str, Any],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        path = shard_path(self.cache_dir, prediction["part"], prediction["shard"])
        write_shard(path, prediction["image_ids"], prediction["labels"])


def _summary(images: int, computed: int, seconds: float) -> dict[str, float]:
    rate = computed / seconds if seconds > 0 else 0.0
    return {"images": images, "images_computed": computed, "seconds": seconds, "images_per_s": rate}


def _only_item(items: list[dict[str, Any]]) -> dict[str, Any]:
    return items[0]


@rank_zero_only
def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, flush=True)


def _instances_file(ds: ImageDataset) -> Path:
    return Path(ds.root) / ds.dataset / "instances.json"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
