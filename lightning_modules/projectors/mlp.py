"""`mlp` — LLaVA-1.5 / LISA: a 2-layer GELU MLP applied to every patch (n = h·w)."""

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lightning_modules.projectors.base import (
    Projector,
    ProjectorOutput,
    fixed_count,
    grid_output,
    register_projector,
    two_layer_mlp,
)


@register_projector("mlp")
class MLPProjector(Projector):
    """Patch-wise projector: one token per patch, no compression."""

    @dataclass
    class Config:
        name: str = "mlp"

    def __init__(self, cfg: Any, in_dim: int, out_dim: int) -> None:
        super().__init__(cfg, in_dim, out_dim)
        self.mlp = two_layer_mlp(in_dim, out_dim, out_dim)

    def forward(self, features: Tensor, labels: Tensor | None = None) -> ProjectorOutput:
        self.check_features(features)
        tokens = self.mlp(features.flatten(2).transpose(1, 2))
        return grid_output(tokens, features, *features.shape[2:])

    def num_tokens(self, features: Tensor, labels: Tensor | None = None) -> Tensor:
        return fixed_count(features, features.shape[2] * features.shape[3])

    @property
    def token_budget(self) -> str:
        return "h*w"
