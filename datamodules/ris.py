"""`RISDataModule`: REFER samples + superpixel maps + tokenised prompts, padded per batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from pytorch_lightning.utilities.seed import isolate_rng
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Subset

from common.errors import DataError
from datamodules.mix import MixSampler, training_sets
from datamodules.refer import ReferDataset
from datamodules.superpixels.store import SuperpixelStore


def resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """Nearest-resize a label map to size×size and relabel it 0..K-1 (tiny regions may vanish)."""
    h, w = labels.shape
    ys = (np.arange(size) * h // size).clip(0, h - 1)
    xs = (np.arange(size) * w // size).clip(0, w - 1)
    small = labels[ys[:, None], xs[None, :]]
    _, inverse = np.unique(small, return_inverse=True)
    return inverse.reshape(size, size).astype(np.int64)


@dataclass
class TextEncoding:
    input_ids: list[int]
    labels: list[int]


class PromptEncoder:
    """Turns a referring sentence into `[bos] prompt answer [eos]` ids with answer-only labels."""

    def __init__(self, tokenizer, prompt: str, answer: str):
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.answer = answer
        if "{sentence}" not in prompt or "<image>" not in prompt:
            raise DataError(
                f"data.prompt must contain '<image>' and '{{sentence}}'; got {prompt!r}."
            )

    def __call__(self, sentence: str) -> TextEncoding:
        tok = self.tokenizer
        prompt_ids = tok(self.prompt.format(sentence=sentence), add_special_tokens=False)[
            "input_ids"
        ]
        answer_ids = tok(" " + self.answer, add_special_tokens=False)["input_ids"]
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        ids = bos + prompt_ids + answer_ids + eos
        labels = [-100] * (len(bos) + len(prompt_ids)) + answer_ids + eos
        return TextEncoding(ids, labels)


class RISDataset(Dataset):
    """One sample per sentence, with its image's superpixel map when a store is given."""

    def __init__(self, refer: ReferDataset, store=None, label_size: int = 64):
        self.refer = refer
        self.store = store
        self.label_size = label_size

    def __len__(self) -> int:
        return len(self.refer)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.refer[index])
        if self.store is not None:
            item["superpixels"] = self.store.get(item["image_id"])
        if "superpixels" in item:
            item["labels"] = resize_labels(item["superpixels"], self.label_size)
        return item


def pad_encodings(encodings: list[TextEncoding], pad_id: int) -> dict[str, torch.Tensor]:
    """`input_ids` (right-padded with `pad_id`), `text_labels` (−100 on padding) and
    `text_lengths` of a batch of encodings."""
    length = max(len(e.input_ids) for e in encodings)
    ids = torch.full((len(encodings), length), pad_id, dtype=torch.long)
    lab = torch.full((len(encodings), length), -100, dtype=torch.long)
    for i, e in enumerate(encodings):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        lab[i, : len(e.labels)] = torch.tensor(e.labels)
    lengths = torch.tensor([len(e.input_ids) for e in encodings])
    return {"input_ids": ids, "text_labels": lab, "text_lengths": lengths}


