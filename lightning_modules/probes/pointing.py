"""`svp diagnose pointing`: can the target superpixel be found from these features at all?

A bag-of-words pointer with no LLM: the mean of the sentence's word embeddings is the query; an
MLP of each superpixel's mask-pooled tower features (standardised) — optionally with its Fourier
geometry — is the key; a soft cross-entropy pulls softmax(⟨query, key⟩) towards the grounding
head's target weights (`lightning_modules/grounding.py`). Its val top-1 pointing accuracy is a
quick yardstick for a vision-tower layer or a superpixel source before a full RIS run: it needs
only the frozen features and the superpixel cache, and trains in about a minute on a CPU.
A bag of words cannot resolve relations or ordinals ("the second shape from the left"), so it is a
floor for what the grounding pointer can reach from the same features, not a ceiling. The
`transformer` pointer reads words and superpixels jointly (a small bidirectional encoder, no
causal mask), so it can; it is the stronger yardstick of the two. On SynthRef the accuracy is also
reported per expression kind (attribute, position, superlative, ordinal, relation), and
`train_fraction` trains on the first part of the training images only, to measure how pointing
scales with data.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from tqdm.auto import tqdm

from common.errors import ConfigError
from lightning_modules.grounding import grounding_loss
from lightning_modules.projectors.semantic import GEOMETRY_DIM

FREQUENCIES = 6  # Fourier frequencies of the geometry
POINTERS = ("bow", "transformer")
LEARNING_RATES = {"bow": 3e-3, "transformer": 1e-3}
MAX_WORDS = 64  # the transformer pointer reads at most this many tokens of a prompt


def fourier_geometry(geometry: Tensor, frequencies: int, mask: Tensor) -> Tensor:
    """Append sin/cos of the first 7 geometry columns at 2^0..2^(F−1)·π; zero on padded slots.

    A ReLU MLP on raw coordinates in [0, 1] resolves position coarsely; the expansion lets it
    encode where a superpixel is as finely as SAM's own Fourier prompt encoding does.
    """
    if frequencies == 0:
        return geometry
    base = geometry[..., :GEOMETRY_DIM]
    scales = math.pi * 2.0 ** torch.arange(frequencies, device=geometry.device)
    angles = (base[..., None] * scales.to(geometry.dtype)).flatten(-2)
    waves = torch.cat([angles.sin(), angles.cos()], -1) * mask[..., None].to(geometry.dtype)
    return torch.cat([geometry, waves], -1)


@torch.no_grad()
def _superpixel_rows(model, loader, progress: bool, desc: str) -> list[tuple]:
    """Per sentence: (word ids, pooled features k×C, geometry k×G, target weights k, has target,
    expression kind, image id)."""
    from datamodules.synthetic import expression_kind
    from lightning_modules.grounding import grid_targets, target_distribution
    from lightning_modules.projectors.semantic import (
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
            kind = expression_kind(batch["sentences"][b])
            image = int(batch["image_ids"][b])
            rows.append(
                (ids, pooled[b, :n], geometry[b, :n], target[b, :n], bool(valid[b]), kind, image)
            )
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
        "kind": [r[5] for r in rows],
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


def _first_images(rows: list[tuple], fraction: float) -> list[tuple]:
    """The rows of the first `fraction` of the images (by image id)."""
    images = sorted({r[6] for r in rows})
    keep = set(images[: max(1, round(len(images) * fraction))])
    return [r for r in rows if r[6] in keep]


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


class TransformerPointer(nn.Module):
    """Words, superpixel keys and a query slot through a small bidirectional encoder; the query
    slot's output scores the superpixels' outputs."""

    def __init__(
        self, vocab: int, feat_dim: int, geo_dim: int, dim: int = 128, layers: int = 2
    ) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab, dim)
        self.word_pos = nn.Embedding(MAX_WORDS, dim)
        self.key = nn.Sequential(nn.Linear(feat_dim + geo_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.slot = nn.Parameter(torch.randn(3, dim) * 0.02)  # type: word, superpixel, query
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, 0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.q, self.k = nn.Linear(dim, 64), nn.Linear(dim, 64)

    def forward(self, ids: list[torch.Tensor], keys: torch.Tensor, mask: torch.Tensor):
        b, n = mask.shape
        length = min(MAX_WORDS, max(len(i) for i in ids))
        words = torch.zeros(b, length, dtype=torch.long)
        has_word = torch.zeros(b, length, dtype=torch.bool)
        for i, row in enumerate(ids):
            row = row[:length]
            words[i, : len(row)], has_word[i, : len(row)] = row, True
        x = torch.cat(
            [
                self.words(words) + self.word_pos.weight[:length] + self.slot[0],
                self.key(keys) + self.slot[1],
                self.slot[2].expand(b, 1, -1),
            ],
            1,
        )
        keep = torch.cat([has_word, mask, torch.ones(b, 1, dtype=torch.bool)], 1)
        h = self.norm(self.encoder(x, src_key_padding_mask=~keep))
        scores = (self.k(h[:, length : length + n]) @ self.q(h[:, -1])[..., None]).squeeze(-1)
        return (scores / 8.0).masked_fill(~mask, -torch.inf)


def _by_kind(scores: torch.Tensor, data: dict) -> dict[str, float]:
    """Val top-1 accuracy per expression kind (sentences outside the SynthRef grammar: "other")."""
    out = {}
    for kind in sorted(set(data["kind"])):
        idx = torch.tensor([k == kind for k in data["kind"]])
        _, acc = grounding_loss(scores[idx], data["target"][idx], data["valid"][idx])
        out[kind] = float(acc)
    return out


def pointing_probe(
    cfg: DictConfig,
    steps: int = 1500,
    batch_size: int = 64,
    lr: float | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    pointer: str = "bow",
    train_fraction: float = 1.0,
) -> dict:
    """Train a pointer (`bow` or `transformer`) with and without the superpixels' geometry; val
    top-1 accuracy of each, overall and per expression kind."""
    from common.files import write_json
    from datamodules.ris import RISDataModule
    from lightning_modules.cli.inputs import check_run_inputs
    from lightning_modules.llm import tokenizer_for
    from lightning_modules.ris_model import RISModel

    if steps < 1 or batch_size < 1:
        raise ConfigError(f"--steps ({steps}) and --batch-size ({batch_size}) must be ≥ 1")
    if pointer not in POINTERS:
        raise ConfigError(f"--pointer must be one of {', '.join(POINTERS)}, got {pointer!r}")
    if not 0.0 < train_fraction <= 1.0:
        raise ConfigError(f"--train-fraction must be in (0, 1], got {train_fraction}")
    if cfg.superpixels is None:
        raise ConfigError("the pointing probe needs superpixels; set `superpixels=<source>`")
    check_run_inputs(cfg)
    torch.manual_seed(cfg.seed)
    run = Path(out) if out else Path(cfg.runs_root) / "diagnose" / "pointing"
    run.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer_for(cfg, run / "tokenizer")
    dm = RISDataModule(cfg, tokenizer)
    dm.prepare_data()
    dm.setup("fit")
    model = RISModel(cfg, tokenizer).eval()
    start = time.time()
    train_rows = _superpixel_rows(model, dm.train_dataloader(), progress, "train features")
    train = _pad(_first_images(train_rows, train_fraction))
    val = _pad(_superpixel_rows(model, dm.val_dataloader()[0], progress, "val features"))
    real = train["feat"][train["mask"]]
    mean, std = real.mean(0), real.std(0) + 1e-6
    vision = OmegaConf.to_container(cfg.vision, resolve=True)
    result = {
        "vision": vision,
        "pointer": pointer,
        "steps": steps,
        "train_fraction": train_fraction,
        "train_sentences": len(train["ids"]),
        "val_sentences": len(val["ids"]),
    }
    net = BagOfWordsPointer if pointer == "bow" else TransformerPointer
    for use_geometry in (False, True):
        torch.manual_seed(cfg.seed)
        geo_dim = train["geo"].shape[-1] if use_geometry else 0
        probe = net(len(tokenizer), train["feat"].shape[-1], geo_dim)
        opt = torch.optim.Adam(probe.parameters(), lr=lr or LEARNING_RATES[pointer])
        n = len(train["ids"])
        name = "with_geometry" if use_geometry else "features_only"
        for _ in tqdm(range(steps), desc=f"{pointer} {name}", disable=not progress, leave=False):
            idx = torch.randint(0, n, (batch_size,))
            k = _keys(train, mean, std, use_geometry, idx)
            scores = probe([train["ids"][i] for i in idx], k, train["mask"][idx])
            loss, _ = grounding_loss(scores, train["target"][idx], train["valid"][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        probe.eval()
        with torch.no_grad():
            scores = probe(val["ids"], _keys(val, mean, std, use_geometry), val["mask"])
            _, acc = grounding_loss(scores, val["target"], val["valid"])
        result[f"val_top1_{name}"] = float(acc)
        result[f"val_top1_{name}_by_kind"] = kinds = _by_kind(scores, val)
        per_kind = ", ".join(f"{k} {v:.3f}" for k, v in kinds.items())
        label = name.replace("_", " ")
        print(f"{pointer} pointer, {label}: val top-1 {float(acc):.3f} ({per_kind})")
    result["minutes"] = (time.time() - start) / 60
    write_json(run / "pointing.json", result)
    print(f"written to {run / 'pointing.json'}")
    return result
