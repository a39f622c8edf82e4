"""`svp diagnose pointing`: can the target superpixel be found from these features at all?

A bag-of-words pointer with no LLM: the mean of the sentence's word embeddings is the query; an
MLP of each superpixel's mask-pooled tower features (standardised) — optionally with its Fourier
geometry — is the key; a soft cross-entropy pulls softmax(⟨query, key⟩) towards the grounding
head's target weights (`lightning_modules/grounding.py`). Its val top-1 pointing accuracy is a
quick yardstick for a vision-tower layer or a superpixel source before a full RIS run: it needs
only the frozen features and the superpixel cache, and trains in about a minute on a CPU.
A bag of words cannot resolve relations or ordinals ("the second shape from the left"), so it is a
floor for what the grounding head can reach from the same features, not a ceiling.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from datamodules.errors import ConfigError

FREQUENCIES = 6  # Fourier frequencies of the geometry (as `projector.sspe_frequencies=6`)


@torch.no_grad()
def _superpixel_rows(model, loader, progress: bool, desc: str) -> list[tuple]:
    """Per sentence: (word ids, pooled features k×C, geometry k×G, target weights k, has target)."""
    from lightning_modules.grounding import grid_targets, target_distribution
    from lightning_modules.projectors.semantic import (
        fourier_geometry,
        order_superpixels,
        superpixel_coverage,
        superpixel_geometry,
    )

    rows = []
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        feats = model.tower_features(batch["images"], batch["image_ids"])
        h, w = feats.shape[-2:]
        labels, counts = order_superpixels(batch["labels"], 64, "centroid", h)
        k = int(counts.max())
        cov = superpixel_coverage(labels, k, h, w)
        pooled = (cov @ feats.flatten(2).transpose(1, 2)) / cov.sum(-1, keepdim=True).clamp(1e-9)
        mask = torch.arange(k)[None] < counts[:, None]
        geometry = fourier_geometry(superpixel_geometry(labels, k, 4), FREQUENCIES, mask)
        target, valid = target_distribution(cov, grid_targets(batch["masks"], h, w, "cpu"))
        for b in range(len(batch["images"])):
            n = int(counts[b])
            ids = batch["input_ids"][b, : int(batch["text_lengths"][b])]
            rows.append((ids, pooled[b, :n], geometry[b, :n], target[b, :n], bool(valid[b])))
    return rows


def _pad(rows: list[tuple]) -> dict[str, torch.Tensor]:
    b, n = len(rows), max(r[1].shape[0] for r in rows)
    out = {
        "ids": [r[0] for r in rows],
        "feat": torch.zeros(b, n, rows[0][1].shape[-1]),
        "geo": torch.zeros(b, n, rows[0][2].shape[-1]),
        "target": torch.zeros(b, n),
        "mask": torch.zeros(b, n, dtype=torch.bool),
        "valid": torch.tensor([r[4] for r in rows]),
    }
    for i, r in enumerate(rows):
        k = r[1].shape[0]
        out["feat"][i, :k], out["geo"][i, :k], out["target"][i, :k] = r[1], r[2], r[3]
        out["mask"][i, :k] = True
    return out


def _keys(data: dict, mean, std, use_geometry: bool, idx=None) -> torch.Tensor:
    """Standardised pooled features, with the Fourier geometry appended if asked; rows `idx`."""
    pick = (lambda t: t) if idx is None else (lambda t: t[idx])
    feat = (pick(data["feat"]) - mean) / std
    return torch.cat([feat, pick(data["geo"])], -1) if use_geometry else feat


class BagOfWordsPointer(nn.Module):
    """Query: mean word embedding of the sentence; key: MLP of each superpixel's inputs."""

    def __init__(self, vocab: int, feat_dim: int, geo_dim: int, dim: int = 64):
        super().__init__()
        self.words = nn.EmbeddingBag(vocab, dim, mode="mean")
        self.key = nn.Sequential(nn.Linear(feat_dim + geo_dim, 128), nn.GELU(), nn.Linear(128, dim))
        self.dim = dim

    def forward(self, ids: list[torch.Tensor], keys: torch.Tensor, mask: torch.Tensor):
        offsets = torch.tensor([0, *[len(i) for i in ids[:-1]]]).cumsum(0)
        query = self.words(torch.cat(ids), offsets)
        scores = (self.key(keys) @ query[..., None]).squeeze(-1) / self.dim**0.5
        return scores.masked_fill(~mask, -torch.inf)


def pointing_probe(
    cfg: DictConfig,
    steps: int = 1500,
    batch_size: int = 64,
    lr: float = 3e-3,
    out: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Train the bag-of-words pointer with and without geometry; val top-1 accuracy of each."""
    from datamodules.ris import RISDataModule
    from lightning_modules.grounding import grounding_loss
    from lightning_modules.ris_model import RISModel
    from lightning_modules.tokenizer_setup import tokenizer_for
    from lightning_modules.train import _check_inputs, _write_json

    if steps < 1 or batch_size < 1:
        raise ConfigError(f"--steps ({steps}) and --batch-size ({batch_size}) must be ≥ 1")
    if cfg.superpixels is None:
        raise ConfigError("the pointing probe needs superpixels; set `superpixels=<source>`")
    _check_inputs(cfg)
    torch.manual_seed(cfg.seed)
    run = Path(out) if out else Path(cfg.runs_root) / "diagnose" / "pointing"
    run.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer_for(cfg, run / "tokenizer")
    dm = RISDataModule(cfg, tokenizer)
    dm.prepare_data()
    dm.setup("fit")
    model = RISModel(cfg, tokenizer).eval()
    start = time.time()
    train = _pad(_superpixel_rows(model, dm.train_dataloader(), progress, "train features"))
    val = _pad(_superpixel_rows(model, dm.val_dataloader()[0], progress, "val features"))
    real = train["feat"][train["mask"]]
    mean, std = real.mean(0), real.std(0) + 1e-6
    vision = OmegaConf.to_container(cfg.vision, resolve=True)
    result = {"vision": vision, "steps": steps, "val_sentences": len(val["ids"])}
    for use_geometry in (False, True):
        torch.manual_seed(cfg.seed)
        geo_dim = train["geo"].shape[-1] if use_geometry else 0
        pointer = BagOfWordsPointer(len(tokenizer), train["feat"].shape[-1], geo_dim)
        opt = torch.optim.Adam(pointer.parameters(), lr=lr)
        n = len(train["ids"])
        name = "with_geometry" if use_geometry else "features_only"
        for _ in tqdm(range(steps), desc=f"pointer {name}", disable=not progress, leave=False):
            idx = torch.randint(0, n, (batch_size,))
            k = _keys(train, mean, std, use_geometry, idx)
            scores = pointer([train["ids"][i] for i in idx], k, train["mask"][idx])
            loss, _ = grounding_loss(scores, train["target"][idx], train["valid"][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            scores = pointer(val["ids"], _keys(val, mean, std, use_geometry), val["mask"])
            _, acc = grounding_loss(scores, val["target"], val["valid"])
        result[f"val_top1_{name}"] = float(acc)
        print(f"bag-of-words pointer, {name.replace('_', ' ')}: val top-1 {float(acc):.3f}")
    result["minutes"] = (time.time() - start) / 60
    _write_json(run / "pointing.json", result)
    print(f"written to {run / 'pointing.json'}")
    return result
