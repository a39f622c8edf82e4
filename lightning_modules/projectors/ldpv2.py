"""`ldpv2` — MobileVLM v2's LDPv2: MLP → avg-pool k×k → PEG (depth-wise 3×3 conv, residual)."""

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


@register_projector("ldpv2")
class LDPv2Projector(Projector):
    """Lightweight downsample projector; the PEG restores positional cues lost by pooling."""

    @dataclass
    class Config:
        name: str = "ldpv2"
        k: int = 4

    def __init__(self, cfg: Any, in_dim: int, out_dim: int) -> None:
        super().__init__(cfg, in_dim, out_dim)
        require_positive(self.cfg, "k")
        self.mlp = two_layer_mlp(in_dim, out_dim, out_dim)
        self.peg = nn.Conv2d(out_dim, out_dim, 3, padding=1, groups=out_dim)

    def forward(self, features: Tensor, labels: Tensor | None = None) -> ProjectorOutput:
        self.check_features(features)
        x = self.mlp(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = F.adaptive_avg_pool2d(x, self.cfg.k)
        x = x + self.peg(x)
        tokens = x.flatten(2).transpose(1, 2)
        return grid_output(tokens, features, self.cfg.k, self.cfg.k)

    def num_tokens(self, features: Tensor, labels: Tensor | None = None) -> Tensor:
        return fixed_count(features, self.cfg.k**2)

    @property
    def token_budget(self) -> str:
        return f"k={self.cfg.k}"
