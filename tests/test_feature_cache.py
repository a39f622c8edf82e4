"""The frozen-feature cache holds the same bytes whichever run, batch or order computed them."""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules import feature_cache
from lightning_modules.feature_cache import FrozenEncoder


class BatchSensitive(nn.Module):
    """An encoder whose numbers depend on the batch, as batched matmuls' rounding can."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1.001 + x.mean(0, keepdim=True) * 1e-3


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.rglob("*.npy"))}


def test_cached_features_do_not_depend_on_batch_mates(tmp_path):
    images = [torch.full((4, 4, 3), 10 * i, dtype=torch.uint8) for i in range(4)]
    ids = torch.arange(4)

    def preprocess(batch):
        return torch.stack([im.permute(2, 0, 1).float() for im in batch])

    def run(folder, order):
        feature_cache.MEMORY.clear()
        encoder = FrozenEncoder(BatchSensitive(), "enc", preprocess, disk_dir=folder)
        for group in order:
            encoder([images[i] for i in group], ids[list(group)])
        return _files(folder / "enc")

    together = run(tmp_path / "a", [(0, 1, 2, 3)])
    apart = run(tmp_path / "b", [(3,), (1, 0), (2,)])
    assert len(together) == 4 and together == apart
