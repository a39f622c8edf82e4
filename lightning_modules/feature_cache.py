"""Frozen encoders run once per image: features kept in memory and on disk, keyed per image."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.files import atomic_write


class FeatureMemory:
    """Features on CPU by (encoder key, image id), least recently used first out once they hold
    more than `limit_bytes`. One per process, shared by every model in it (a sweep runs many
    trials in one process)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()

    def get(self, key: tuple[str, str]) -> torch.Tensor | None:
        feat = self._items.get(key)
        if feat is not None:
            self._items.move_to_end(key)
        return feat

    def put(self, key: tuple[str, str], feat: torch.Tensor) -> None:
        size = feat.numel() * feat.element_size()
        if size > self.limit_bytes:
            return
        old = self._items.pop(key, None)
        self.bytes += size - (0 if old is None else old.numel() * old.element_size())
        self._items[key] = feat
        while self.bytes > self.limit_bytes:
            _, dropped = self._items.popitem(last=False)
            self.bytes -= dropped.numel() * dropped.element_size()

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)


MEMORY = FeatureMemory(limit_bytes=2 * 1024**3)


class FrozenEncoder(nn.Module):
    """Runs a frozen image encoder once per image id and remembers the result.

    Two levels: the process-wide `MEMORY` (bounded in bytes, `cache.memory_mb`) and, when
    `disk_dir` is set, float16 `.npy` files under `disk_dir/key`, shared by every process and
    machine that sees the folder. With the disk cache on, fresh features are rounded to float16
    too, so a run gives the same numbers whether its features were cached or not. Each image is
    encoded alone, so its features are the same whichever run, batch or process computed them.
    `key` must name the encoder and the images behind the ids.
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
        feat = MEMORY.get((self.key, name)) if self.memory else None
        if feat is not None:
            return feat
        if self.disk_dir is not None:
            path = self.disk_dir / f"{name}.npy"
            try:
                feat = torch.from_numpy(np.load(path).astype(np.float32))
            except (OSError, EOFError, ValueError):  # not cached yet, or damaged: recompute
                return None
            if self.memory:
                MEMORY.put((self.key, name), feat)
            return feat
        return None

    def _store(self, name: str, feat: torch.Tensor) -> torch.Tensor:
        if self.disk_dir is not None:
            feat = feat.half().float()
            array = feat.detach().cpu().numpy().astype(np.float16)
            atomic_write(self.disk_dir / f"{name}.npy", lambda fh: np.save(fh, array))
        if self.memory:
            MEMORY.put((self.key, name), feat.detach().to("cpu"))
        return feat

    @torch.no_grad()
    def forward(self, images: list[torch.Tensor], image_ids: torch.Tensor) -> torch.Tensor:
        names = [str(int(i)) for i in image_ids]
        device = self._device()
        found = {j: self._load(n) for j, n in enumerate(names)}
        missing = [j for j, f in found.items() if f is None]
        for j in missing:  # one image at a time: its features never depend on its batch-mates
            found[j] = self._store(names[j], self.encoder(self.preprocess([images[j]]))[0])
        return torch.stack([found[j].to(device) for j in range(len(names))])

    def _device(self) -> torch.device:
        for p in self.encoder.parameters():
            return p.device
        for b in self.encoder.buffers():
            return b.device
        return torch.device("cpu")
