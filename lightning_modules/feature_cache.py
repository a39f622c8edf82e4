"""Frozen encoders run once per image: features kept in memory and on disk, keyed per image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.files import atomic_write

# Frozen-feature memory shared by every model in the process (sweeps run many trials in one
# process): (encoder key, image id) -> features on CPU.
_FEATURE_MEMORY: dict[tuple[str, str], torch.Tensor] = {}


class FrozenEncoder(nn.Module):
    """Runs a frozen image encoder once per image id and remembers the result.

    Two levels: a process-wide memory (sweeps run many trials in one process) and, when `disk_dir`
    is set, float16 `.npy` files under `disk_dir/key`, shared by every process and machine that
    sees the folder. With the disk cache on, fresh features are rounded to float16 too, so a run
    gives the same numbers whether its features were cached or not. `key` must name the encoder
    and the images behind the ids.
    """

    def __init__(
        self, encoder: nn.Module, key: str, preprocess, memory: bool = True, disk_dir=None
    ):
        super().__init__()
        self.encoder = encoder
        self.key = key
        self.preprocess = preprocess
        self.memory = memory
        self.disk_dir = Path(disk_dir) / key if disk_dir else None

    def _load(self, name: str) -> torch.Tensor | None:
        if (self.key, name) in _FEATURE_MEMORY:
            return _FEATURE_MEMORY[(self.key, name)]
        if self.disk_dir is not None:
            path = self.disk_dir / f"{name}.npy"
            if path.is_file():
                feat = torch.from_numpy(np.load(path).astype(np.float32))
                if self.memory:
                    _FEATURE_MEMORY[(self.key, name)] = feat
                return feat
        return None

    def _store(self, name: str, feat: torch.Tensor) -> torch.Tensor:
        if self.disk_dir is not None:
            feat = feat.half().float()
            array = feat.detach().cpu().numpy().astype(np.float16)
            atomic_write(self.disk_dir / f"{name}.npy", lambda fh: np.save(fh, array))
        if self.memory:
            _FEATURE_MEMORY[(self.key, name)] = feat.detach().to("cpu")
        return feat

    @torch.no_grad()
    def forward(self, images: list[torch.Tensor], image_ids: torch.Tensor) -> torch.Tensor:
        names = [str(int(i)) for i in image_ids]
        device = self._device()
        found = {j: self._load(n) for j, n in enumerate(names)}
        missing = [j for j, f in found.items() if f is None]
        if missing:
            out = self.encoder(self.preprocess([images[j] for j in missing]))
            for j, feat in zip(missing, out):
                found[j] = self._store(names[j], feat)
        return torch.stack([found[j].to(device) for j in range(len(names))])

    def _device(self) -> torch.device:
        for p in self.encoder.parameters():
            return p.device
        for b in self.encoder.buffers():
            return b.device
        return torch.device("cpu")
