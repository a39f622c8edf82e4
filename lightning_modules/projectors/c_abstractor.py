"""`c_abstractor` — Honeybee: RegNet blocks → adaptive avg-pool k×k → RegNet blocks → MLP (n = k²).

As Honeybee's C-Abstractor (timm's `RegStage` with SiLU and LayerNorm2d): each block is RegNet's
bottleneck (1×1 conv, depthwise 3×3 conv, squeeze-excitation at a quarter of its input width,
1×1 conv; ratio 1), its width Honeybee's `hidden_size` (1024, CLIP-L's width; here the vision
tower's width unless `hidden_dim` is set), then Linear → SiLU → Linear to the LLM's width.
Honeybee's learned position embedding is sized to a fixed patch grid; here the 3×3 convolutions'
zero padding supplies location, so any feature grid works.
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


def conv_norm(in_dim: int, out_dim: int, kernel: int = 1, groups: int = 1) -> list[nn.Module]:
    """A bias-free convolution (zero padding keeps the grid) and LayerNorm2d."""
    conv = nn.Conv2d(in_dim, out_dim, kernel, padding=kernel // 2, groups=groups, bias=False)
    return [conv, LayerNorm2d(out_dim)]


class SqueezeExcite(nn.Module):
    """Channel gates from the map's mean: 1×1 conv → SiLU → 1×1 conv → sigmoid."""

    def __init__(self, dim: int, reduced: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(dim, reduced, 1), nn.Conv2d(reduced, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.fc2(F.silu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * gate.sigmoid()


class RegBlock(nn.Module):
    """RegNet's bottleneck block (ratio 1): 1×1 → depthwise 3×3 → squeeze-excitation → 1×1, with a
    projected shortcut when the width changes."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *conv_norm(in_dim, out_dim),
            nn.SiLU(),
            *conv_norm(out_dim, out_dim, 3, groups=out_dim),
            nn.SiLU(),
            SqueezeExcite(out_dim, max(1, round(in_dim / 4))),
            *conv_norm(out_dim, out_dim),
        )
        self.shortcut = (
            nn.Identity() if in_dim == out_dim else nn.Sequential(*conv_norm(in_dim, out_dim))
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(self.body(x) + self.shortcut(x))


def reg_stage(depth: int, in_dim: int, out_dim: int) -> nn.Sequential:
    """`depth` RegNet blocks, the first mapping in_dim → out_dim."""
    return nn.Sequential(*(RegBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(depth)))


@register_projector("c_abstractor")
class CAbstractorProjector(Projector):
    """Locality-preserving convolutional abstractor; block width `hidden_dim` (None = the
    vision tower's width, as Honeybee's 1024 for CLIP-L)."""

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
        hidden = self.cfg.hidden_dim or in_dim
        self.stage1 = reg_stage(self.cfg.depth, in_dim, hidden)
        self.stage2 = reg_stage(self.cfg.depth, hidden, hidden)
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