def pad_id(tokenizer) -> int:
    """The tokenizer's padding id (0 when it has none)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def world_of(datamodule: pl.LightningDataModule) -> tuple[int, int]:
    """(processes, this rank) of the trainer a data module is attached to; (1, 0) without one."""
    trainer = getattr(datamodule, "trainer", None)
    return (1, 0) if trainer is None else (trainer.world_size, trainer.global_rank)


class RISCollate:
    """Pads variable-length text and variable superpixel counts; keeps images at native size."""

    def __init__(self, prompt_encoder: PromptEncoder, pad_id: int):
        self.encode = prompt_encoder
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict[str, Any]:
        enc = [self.encode(it["sentence"]) for it in items]
        batch: dict[str, Any] = {
            "images": [torch.from_numpy(np.ascontiguousarray(it["image"])) for it in items],
            "masks": [torch.from_numpy(np.ascontiguousarray(it["mask"])) for it in items],
            **pad_encodings(enc, self.pad_id),
            "sentences": [it["sentence"] for it in items],
            "image_ids": torch.tensor([int(it["image_id"]) for it in items]),
            "ref_ids": torch.tensor([int(it["ref_id"]) for it in items]),
            "sent_ids": torch.tensor([int(it["sent_id"]) for it in items]),
        }
        if "labels" in items[0]:
            batch["labels"] = torch.from_numpy(np.stack([it["labels"] for it in items]))
            batch["superpixels"] = [torch.from_numpy(it["superpixels"]) for it in items]
        return batch


def _limit(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    if limit is None or limit >= len(dataset):
        return dataset
    rng = np.random.default_rng(seed)
    return Subset(dataset, sorted(rng.choice(len(dataset), size=limit, replace=False).tolist()))


class RISDataModule(pl.LightningDataModule):
    """Train split(s) + one eval loader per eval split (val/testA/testB), in that order.

    Without `data.mix` training reads `data.dataset`'s train split in a shuffled order; with it,
    the mixed train splits by their rates (`datamodules.mix`). Evaluation reads `data.dataset`.
    """

    def __init__(self, cfg, tokenizer):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.needs_superpixels = cfg.projector.name == "semantic"
        self.mixed = bool(cfg.data.get("mix"))
        self.train_sources = training_sets(cfg.data)
        self.stores: dict[tuple[str, str], SuperpixelStore] = {}  # by (dataset, split_by)
        self.train_set: Dataset | None = None
        self.eval_sets: dict[str, Dataset] = {}

    def _refer(self, split: str) -> ReferDataset:
        d = self.cfg.data
        return ReferDataset(d.root, d.dataset, d.split_by, split)

    def _train_refers(self) -> list[ReferDataset]:
        d = self.cfg.data
        return [
            ReferDataset(d.root, s.dataset, s.split_by, d.train_split) for s in self.train_sources
        ]

    def superpixel_datasets(self) -> list[ReferDataset]:
        """Every split a run reads: the train split of each data set it trains on, then
        `data.dataset`'s eval splits."""
        return [*self._train_refers(), *(self._refer(s) for s in self.cfg.data.eval_splits)]

    def prepare_data(self) -> None:
        """Builds the superpixel caches on rank 0 when the projector needs them and they lack
        images, leaving the random state as it was: a run gives the same numbers whether it built
        the caches or found them."""
        if self.needs_superpixels:
            with isolate_rng(include_cuda=False):
                self._open_stores(compute=True)

    def superpixels_ready(self) -> bool:
        """Whether the superpixel caches this run reads hold all its images (or are not needed)."""
        if not self.needs_superpixels:
            return True
        try:
            self._open_stores(compute=False)  # opening a store checks it holds the images
        except DataError:
            return False
        return True

    def _open_stores(self, compute: bool) -> dict[tuple[str, str], SuperpixelStore]:
        """One store per image set the run's splits draw on (RefCOCO/+/g share one)."""
        from datamodules.superpixels.precompute import (
            by_image_set,
            ensure_superpixel_cache,
            open_superpixel_store,
        )

        source_cfg = _plain(self.cfg.superpixels)
        on_gpu = self.cfg.trainer.accelerator in ("gpu", "cuda")
        stores = {}
        for datasets in by_image_set(self.superpixel_datasets(), source_cfg):
            if compute:
                store = ensure_superpixel_cache(
                    datasets,
                    source_cfg,
                    self.cfg.cache.root,
                    shard_size=self.cfg.cache.shard_size,
                    accelerator="gpu" if on_gpu else "cpu",
                    devices=1,  # nested inside prepare_data: one device
                )
            else:
                store = open_superpixel_store(datasets, source_cfg, self.cfg.cache.root)
            stores.update({(ds.dataset, ds.split_by): store for ds in datasets})
        return stores

    def _dataset(self, refer: ReferDataset) -> RISDataset:
        store = self.stores.get((refer.dataset, refer.split_by))
        return RISDataset(refer, store, self.cfg.data.label_size)

    def setup(self, stage: str | None = None) -> None:
        d = self.cfg.data
        if self.needs_superpixels and not self.stores:
            self.stores = self._open_stores(compute=False)
        if stage in (None, "fit") and self.train_set is None:
            limit, seed = d.limit_train_sentences, self.cfg.seed
            sets = [_limit(self._dataset(r), limit, seed) for r in self._train_refers()]
            self.train_set = ConcatDataset(sets) if self.mixed else sets[0]
        for split in d.eval_splits:
            if split not in self.eval_sets:
                self.eval_sets[split] = self._dataset(self._refer(split))

    def _collate(self) -> RISCollate:
        tok = self.tokenizer
        encoder = PromptEncoder(tok, self.cfg.data.prompt, self.cfg.data.answer)
        return RISCollate(encoder, pad_id(tok))

    def train_dataloader(self) -> DataLoader:
        d = self.cfg.data
        world, rank = world_of(self)
        if self.mixed:
            sizes = [len(part) for part in self.train_set.datasets]
            rates = [source.rate for source in self.train_sources]
            sampler = MixSampler(sizes, rates, self.cfg.seed, num_replicas=world, rank=rank)
        else:  # one order per (seed, epoch), also with one process: a resumed run goes on alike
            sampler = DistributedSampler(
                self.train_set, num_replicas=world, rank=rank, shuffle=True, seed=self.cfg.seed
            )
        return DataLoader(
            self.train_set,
            batch_size=d.batch_size,
            sampler=sampler,
            num_workers=d.num_workers,
            collate_fn=self._collate(),
            persistent_workers=d.num_workers > 0,
        )

    def _eval_loaders(self, limit: int | None) -> list[DataLoader]:
        """Each rank sees a disjoint share and no sample twice, so cIoU sums are exact in DDP."""
        d = self.cfg.data
        world, rank = world_of(self)
        loaders = []
        for split in d.eval_splits:
            ds = _limit(self.eval_sets[split], limit, self.cfg.seed)
            sampler = None
            if world > 1:
                sampler = UnrepeatedDistributedSampler(
                    ds, num_replicas=world, rank=rank, shuffle=False
                )
            loaders.append(
                DataLoader(
                    ds,
                    batch_size=d.eval_batch_size,
                    shuffle=False,
                    sampler=sampler,
                    num_workers=d.num_workers,
                    collate_fn=self._collate(),
                )
            )
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.cfg.data.limit_val_sentences)

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.cfg.data.limit_test_sentences)


def _plain(node) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if not isinstance(node, dict) else node
