"""`semantic` — SVP: one visual token per superpixel (mask pooling + SSPE + SSA).

Per sample, the superpixel label map (image resolution, −1 = padding) is
1. capped: with more than `max_tokens` superpixels, the `max_tokens − 1` largest are kept and all
   the others are merged into one last token (their union), so no pixel is dropped;
2. ordered: `centroid` = raster order of the centroids (feature-grid row, then x) | `area` = largest
   first;
3. resized to the feature grid by area (each entry is the fraction of a patch the superpixel covers,
   exactly adaptive average pooling of its one-hot mask) and used to pool the patch features
   (`mean` area-weighted | `max` over covered patches | `attn` learned query with a log-area bias);
4. SSPE adds an MLP embedding of its geometry: normalised bbox, centroid, area fraction and a shape
   code (its mask inside its bbox, area-resized to `shape_size`²);
5. SSA lets each token attend to the patches inside it (`use_ssa_inside`) and to all patches
   (`use_ssa_outside`), then residual + MLP.
The batch is padded to the largest token count; padded slots are masked everywhere, so a sample's
tokens do not depend on the other samples in its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from common.errors import ConfigError
from lightning_modules.projectors.base import (
    CrossAttention,
    Projector,
    ProjectorOutput,
    adaptive_pool_matrix,
    register_projector,
    require_heads,
    require_positive,
    sincos_2d,
    two_layer_mlp,
)

POOLINGS = ("mean", "max", "attn")
ORDERINGS = ("centroid", "area")
GEOMETRY_DIM = 7  # bbox (4) + centroid (2) + area fraction (1); the shape code comes on top


def segment_sums(index: Tensor, values: Tensor, k: int) -> Tensor:
    """Per-sample sums of `values` (B×P) into bins 0..k−1 given by `index` (B×P, −1 dropped)."""
    slot = torch.where(index >= 0, index, k)
    return values.new_zeros(index.shape[0], k + 1).scatter_add_(1, slot, values)[:, :k]


def segment_extreme(index: Tensor, values: Tensor, k: int, reduce: str, empty: int) -> Tensor:
    """Per-sample `amin`/`amax` of integer `values` per bin; `empty` where a bin has no member."""
    slot = torch.where(index >= 0, index, k)
    out = values.new_full((index.shape[0], k + 1), empty)
    return out.scatter_reduce_(1, slot, values, reduce)[:, :k]


def relabel(index: Tensor, lut: Tensor) -> Tensor:
    """Map labels (B×P, −1 kept) through a per-sample lookup table (B×k, −1 = drop)."""
    pad = lut.new_full((lut.shape[0], 1), -1)
    return torch.cat([lut, pad], 1).gather(1, torch.where(index >= 0, index, lut.shape[1]))


def ranks(key: Tensor) -> Tensor:
    """Rank of every entry of each row of `key` in ascending (stable) order."""
    order = torch.sort(key, dim=1, stable=True).indices
    positions = torch.arange(key.shape[1], device=key.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def pixel_coords(shape: tuple[int, int], device: Any) -> tuple[Tensor, Tensor]:
    """Row and column index of every pixel of an H×W map, flattened (1×H·W each)."""
    h, w = shape
    ys = torch.arange(h, device=device).repeat_interleave(w)
    return ys[None], torch.arange(w, device=device).repeat(h)[None]


def count_superpixels(labels: Tensor, max_tokens: int) -> Tensor:
    """Tokens per sample: superpixels present in the map, capped at `max_tokens` (LongTensor[B])."""
    flat = labels.long().flatten(1)
    k = int(flat.max()) + 1 if flat.numel() else 0
    area = segment_sums(flat, torch.ones_like(flat), k)
    return (area > 0).sum(1).clamp(max=max_tokens)


def order_superpixels(
    labels: Tensor, max_tokens: int, ordering: str, grid_h: int
) -> tuple[Tensor, Tensor]:
    """Cap and order the superpixels of B×H×W label maps → (relabelled B×H×W maps, counts B).

    Labels become 0..n_b−1 in token order (n_b = `count_superpixels`); absent labels are dropped.
    `centroid` orders by the feature-grid row (of `grid_h` rows) holding the centroid, then by x.
    """
    b, h, w = labels.shape
    flat = labels.long().flatten(1)
    k = int(flat.max()) + 1 if flat.numel() else 0
    area = segment_sums(flat, torch.ones_like(flat), k)
    by_area = torch.where(area > 0, ranks(-area).clamp(max=max_tokens - 1), -1)
    flat = relabel(flat, by_area)
    k = min(k, max_tokens)
    area = segment_sums(flat, torch.ones_like(flat), k)
    if ordering == "area":
        key = -area.double()
    else:
        ys, xs = pixel_coords((h, w), labels.device)
        safe = area.clamp(min=1).double()
        cy = segment_sums(flat, ys.expand_as(flat), k) / safe + 0.5
        cx = segment_sums(flat, xs.expand_as(flat), k) / safe + 0.5
        key = torch.floor(cy * grid_h / h) * (w + 1) + cx
        key = key.masked_fill(area == 0, math.inf)
    return relabel(flat, ranks(key)).view(b, h, w), (area > 0).sum(1)


def superpixel_coverage(labels: Tensor, k: int, h: int, w: int) -> Tensor:
    """Fraction of each h×w grid cell covered by each superpixel: B×k×(h·w), float32.

    Equals `adaptive_avg_pool2d(one_hot(labels), (h, w))` but never builds the K×H×W one-hot: it
    pools the columns with a scatter and then the rows with an index-add, both sparse.
    """
    b, height, width = labels.shape
    slot = torch.where(labels >= 0, labels.long(), k)
    rx = adaptive_pool_matrix(width, w, labels.device)
    j, x = rx.nonzero(as_tuple=True)
    rows = torch.zeros(b, height, (k + 1) * w, device=labels.device)
    rows.scatter_add_(2, slot[:, :, x] * w + j, rx[j, x].expand(b, height, -1))
    ry = adaptive_pool_matrix(height, h, labels.device)
    i, y = ry.nonzero(as_tuple=True)
    cov = rows.new_zeros(b, h, (k + 1) * w).index_add_(1, i, rows[:, y] * ry[i, y][None, :, None])
    return cov.view(b, h, k + 1, w)[:, :, :k].permute(0, 2, 1, 3).reshape(b, k, h * w)


def superpixel_geometry(labels: Tensor, k: int, shape_size: int) -> Tensor:
    """SSPE input per superpixel: B×k×(7 + shape_size²), float32, zeros for absent labels.

    Columns: bbox x0, y0, x1, y1 and centroid x, y (normalised by the map's width/height), area as
    a fraction of the non-padding pixels, then the shape code: the fraction of each of s×s bins of
    the bbox that the superpixel covers (a bin of a box thinner than s pixels takes the value of the
    bin under its centre).
    """
    b, h, w = labels.shape
    s = shape_size
    flat = labels.long().flatten(1)
    ys, xs = pixel_coords((h, w), labels.device)
    ys, xs = ys.expand_as(flat), xs.expand_as(flat)
    area = segment_sums(flat, torch.ones_like(flat), k)
    present = area > 0
    x0 = segment_extreme(flat, xs, k, "amin", w)
    y0 = segment_extreme(flat, ys, k, "amin", h)
    box_w = (segment_extreme(flat, xs, k, "amax", -1) - x0 + 1).clamp(min=1)
    box_h = (segment_extreme(flat, ys, k, "amax", -1) - y0 + 1).clamp(min=1)
    safe = area.clamp(min=1)
    valid_pixels = (flat >= 0).sum(1, keepdim=True).clamp(min=1)
    geometry = torch.stack(
        [
            x0 / w,
            y0 / h,
            (x0 + box_w) / w,
            (y0 + box_h) / h,
            (segment_sums(flat, xs, k) / safe + 0.5) / w,
            (segment_sums(flat, ys, k) / safe + 0.5) / h,
            area / valid_pixels,
        ],
        dim=-1,
    ).float()

    idx = flat.clamp(min=0)
    u = (xs - x0.gather(1, idx)) * s // box_w.gather(1, idx)
    v = (ys - y0.gather(1, idx)) * s // box_h.gather(1, idx)
    bins = torch.where(flat >= 0, flat * s * s + v * s + u, -1)
    counts = segment_sums(bins, torch.ones_like(bins), k * s * s).view(b, k, s, s)
    edges = torch.arange(s + 1, device=labels.device)
    col_edges = -(-edges * box_w[..., None] // s)
    row_edges = -(-edges * box_h[..., None] // s)
    cols = col_edges.diff(dim=-1)
    rows = row_edges.diff(dim=-1)
    bin_area = rows[..., :, None] * cols[..., None, :]
    shape = counts / bin_area.clamp(min=1)
    centre = edges[:-1] * 2 + 1
    src_u = ((centre * box_w[..., None]) // (2 * s)) * s // box_w[..., None]
    src_v = ((centre * box_h[..., None]) // (2 * s)) * s // box_h[..., None]
    from_centre = shape.gather(2, src_v[..., None].expand(-1, -1, -1, s))
    from_centre = from_centre.gather(3, src_u[..., None, :].expand(-1, -1, s, -1))
    shape = torch.where(bin_area > 0, shape, from_centre).flatten(2)
    return torch.cat([geometry, shape.float()], -1) * present[..., None]


@register_projector("semantic")
class SemanticProjector(Projector):
    """Superpixel tokens: n_b = #superpixels of sample b, capped at `max_tokens`.

    Attention width is `out_dim`; `num_heads` is used by SSA.
    """

    @dataclass
    class Config:
        name: str = "semantic"
        pooling: str = "mean"
        use_sspe: bool = True
        use_ssa_inside: bool = True
        use_ssa_outside: bool = True
        max_tokens: int = 64
        ordering: str = "centroid"
        shape_size: int = 4
        num_heads: int = 4

    def __init__(self, cfg: Any, in_dim: int, out_dim: int) -> None:
        super().__init__(cfg, in_dim, out_dim)
        cfg = self.cfg
        for key, choices in (("pooling", POOLINGS), ("ordering", ORDERINGS)):
            if getattr(cfg, key) not in choices:
                raise ConfigError(
                    f"projector.{key} must be one of {', '.join(choices)}, "
                    f"got {getattr(cfg, key)!r}."
                )
        require_positive(cfg, "max_tokens", "shape_size", "num_heads")
        if cfg.pooling == "attn":
            self.pool_query = nn.Parameter(torch.randn(in_dim) * 0.02)
            self.pool_key = nn.Linear(in_dim, in_dim, bias=False)
        self.proj = two_layer_mlp(in_dim, out_dim, out_dim)
        geometry_dim = GEOMETRY_DIM + cfg.shape_size**2
        self.sspe = two_layer_mlp(geometry_dim, out_dim, out_dim) if cfg.use_sspe else None
        self.ssa_inside = self.ssa_outside = None
        if cfg.use_ssa_inside or cfg.use_ssa_outside:
            require_heads(cfg.num_heads, out_dim)
            self.norm_q = nn.LayerNorm(out_dim)
            self.norm_kv = nn.LayerNorm(in_dim)
            if cfg.use_ssa_inside:
                self.ssa_inside = CrossAttention(out_dim, in_dim, cfg.num_heads)
            if cfg.use_ssa_outside:
                self.ssa_outside = CrossAttention(out_dim, in_dim, cfg.num_heads)
            self.norm_ffn = nn.LayerNorm(out_dim)
            self.ffn = two_layer_mlp(out_dim, 4 * out_dim, out_dim)

    def check_labels(self, features: Tensor, labels: Tensor | None) -> Tensor:
        """Raise unless `labels` are B×H×W label maps for the B samples of `features`."""
        if labels is None:
            raise ConfigError(
                "projector 'semantic' needs superpixel label maps, but none were given; "
                "configure `superpixels` so the data module loads them."
            )
        if labels.ndim != 3 or labels.shape[0] != features.shape[0]:
            raise ValueError(
                f"labels must be B×H×W with B={features.shape[0]}, got {tuple(labels.shape)}"
            )
        return labels

    def pool(self, patches: Tensor, cov: Tensor) -> Tensor:
        """Pool B×P×C patch features into B×k×C with the B×k×P coverage weights."""
        covered = cov > 0
        any_covered = covered.any(-1, keepdim=True)
        if self.cfg.pooling == "mean":
            area = cov.sum(-1, keepdim=True).clamp(min=torch.finfo(cov.dtype).tiny)
            return (cov @ patches) / area
        if self.cfg.pooling == "max":
            values = patches[:, None].masked_fill(~covered[..., None], -math.inf).amax(2)
            return torch.where(any_covered, values, 0.0)
        scores = self.pool_key(patches) @ self.pool_query / math.sqrt(self.in_dim)
        logits = torch.where(any_covered, scores[:, None] + cov.log(), 0.0)
        return logits.softmax(-1) @ patches

    def forward(self, features: Tensor, labels: Tensor | None = None) -> ProjectorOutput:
        self.check_features(features)
        labels = self.check_labels(features, labels)
        _, _, h, w = features.shape
        cfg = self.cfg
        labels, counts = order_superpixels(labels, cfg.max_tokens, cfg.ordering, h)
        k = int(counts.max()) if counts.numel() else 0
        mask = torch.arange(k, device=features.device) < counts[:, None]
        if k == 0:
            empty = features.new_zeros(*mask.shape, h * w)
            return ProjectorOutput(features.new_zeros(*mask.shape, self.out_dim), mask, empty)
        cov = superpixel_coverage(labels, k, h, w).to(features.dtype)
        patches = features.flatten(2).transpose(1, 2)
        tokens = self.proj(self.pool(patches, cov))
        if self.sspe is not None:
            geometry = superpixel_geometry(labels, k, cfg.shape_size).to(features.dtype)
            tokens = tokens + self.sspe(geometry)
        if self.ssa_inside is not None or self.ssa_outside is not None:
            query, kv = self.norm_q(tokens), self.norm_kv(patches)
            key_pos = sincos_2d(h, w, self.out_dim, features.device, features.dtype)
            if self.ssa_inside is not None:
                inside = (cov > 0) | ~mask[..., None]
                tokens = tokens + self.ssa_inside(query, kv, key_pos, inside)
            if self.ssa_outside is not None:
                tokens = tokens + self.ssa_outside(query, kv, key_pos)
            tokens = tokens + self.ffn(self.norm_ffn(tokens))
        return ProjectorOutput(tokens.masked_fill(~mask[..., None], 0.0), mask, cov)

    def num_tokens(self, features: Tensor, labels: Tensor | None = None) -> Tensor:
        labels = self.check_labels(features, labels)
        return count_superpixels(labels, self.cfg.max_tokens).to(features.device)

    @property
    def token_budget(self) -> str:
        return f"K<={self.cfg.max_tokens}"
