"""`svp precompute`: fill a superpixel cache with a Lightning predict loop, one shard per batch.

Every rank takes the pending shards k with k % world_size == rank (no DistributedSampler, so no
padding duplicates), computes their label maps in `predict_step` with its own copy of the source on
its own device, and `ShardWriter` writes each shard atomically. The same call runs on one CPU or on
many GPUs and nodes (`strategy="ddp"`).
"""

import hashlib
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict
from functools import partial
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
    META_FILE,
    SuperpixelStore,
    cache_dir_for,
    config_hash,
    find_covering_cache,
    missing_shards,
    open_or_create_cache,
    read_index,
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


def data_key_for(datasets: Sequence[ImageDataset]) -> dict[str, Any]:
    """What defines the images: data roots, datasets (name/split_by), the exact image ids, and
    what the files are (`files_key`), so replaced images or annotations get another cache."""
    ids = sorted({i for ds in datasets for i in ds.image_ids})
    return {
        "roots": sorted({str(Path(ds.root).resolve()) for ds in datasets}),
        "datasets": sorted({f"{ds.dataset}/{ds.split_by}" for ds in datasets}),
        "num_images": len(ids),
        "image_ids_sha256": config_hash({"image_ids": ids}),
        "files": files_key(datasets, ids),
    }


def files_key(datasets: Sequence[ImageDataset], image_ids: Sequence[Hashable]) -> str:
    """`file_key` (path, size, mtime) of the data sets' annotation files and of the image file
    of each of `image_ids` (found through the first data set)."""
    annotations = sorted({str(Path(ds.root) / ds.dataset / "instances.json") for ds in datasets})
    first = datasets[0]
    return file_key(*annotations, *(first.image_path(i) for i in sorted(image_ids)))


def superpixel_cache_dir(
    datasets: Sequence[ImageDataset], source_cfg: Any, cache_root: str | Path
) -> Path:
    """The cache folder `precompute_superpixels` uses for these datasets and this source: its own,
    or a complete cache of the same source that covers all their images."""
    identity = source_identity(resolve_source_config(source_cfg))
    ids = [i for ds in datasets for i in ds.image_ids]
    return _cache_folder(
        cache_root, identity, data_key_for(datasets), ids, partial(files_key, datasets)
    )


def _cache_folder(
    cache_root: str | Path,
    identity: dict,
    data_key: dict,
    image_ids: Sequence[Hashable],
    files: Callable[[Sequence[Hashable]], str],
) -> Path:
    """The request's own cache folder once it exists (complete or not); else a complete cache of
    the same source that holds every image (`find_covering_cache`); else the own folder, to be
    created."""
    own = cache_dir_for(cache_root, identity, data_key)
    if (own / META_FILE).is_file():
        return own
    return find_covering_cache(cache_root, identity, data_key, image_ids, files) or own


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
    """Compute the label maps of every image of `datasets` (the union of their ids) into the cache.

    Finished shards are skipped, so an interrupted run resumes; with nothing left no Trainer starts.
    With `verify`, a shard that does not match its checksum counts as not finished (and a
    covering cache with one is not used): `svp precompute` repairs damaged caches; a training
    start, which reads every shard it needs anyway, skips the hashing.
    `superpixels.device` is ignored here: each rank runs the source on its own device.

    Returns:
      the cache folder and a summary: images, images_computed, seconds, images_per_s.
    """
    datasets = list(datasets)
    if not datasets:
        raise DataError("no datasets given to precompute superpixels for")
    build_cfg = resolve_source_config(source_cfg)
    identity = source_identity(build_cfg)
    name = build_cfg["name"]
    owners: dict[Hashable, ImageDataset] = {}
    for ds in datasets:
        for image_id in ds.image_ids:
            owners.setdefault(image_id, ds)
    data_key = data_key_for(datasets)
    folder = _cache_folder(
        cache_root, identity, data_key, list(owners), partial(files_key, datasets)
    )
    own = cache_dir_for(cache_root, identity, data_key)
    if folder != own and verify and missing_shards(folder, verify=True):
        _say(progress, f"superpixel cache {folder} has damaged shards; computing {own}")
        folder = own
    if folder != own:  # e.g. `svp eval data.eval_splits=[val]` after training on every split:
        # the full cache holds these
        total = len(owners)
        _say(progress, f"superpixel cache {folder} holds all {total} images (source {name})")
        return folder, _summary(total, 0, 0.0)
    cache_dir = open_or_create_cache(cache_root, identity, data_key, list(owners), shard_size)
    remove_stale_temps(cache_dir)  # what a killed run was writing
    shards = read_index(cache_dir)
    pending = [(k, shards[k]) for k in missing_shards(cache_dir, verify=verify)]
    total = sum(len(ids) for ids in shards)
    if not pending:
        _say(progress, f"superpixel cache {cache_dir} is complete ({total} images, source {name})")
        return cache_dir, _summary(total, 0, 0.0)

    jobs = ShardJobs(pending, owners, SOURCES[name].needs_instances)
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
    trainer.predict(SuperpixelPredictor(build_cfg, jobs), return_predictions=False)
    trainer.strategy.barrier("superpixel shards written")
    seconds = time.perf_counter() - start
    summary = _summary(total, sum(len(ids) for _, ids in pending), seconds)
    if trainer.is_global_zero:
        SuperpixelStore(cache_dir)
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
    """Open the cache for these datasets and source, precomputing what is missing first (shards
    are checked for presence; `svp precompute` checks their checksums)."""
    cache_dir, _ = precompute_superpixels(
        datasets, source_cfg, cache_root, shard_size=shard_size, verify=False, **trainer_kwargs
    )
    return SuperpixelStore(cache_dir)


class ShardJobs(Dataset):
    """Pending shards as items: the shard index, its image ids, images and instance masks."""

    def __init__(
        self,
        shards: list[tuple[int, list]],
        owners: Mapping[Hashable, ImageDataset],
        with_instances: bool,
    ) -> None:
        self.shards, self.owners, self.with_instances = shards, owners, with_instances

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, ids = self.shards[index]
        return {
            "shard": shard,
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
        return {"shard": batch["shard"], "image_ids": batch["image_ids"], "labels": labels}

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
        path = shard_path(self.cache_dir, prediction["shard"])
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


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
