"""`tokenpacker` — TokenPacker: down-sampled queries, each attending to its own s×s region.

TokenPacker injects regions of several vision-tower layers (multi-level features) into each
query; the projector contract passes one layer, so the keys/values are that layer's s×s region.
A grid that s does not divide is zero-padded to ⌈h/s⌉·s × ⌈w/s⌉·s and the padding is masked out of
both the query (a masked mean) and the attention.
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.projectors.base import (
    CrossAttention,
    Projector,
    ProjectorOutput,
    batch_regions,
    block_regions,
    fixed_count,
    full_mask,
    register_projector,
    require_heads,
    require_positive,
    two_layer_mlp,
)


def to_regions(x: Tensor, s: int) -> Tensor:
    """B×C×(nh·s)×(nw·s) → (B·nh·nw)×s²×C, regions in raster order."""
    b, c, hp, wp = x.shape
    x = x.view(b, c, hp // s, s, wp // s, s).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(-1, s * s, c)


@register_projector("tokenpacker")
class TokenPackerProjector(Projector):
    """Region-local cross-attention: n = ⌈h/s⌉·⌈w/s⌉ tokens, attention width `out_dim`."""

    @dataclass
    class Config:
        name: str = "tokenpacker"
        s: int = 2
        num_heads: int = 4

    def __init__(self, cfg: Any, in_dim: int, out_dim: int) -> None:
        super().__init__(cfg, in_dim, out_dim)
        require_positive(self.cfg, "s", "num_heads")
        require_heads(self.cfg.num_heads, out_dim)
        self.query_proj = nn.Linear(in_dim, out_dim)
        self.norm_q = nn.LayerNorm(out_dim)
        self.norm_kv = nn.LayerNorm(in_dim)
        self.attn = CrossAttention(out_dim, in_dim, self.cfg.num_heads)
        self.mlp = two_layer_mlp(out_dim, out_dim, out_dim)

    def grid(self, features: Tensor) -> tuple[int, int]:
        """Query grid ⌈h/s⌉ × ⌈w/s⌉."""
        s = self.cfg.s
        return -(-features.shape[2] // s), -(-features.shape[3] // s)

    def forward(self, features: Tensor, labels: Tensor | None = None) -> ProjectorOutput:
        self.check_features(features)
        b, _, h, w = features.shape
        s = self.cfg.s
        nh, nw = self.grid(features)
        pad = (0, nw * s - w, 0, nh * s - h)
        regions = to_regions(F.pad(features, pad), s)
        valid = to_regions(F.pad(features.new_ones(1, 1, h, w), pad), s)
        valid = valid.unsqueeze(0).expand(b, -1, -1, -1).reshape(-1, s * s, 1)
        query = (regions * valid).sum(1) / valid.sum(1)
        query = self.query_proj(query).unsqueeze(1)
        mask = valid.squeeze(-1).bool().unsqueeze(1) if any(pad) else None
        x = query + self.attn(self.norm_q(query), self.norm_kv(regions), mask=mask)
        tokens = self.mlp(x.view(b, nh * nw, self.out_dim))
        dev = features.device
        rows = torch.arange(h, device=dev)[None] // s == torch.arange(nh, device=dev)[:, None]
        cols = torch.arange(w, device=dev)[None] // s == torch.arange(nw, device=dev)[:, None]
        regions = batch_regions(block_regions(rows, cols), features)
        return ProjectorOutput(tokens, full_mask(tokens), regions)

    def num_tokens(self, features: Tensor, labels: Tensor | None = None) -> Tensor:
        nh, nw = self.grid(features)
        return fixed_count(features, nh * nw)

    @property
    def token_budget(self) -> str:
        return f"s={self.cfg.s}"
