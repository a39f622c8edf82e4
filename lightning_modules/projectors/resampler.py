"""`resampler` — Q-Former / Perceiver / Qwen-VL: q learnable queries cross-attend to the patches."""

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_modules.projectors.base import (
    CrossAttention,
    Projector,
    ProjectorOutput,
    fixed_count,
    full_mask,
    register_projector,
    require_heads,
    require_positive,
    sincos_2d,
)


class ResamplerLayer(nn.Module):
    """Pre-norm cross-attention from the queries to the patches, then a feed-forward block."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, dim, num_heads)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, queries: Tensor, kv: Tensor, key_pos: Tensor) -> Tensor:
        queries = queries + self.attn(self.norm_q(queries), kv, key_pos)
        return queries + self.ffn(self.norm_ffn(queries))


@register_projector("resampler")
class ResamplerProjector(Projector):
    """Learnable queries read the patch features (keys carry 2-D sin-cos positions, as Qwen-VL).

    The attention width is `out_dim`; the patches are first projected to it. A token's footprint
    is where its query looks: the last layer's attention weights (mean over heads), each cell's
    weights shared out over the queries, so the grounding pointer serves it as every other
    projector.
    """

    @dataclass
    class Config:
        name: str = "resampler"
        num_queries: int = 16
        num_layers: int = 1
        num_heads: int = 4

    def __init__(self, cfg: Any, in_dim: int, out_dim: int) -> None:
        super().__init__(cfg, in_dim, out_dim)
        require_positive(self.cfg, "num_queries", "num_layers", "num_heads")
        require_heads(self.cfg.num_heads, out_dim)
        self.queries = nn.Parameter(torch.randn(self.cfg.num_queries, out_dim) * 0.02)
        self.kv_proj = nn.Linear(in_dim, out_dim)
        self.norm_kv = nn.LayerNorm(out_dim)
        self.layers = nn.ModuleList(
            ResamplerLayer(out_dim, self.cfg.num_heads) for _ in range(self.cfg.num_layers)
        )
        self.norm_out = nn.LayerNorm(out_dim)
        self.out_proj = nn.Linear(out_dim, out_dim)

    def forward(self, features: Tensor, labels: Tensor | None = None) -> ProjectorOutput:
        self.check_features(features)
        b, _, h, w = features.shape
        kv = self.norm_kv(self.kv_proj(features.flatten(2).transpose(1, 2)))
        key_pos = sincos_2d(h, w, self.out_dim, features.device, kv.dtype)
        queries = self.queries.unsqueeze(0).expand(b, -1, -1)
        for layer in self.layers:
            looking = queries
            queries = layer(queries, kv, key_pos)
        tokens = self.out_proj(self.norm_out(queries))
        last = self.layers[-1]
        with torch.no_grad():  # footprints are read, not trained through
            attn = last.attn.weights(last.norm_q(looking), kv, key_pos).float()
        regions = attn / attn.sum(1, keepdim=True).clamp(min=1e-12)
        return ProjectorOutput(tokens, full_mask(tokens), regions)

    def num_tokens(self, features: Tensor, labels: Tensor | None = None) -> Tensor:
        return fixed_count(features, self.cfg.num_queries)

    @property
    def token_budget(self) -> str:
        return f"q={self.cfg.num_queries}"
