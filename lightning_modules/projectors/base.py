"""Projector registry, the shared `Projector` base class and the layers several projectors use."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException
from torch import Tensor, nn

from common.errors import ConfigError

PROJECTORS: dict[str, type[Projector]] = {}


class ProjectorOutput(NamedTuple):
    """Visual tokens B×N×D, their mask B×N (True = real token, False = padding) and footprints.

    `regions` (B×N×(h·w), or None for tokens without a place in the image, e.g. learned queries):
    the share of each feature-grid cell that each token stands for; a cell's shares sum to 1 over
    the tokens. The grounding pointer (`lightning_modules/grounding.py`) uses it to find the tokens
    that cover the target and where they are.
    """

    tokens: Tensor
    mask: Tensor
    regions: Tensor | None = None


def register_projector(name: str) -> Callable[[type[Projector]], type[Projector]]:
    """Class decorator: add a projector to `PROJECTORS` under `name` (its `Config.name` default)."""

    def add(cls: type[Projector]) -> type[Projector]:
        fields = dataclasses.fields(cls.Config)
        if not fields or fields[0].name != "name" or fields[0].default != name:
            raise TypeError(f"{cls.__name__}.Config must start with `name: str = {name!r}`")
        if name in PROJECTORS:
            raise ValueError(f"projector {name!r} is already registered")
        PROJECTORS[name] = cls
        return cls

    return add


def build_projector(cfg: Any, in_dim: int, out_dim: int) -> Projector:
    """Build the projector named by `cfg.name` from a dict, DictConfig or `Config` instance."""
    name = cfg.get("name") if isinstance(cfg, Mapping | DictConfig) else getattr(cfg, "name", None)
    if name not in PROJECTORS:
        raise ConfigError(
            f"unknown projector.name {name!r}; available projectors: {', '.join(PROJECTORS)}."
        )
    return PROJECTORS[name](cfg, in_dim, out_dim)


def to_config(schema: type, cfg: Any) -> Any:
    """Validate `cfg` (None, dict, DictConfig or dataclass) against `schema`; return a `schema`."""
    if cfg is None:
        return schema()
    if isinstance(cfg, schema):
        return cfg
    name = schema().name
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    except ConfigKeyError as err:
        valid = ", ".join(f.name for f in dataclasses.fields(schema))
        raise ConfigError(
            f"unknown key 'projector.{err.full_key or err.key}' for projector {name!r}; "
            f"valid keys: {valid}."
        ) from err
    except OmegaConfBaseException as err:
        raise ConfigError(
            f"bad value for 'projector.{err.full_key or err.key}': {str(err).splitlines()[0]}"
        ) from err
    if merged.name != name:
        raise ConfigError(f"projector.name is {merged.name!r} but the schema is {name!r}.")
    return OmegaConf.to_object(merged)


def require_positive(cfg: Any, *keys: str) -> None:
    """Raise ConfigError unless every `cfg.<key>` is an integer >= 1."""
    for key in keys:
        value = getattr(cfg, key)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"projector.{key} must be a positive integer, got {value!r}.")


def require_heads(num_heads: int, dim: int) -> None:
    """Raise ConfigError unless `num_heads` divides the attention width `dim`."""
    if num_heads < 1 or dim % num_heads:
        raise ConfigError(
            f"projector.num_heads={num_heads} must divide the attention width {dim} (out_dim)."
        )


class Projector(nn.Module):
    """Base class: `Cls(cfg, in_dim, out_dim)`; `forward(features, labels=None)` → ProjectorOutput.

    `features` are B×C×h×w (C = in_dim, one vision-tower layer); `labels` are B×H×W superpixel
    label maps (−1 = padding), used only by projectors that need them. `has_regions`: whether
    `forward` fills `ProjectorOutput.regions`.
    """

    Config: ClassVar[type]
    has_regions: ClassVar[bool] = True

    def __init__(self, cfg: Any, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.cfg = to_config(type(self).Config, cfg)
        self.in_dim = in_dim
        self.out_dim = out_dim

    def check_features(self, features: Tensor) -> None:
        """Raise ValueError unless `features` is B×in_dim×h×w."""
        if features.ndim != 4 or features.shape[1] != self.in_dim:
            raise ValueError(
                f"{type(self).__name__} expects features B×{self.in_dim}×h×w, "
                f"got shape {tuple(features.shape)}"
            )

    def num_tokens(self, features: Tensor, labels: Tensor | None = None) -> Tensor:
        """Tokens per sample as a LongTensor[B] (equals `forward(...).mask.sum(1)`), cheaply."""
        raise NotImplementedError

    @property
    def token_budget(self) -> str:
        """Short human-readable token budget for reports, e.g. `k=4`."""
        raise NotImplementedError

    def start_from_llava(self, path: str) -> bool:
        """Take trained weights from the LLaVA checkpoint at `path` where this projector has a
        counterpart (only `mlp` does); True when it did."""
        return False


def fixed_count(features: Tensor, n: int) -> Tensor:
    """LongTensor[B] filled with `n`."""
    return torch.full((features.shape[0],), n, dtype=torch.long, device=features.device)


def full_mask(tokens: Tensor) -> Tensor:
    """All-True mask B×N for a projector whose tokens are all real."""
    return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)


def adaptive_pool_matrix(n_in: int, n_out: int, device: Any) -> Tensor:
    """n_out×n_in weights of 1-D adaptive average pooling (PyTorch's window rule)."""
    i = torch.arange(n_out, device=device)
    start = (i * n_in) // n_out
    end = ((i + 1) * n_in + n_out - 1) // n_out
    x = torch.arange(n_in, device=device)
    inside = (x[None] >= start[:, None]) & (x[None] < end[:, None])
    return inside / (end - start)[:, None]


def block_regions(rows: Tensor, cols: Tensor) -> Tensor:
    """Footprints from 0/1 row (gh×h) and column (gw×w) memberships, each cell's shares summing
    to 1: (gh·gw)×(h·w)."""
    regions = torch.kron(rows.float(), cols.float())
    return regions / regions.sum(0, keepdim=True).clamp(min=1.0)


def batch_regions(regions: Tensor, features: Tensor) -> Tensor:
    """One footprint matrix N×P, viewed (not copied) for each of the B samples: B×N×P."""
    return regions.to(features.dtype)[None].expand(features.shape[0], -1, -1)


def grid_output(tokens: Tensor, features: Tensor, gh: int, gw: int) -> ProjectorOutput:
    """Output of a projector whose tokens are a gh×gw grid adaptively pooled from the h×w
    features (gh = h, gw = w: one token per patch).

    A token covers the cells of its adaptive-average-pooling window; a cell inside several
    windows is shared equally between them.
    """
    (h, w), dev = features.shape[2:], features.device
    rows, cols = adaptive_pool_matrix(h, gh, dev) > 0, adaptive_pool_matrix(w, gw, dev) > 0
    regions = batch_regions(block_regions(rows, cols), features)
    return ProjectorOutput(tokens, full_mask(tokens), regions)


def two_layer_mlp(in_dim: int, hidden_dim: int, out_dim: int, act: type = nn.GELU) -> nn.Sequential:
    """Linear → activation → Linear (LLaVA-1.5's `mlp2x_gelu` with GELU)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), act(), nn.Linear(hidden_dim, out_dim))


def sincos_2d(h: int, w: int, dim: int, device: Any = None, dtype: Any = None) -> Tensor:
    """Fixed 2-D sine-cosine position embedding (MAE): (h·w)×dim, half y, half x, raster order.

    When `dim` is not a multiple of 4 the last `dim % 4` channels are zero.
    """
    quarter = dim // 4
    steps = torch.arange(quarter, device=device, dtype=torch.float32)
    omega = 1.0 / 10000 ** (steps / max(quarter, 1))
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    parts = []
    for pos in (ys.flatten(), xs.flatten()):
        angle = pos[:, None] * omega[None, :]
        parts += [angle.sin(), angle.cos()]
    emb = F.pad(torch.cat(parts, dim=1), (0, dim - 4 * quarter))
    return emb.to(dtype) if dtype is not None else emb


class CrossAttention(nn.Module):
    """Multi-head attention from queries to keys/values (keys may carry a position embedding).

    The key projection has no bias: a key bias shifts every logit of a query equally, so the
    softmax ignores it and it would never receive a gradient.
    """

    def __init__(self, dim: int, kv_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(kv_dim, dim, bias=False)
        self.v_proj = nn.Linear(kv_dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _queries_keys(self, x: Tensor, kv: Tensor, key_pos: Tensor | None) -> tuple[Tensor, Tensor]:
        """Per-head queries B×heads×L×d and keys B×heads×S×d."""
        b, n_q, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        k = self.k_proj(kv)
        if key_pos is not None:
            k = k + key_pos
        q = self.q_proj(x).view(b, n_q, heads, head_dim).transpose(1, 2)
        return q, k.view(b, -1, heads, head_dim).transpose(1, 2)

    def weights(self, x: Tensor, kv: Tensor, key_pos: Tensor | None = None) -> Tensor:
        """The attention weights B×L×S (softmax over the keys, mean over the heads), unmasked."""
        q, k = self._queries_keys(x, kv, key_pos)
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        return logits.softmax(-1).mean(1)

    def forward(
        self,
        x: Tensor,
        kv: Tensor,
        key_pos: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Attend.

        Arguments:
          x: B×L×dim queries; kv: B×S×kv_dim keys/values; key_pos: S×dim or B×S×dim, added to the
          projected keys; mask: bool, broadcastable to B×L×S, True where a query may attend (every
          query row must allow at least one key).
        Returns:
          B×L×dim.
        """
        q, k = self._queries_keys(x, kv, key_pos)
        b, n_q, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        v = self.v_proj(kv).view(b, -1, heads, head_dim).transpose(1, 2)
        attn_mask = mask.unsqueeze(1) if mask is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n_q, dim))
