"""`pool` — DeCo: adaptive average pooling to k×k patches, then LLaVA's MLP (n = k²)."""

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from lightning_modules.projectors.base import (
    Projector,
    ProjectorOutput,
    fixed_count,
    grid_output,
    register_projector,
    require_positive,
    two_layer_mlp,
)


@register_projector("pool")
class PoolProjector(Projector):
    """Parameter-free 2-D compression decoupled from the learned semantic projection."""

    @dataclass
    class Config:
        name: str = "pool"
        k: int = 4

    def __init__(self, cfg: Any, in_dim: int, out_dim: int) -> None:
        super().__init__(cfg, in_dim, out_dim)
        require_positive(self.cfg, "k")
        self.mlp = two_layer_mlp(in_dim, out_dim, out_dim)

    def forward(self, features: Tensor, labels: Tensor | None = None) -> ProjectorOutput:
        self.check_features(features)
        pooled = F.adaptive_avg_pool2d(features, self.cfg.k)
        tokens = self.mlp(pooled.flatten(2).transpose(1, 2))
        return grid_output(tokens, features, self.cfg.k, self.cfg.k)

    def num_tokens(self, features: Tensor, labels: Tensor | None = None) -> Tensor:
        return fixed_count(features, self.cfg.k**2)

    @property
    def token_budget(self) -> str:
        return f"k={self.cfg.k}"
