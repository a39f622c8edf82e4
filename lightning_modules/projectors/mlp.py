"""`mlp` — LLaVA-1.5 / LISA: a 2-layer GELU MLP applied to every patch (n = h·w)."""

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from common import llava
from common.errors import ConfigError
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
        # with a LLaVA checkpoint as llm.path: start from its trained projector
        from_llava: bool = True

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

    def start_from_llava(self, path: str) -> bool:
        if not self.cfg.from_llava:
            return False
        state = llava.projector_state(path)
        want = {k: tuple(v.shape) for k, v in self.mlp.state_dict().items()}
        if want != {k: tuple(v.shape) for k, v in state.items()}:
            raise ConfigError(
                f"the projector in {path} maps {state['0.weight'].shape[1]} → "
                f"{state['2.weight'].shape[0]} channels, this mlp {self.in_dim} → {self.out_dim} "
                "(vision tower → LLM); use LLaVA's own tower (vision.path) or set "
                "projector.from_llava=false"
            )
        self.mlp.load_state_dict(state)
        return True
