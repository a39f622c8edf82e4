"""`data.mix`: training sentences drawn from several REFER data sets by sample rates, as LISA.

`data.mix` maps data set names to sample rates, e.g. `{refcoco: 1, refcoco+: 1, refcocog: 1}`;
each data set trains on its `data.train_split` under its standard split scheme (`data.split_by`
for `data.dataset` itself). Evaluation stays on `data.dataset`'s `data.eval_splits`.

An epoch draws as many sentences as the mixed train splits hold together (each split capped by
`data.limit_train_sentences`). Each draw picks a data set with probability rate / sum of rates,
then that data set's next sentence in a random order that visits every sentence once before any
repeats. The draws are a function of `seed` and the epoch; with several processes each takes every
`num_replicas`-th draw of one shared sequence, padded to a multiple of the processes with further
draws, so every process sees the same number of batches (as `DistributedSampler`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Sampler

from common.errors import ConfigError, DataError
from datamodules.refer import DATASETS, image_dir

EXAMPLE = "data.mix={refcoco: 1, refcoco+: 1, refcocog: 1}"


@dataclass(frozen=True)
class MixEntry:
    """One data set training draws from: its name, split scheme and sample rate."""

    dataset: str
    split_by: str
    rate: float


def training_sets(data: Any) -> list[MixEntry]:
    """The data sets training draws from: `data.dataset` alone without `data.mix`, else every
    `data.mix` entry with a positive rate, in the order given.

    Raises ConfigError for an unknown name, a rate that is not a number ≥ 0, every rate 0, or a
    data set whose images are not `data.dataset`'s; DataError for a missing data set folder.
    """
    mix = data.get("mix")
    if isinstance(mix, DictConfig):
        mix = OmegaConf.to_container(mix, resolve=True)
    if mix is None or mix == {}:
        return [MixEntry(data.dataset, data.split_by, 1.0)]
    if not isinstance(mix, dict):
        raise ConfigError(f"data.mix={mix!r} must map data set names to rates, e.g. `{EXAMPLE}`.")
    entries = [_entry(data, str(name), rate) for name, rate in mix.items()]
    if not any(e.rate > 0 for e in entries):
        raise ConfigError(
            f"data.mix={mix} gives every data set rate 0; give at least one a positive rate, "
            "or set data.mix=null to train on data.dataset alone."
        )
    return [e for e in entries if e.rate > 0]


def _entry(data: Any, name: str, rate: Any) -> MixEntry:
    key = f"data.mix.{name}"
    if name not in DATASETS:
        raise ConfigError(f"{key}: unknown data set; choose from {', '.join(DATASETS)}.")
    number = isinstance(rate, int | float) and not isinstance(rate, bool)
    if not number or not math.isfinite(rate) or rate < 0:
        raise ConfigError(f"{key}={rate!r}: a sample rate is a number ≥ 0 (0 leaves it out).")
    ours, theirs = image_dir(data.root, data.dataset), image_dir(data.root, name)
    if rate > 0 and theirs != ours:
        raise ConfigError(
            f"{key}: its images ({theirs}) are not those of data.dataset={data.dataset} "
            f"({ours}); a mix draws on one images folder (RefCOCO, RefCOCO+ and RefCOCOg share "
            "COCO train2014)."
        )
    folder = Path(data.root) / name
    if rate > 0 and not folder.is_dir():
        raise DataError(
            f"{key}: data set folder {folder} is missing; put the REFER files of {name} there "
            "(refs(<split_by>).p and instances.json), or drop it from data.mix."
        )
    split_by = data.split_by if name == data.dataset else DATASETS[name][0]
    return MixEntry(name, split_by, float(rate))


class MixSampler(Sampler[int]):
    """Indices into the concatenation of the mixed train sets (sizes in order), drawn by the
    rates as the module docstring says; `set_epoch` (Lightning calls it) gives a new draw."""

    def __init__(
        self,
        sizes: Sequence[int],
        rates: Sequence[float],
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if len(sizes) != len(rates) or min(sizes, default=0) < 1:
            raise DataError(f"a data set mix needs a non-empty train set per rate, got {sizes}")
        self.sizes, self.seed = list(sizes), seed
        self.weights = torch.tensor(list(rates), dtype=torch.float64)
        self.num_replicas, self.rank = num_replicas, rank
        self.num_samples = math.ceil(sum(self.sizes) / num_replicas)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        return iter(self.draws()[self.rank :: self.num_replicas].tolist())

    def draws(self) -> torch.Tensor:
        """Every process's draws of this epoch, in order (process r takes r, r + n, ...)."""
        total = self.num_samples * self.num_replicas
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        picks = torch.multinomial(self.weights, total, replacement=True, generator=g)
        out = torch.empty(total, dtype=torch.long)
        offset = 0
        for d, size in enumerate(self.sizes):
            where = torch.nonzero(picks == d).flatten()
            if len(where):
                rounds = math.ceil(len(where) / size)
                order = torch.cat([torch.randperm(size, generator=g) for _ in range(rounds)])
                out[where] = offset + order[: len(where)]
            offset += size
        return out
