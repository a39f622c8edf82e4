"""`c_abstractor` — Honeybee: conv blocks → adaptive avg-pool k×k → conv blocks → MLP (n = k²).

Honeybee uses RegNet stages with squeeze-excitation and a learned position embedding sized to a
fixed patch grid; here the blocks are plain ResNet bottlenecks (ratio 1, LayerNorm, SiLU) and the
3×3 convolutions' zero padding supplies location, so any feature grid works.
"""

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.projectors.base import (
    Projector,
    ProjectorOutput,
    fixed_count,
    grid_output,
    register_projector,
    require_positive,
    two_layer_mlp,
)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a B×C×h×w map."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ResBlock(nn.Module):
    """Bottleneck residual block: 1×1 → 3×3 → 1×1 convs with a projected shortcut when needed."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_dim, out_dim, 1, bias=False),
            LayerNorm2d(out_dim),
            nn.SiLU(),
            nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False),
            LayerNorm2d(out_dim),
            nn.SiLU(),
            nn.Conv2d(out_dim, out_dim, 1, bias=False),
            LayerNorm2d(out_dim),
        )
        self.shortcut = (
            nn.Identity()
            if in_dim == out_dim
            else nn.Sequential(nn.Conv2d(in_dim, out_dim, 1, bias=False), LayerNorm2d(out_dim))
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(self.body(x) + self.shortcut(x))


def res_stage(depth: int, in_dim: int, out_dim: int) -> nn.Sequential:
    """`depth` residual blocks, the first mapping in_dim → out_dim."""
    return nn.Sequential(*(ResBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(depth)))


@register_projector("c_abstractor")
class CAbstractorProjector(Projector):
    """Locality-preserving convolutional abstractor; conv width `hidden_dim` (None = out_dim)."""

    @dataclass
    class Config:
        name: str = "c_abstractor"
        k: int = 4
        depth: int = 3
        hidden_dim: int | None = None

    def __init__(self, cfg: Any, in_dim: int, out_dim: int) -> None:
        super().__init__(cfg, in_dim, out_dim)
        require_positive(self.cfg, "k", "depth")
        if self.cfg.hidden_dim is not None:
            require_positive(self.cfg, "hidden_dim")
        hidden = self.cfg.hidden_dim or out_dim
        self.stage1 = res_stage(self.cfg.depth, in_dim, hidden)
        self.stage2 = res_stage(self.cfg.depth, hidden, hidden)
        self.readout = two_layer_mlp(hidden, out_dim, out_dim, act=nn.SiLU)

    def forward(self, features: Tensor, labels: Tensor | None = None) -> ProjectorOutput:
        self.check_features(features)
        x = self.stage1(features)
        x = self.stage2(F.adaptive_avg_pool2d(x, self.cfg.k))
        tokens = self.readout(x.flatten(2).transpose(1, 2))
        return grid_output(tokens, features, self.cfg.k, self.cfg.k)

    def num_tokens(self, features: Tensor, labels: Tensor | None = None) -> Tensor:
        return fixed_count(features, self.cfg.k**2)

    @property
    def token_budget(self) -> str:
        return f"k={self.cfg.k}"
