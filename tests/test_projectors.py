"""Every registered projector: shapes, token counts, finiteness, gradients; semantic's specifics."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from common.errors import ConfigError
from lightning_modules.projectors import PROJECTORS, ProjectorOutput, build_projector
from lightning_modules.projectors.semantic import (
    count_superpixels,
    order_superpixels,
    superpixel_coverage,
    superpixel_geometry,
)

IN_DIM, OUT_DIM = 16, 32


def voronoi_labels(k: int, h: int, w: int, seed: int) -> torch.Tensor:
    """H×W map of k Voronoi cells around distinct random seed pixels (every label present)."""
    gen = torch.Generator().manual_seed(seed)
    seeds = torch.randperm(h * w, generator=gen)[:k]
    sy, sx = seeds // w, seeds % w
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    dist = (ys[..., None] - sy) ** 2 + (xs[..., None] - sx) ** 2
    return dist.argmin(-1)


def batch(h: int = 8, w: int = 8, ks: tuple[int, ...] = (5, 9), size: tuple[int, int] = (32, 32)):
    """Features B×IN_DIM×h×w and label maps B×H×W with K = ks[b]; the last sample is padded."""
    torch.manual_seed(0)
    features = torch.randn(len(ks), IN_DIM, h, w)
    labels = torch.stack([voronoi_labels(k, *size, seed=i) for i, k in enumerate(ks)])
    labels[-1, -size[0] // 4 :] = -1
    return features, labels


def expected_tokens(proj, features, labels) -> list[int]:
    cfg, (b, _, h, w) = proj.cfg, features.shape
    fixed = {
        "mlp": lambda: h * w,
        "pool": lambda: cfg.k**2,
        "c_abstractor": lambda: cfg.k**2,
        "ldpv2": lambda: cfg.k**2,
        "resampler": lambda: cfg.num_queries,
        "tokenpacker": lambda: math.ceil(h / cfg.s) * math.ceil(w / cfg.s),
    }
    if cfg.name in fixed:
        return [fixed[cfg.name]()] * b
    return [min(len(torch.unique(m[m >= 0])), cfg.max_tokens) for m in labels]


def make(name: str, **overrides):
    return build_projector({"name": name, **overrides}, IN_DIM, OUT_DIM)


@pytest.mark.parametrize("name", sorted(PROJECTORS))
@pytest.mark.parametrize("grid", [(8, 8), (7, 9)])
def test_output_and_token_count(name, grid):
    features, labels = batch(*grid)
    proj = make(name).eval()
    with torch.no_grad():
        out = proj(features, labels)
    assert isinstance(out, ProjectorOutput)
    counts = expected_tokens(proj, features, labels)
    assert out.tokens.shape == (2, max(counts), OUT_DIM)
    assert out.tokens.dtype == features.dtype and out.mask.dtype == torch.bool
    assert out.mask.shape == out.tokens.shape[:2]
    assert torch.isfinite(out.tokens).all()
    assert out.mask.sum(1).tolist() == counts
    assert proj.num_tokens(features, labels).tolist() == counts
    assert isinstance(proj.token_budget, str) and proj.token_budget


@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_num_tokens_skips_forward(name, monkeypatch):
    features, labels = batch()
    proj = make(name)
    monkeypatch.setattr(proj, "forward", lambda *a, **k: pytest.fail("forward was called"))
    assert proj.num_tokens(features, labels).dtype == torch.long


GRADIENT_CASES = [(name, {}) for name in sorted(PROJECTORS)] + [
    ("semantic", {"pooling": "attn"}),
    ("semantic", {"pooling": "max"}),
    ("semantic", {"use_sspe": False}),
    ("resampler", {"num_layers": 2}),
]


@pytest.mark.parametrize("name,overrides", GRADIENT_CASES)
def test_every_parameter_gets_a_gradient(name, overrides):
    features, labels = batch(7, 9)
    proj = make(name, **overrides)
    out = proj(features.requires_grad_(), labels)
    (out.tokens * torch.randn_like(out.tokens)).sum().backward()
    assert features.grad.abs().sum() > 0
    for pname, param in proj.named_parameters():
        assert param.grad is not None, f"{pname} got no gradient"
        assert param.grad.abs().sum() > 0, f"{pname} got a zero gradient"


def test_config_contract():
    for name, cls in PROJECTORS.items():
        fields = dataclasses.fields(cls.Config)
        assert fields[0].name == "name" and fields[0].default == name
        assert OmegaConf.structured(cls.Config).name == name


@pytest.mark.parametrize(
    "cfg",
    [
        {"name": "pool", "k": 3},
        OmegaConf.create({"name": "pool", "k": 3}),
        OmegaConf.merge(OmegaConf.structured(PROJECTORS["pool"].Config), {"k": 3}),
        PROJECTORS["pool"].Config(k=3),
    ],
    ids=["dict", "dictconfig", "structured", "dataclass"],
)
def test_build_projector_accepts_config_forms(cfg):
    proj = build_projector(cfg, IN_DIM, OUT_DIM)
    assert proj.cfg.k == 3 and proj.token_budget == "k=3"


def test_build_projector_optional_hidden_dim():
    assert make("c_abstractor", hidden_dim=8).stage2[0].body[0].in_channels == 8
    assert make("c_abstractor").stage2[0].body[0].in_channels == IN_DIM


def test_c_abstractor_has_honeybees_shape_at_7b():
    """CLIP-L (1024) into LLaMA-7B (4096), depth 3: RegNet blocks 1024 wide with depthwise 3×3
    convolutions and squeeze-excitation to 256, as Honeybee's C-Abstractor — about 37M
    parameters, not a projector at the LLM's width."""
    proj = build_projector({"name": "c_abstractor", "k": 12}, 1024, 4096)
    dw = proj.stage1[0].body[3]
    assert (dw.kernel_size, dw.groups, dw.in_channels) == ((3, 3), 1024, 1024)
    d = 1024
    block = 2 * d * d + 9 * d + 3 * 2 * d + (d * 256 + 256) + (256 * d + d)
    readout = (d * 4096 + 4096) + (4096 * 4096 + 4096)
    assert sum(p.numel() for p in proj.parameters()) == 6 * block + readout  # 36,808,192


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"name": "nope"}, "available projectors: .*mlp.*semantic"),
        ({"k": 4}, "unknown projector.name"),
        ({"name": "pool", "kk": 4}, "projector.kk"),
        ({"name": "pool", "k": "four"}, "projector.k"),
        ({"name": "pool", "k": 0}, "projector.k must be a positive integer"),
        ({"name": "resampler", "num_heads": 5}, "projector.num_heads=5"),
        ({"name": "semantic", "pooling": "sum"}, "projector.pooling must be one of mean, max"),
        ({"name": "semantic", "ordering": "random"}, "projector.ordering"),
        ({"name": "semantic", "max_tokens": 0}, "projector.max_tokens"),
    ],
)
def test_build_projector_errors(cfg, match):
    with pytest.raises(ConfigError, match=match):
        build_projector(cfg, IN_DIM, OUT_DIM)


def test_wrong_feature_channels():
    features, _ = batch()
    with pytest.raises(ValueError, match="expects features B×16×h×w"):
        make("mlp")(features[:, :8])


def test_semantic_requires_labels():
    features, _ = batch()
    proj = make("semantic")
    with pytest.raises(ConfigError, match="needs superpixel label maps"):
        proj(features)
    with pytest.raises(ConfigError, match="needs superpixel label maps"):
        proj.num_tokens(features)


@pytest.mark.parametrize(
    "size,grid", [((32, 32), (8, 8)), ((30, 27), (7, 5)), ((5, 6), (8, 8))], ids=str
)
def test_coverage_is_adaptive_pool_of_one_hot(size, grid):
    labels = torch.stack([voronoi_labels(6, *size, seed=s) for s in range(2)])
    labels[1, : size[0] // 3] = -1
    one_hot = (labels[:, None] == torch.arange(6)[None, :, None, None]).float()
    expected = F.adaptive_avg_pool2d(one_hot, grid).flatten(2)
    torch.testing.assert_close(superpixel_coverage(labels, 6, *grid), expected)


@pytest.mark.parametrize(
    "overrides",
    [{"pooling": "mean"}, {"pooling": "max"}, {"pooling": "attn"}, {"use_sspe": False}],
)
def test_semantic_padding_invariance(overrides):
    features, labels = batch(ks=(4, 11))
    proj = make("semantic", **overrides).eval()
    with torch.no_grad():
        alone = proj(features[:1], labels[:1])
        together = proj(features, labels)
        swapped = proj(features.flip(0), labels.flip(0))
    n = int(alone.mask.sum())
    assert alone.tokens.shape[1] == n < together.tokens.shape[1]
    torch.testing.assert_close(together.tokens[0, :n], alone.tokens[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(swapped.tokens[1, :n], alone.tokens[0], atol=1e-5, rtol=0)
    assert not together.mask[0, n:].any() and (together.tokens[0, n:] == 0).all()


def test_semantic_mean_pooling_is_area_weighted_mean():
    features, labels = batch()
    proj = make("semantic", use_sspe=False, use_ssa_inside=False, use_ssa_outside=False)
    assert {n.split(".")[0] for n, _ in proj.named_parameters()} == {"proj"}
    with torch.no_grad():
        out = proj(features, labels)
    ordered, _ = order_superpixels(labels, 64, "centroid", 8)
    cov = superpixel_coverage(ordered, out.tokens.shape[1], 8, 8)
    patches = features.flatten(2).transpose(1, 2)
    pooled = (cov @ patches) / cov.sum(-1, keepdim=True).clamp(min=1e-12)
    torch.testing.assert_close(out.tokens[out.mask], proj.proj(pooled)[out.mask])


def test_semantic_single_superpixel_max_pool_is_global_max():
    features = torch.randn(1, IN_DIM, 8, 8)
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    proj = make("semantic", pooling="max", use_ssa_inside=False, use_ssa_outside=False)
    assert proj.pool(features.flatten(2).transpose(1, 2), torch.ones(1, 1, 64)).allclose(
        features.amax((2, 3))[:, None]
    )
    assert proj(features, labels).tokens.shape == (1, 1, OUT_DIM)


@pytest.mark.parametrize(
    "overrides,present,absent",
    [
        ({}, {"proj", "sspe", "ssa_inside", "ssa_outside", "ffn"}, {"pool_query"}),
        ({"use_sspe": False}, {"ssa_inside"}, {"sspe"}),
        ({"use_ssa_inside": False}, {"ssa_outside", "ffn"}, {"ssa_inside"}),
        ({"use_ssa_outside": False}, {"ssa_inside", "ffn"}, {"ssa_outside"}),
        (
            {"use_ssa_inside": False, "use_ssa_outside": False},
            {"proj"},
            {"ssa_inside", "ssa_outside", "ffn", "norm_q"},
        ),
        ({"pooling": "attn"}, {"pool_query", "pool_key"}, set()),
    ],
)
def test_semantic_switches_change_parameters_and_outputs(overrides, present, absent):
    features, labels = batch()
    torch.manual_seed(1)
    full = make("semantic").eval()
    torch.manual_seed(1)
    ablated = make("semantic", **overrides).eval()
    names = {n.split(".")[0] for n, _ in ablated.named_parameters()}
    assert present <= names and not absent & names
    if overrides:
        ablated.load_state_dict(full.state_dict(), strict=False)
        with torch.no_grad():
            assert not torch.allclose(
                ablated(features, labels).tokens, full(features, labels).tokens
            )


def test_semantic_max_tokens_merges_smallest():
    labels = torch.zeros(1, 10, 10, dtype=torch.long)
    widths = [4, 3, 1, 1, 1]  # vertical stripes 0..4; the last three are the smallest
    labels[0] = torch.repeat_interleave(torch.arange(5), torch.tensor(widths))[None].expand(10, -1)
    assert count_superpixels(labels, 3).tolist() == [3]
    capped, counts = order_superpixels(labels, 3, "centroid", 5)
    assert counts.tolist() == [3]
    assert capped[0, 0].tolist() == [0] * 4 + [1] * 3 + [2] * 3
    features = torch.randn(1, IN_DIM, 5, 5)
    out = make("semantic", max_tokens=3)(features, labels)
    assert out.tokens.shape[1] == 3 and out.mask.all()


def test_semantic_ordering():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :4, :2] = 3  # top-left, small
    labels[0, :4, 2:] = 1  # top-right, large
    labels[0, 4:, :5] = 0  # bottom-left, largest
    labels[0, 4:, 5:] = 2  # bottom-right
    by_centroid, _ = order_superpixels(labels, 64, "centroid", 2)
    by_area, _ = order_superpixels(labels, 64, "area", 2)
    corners = lambda m: [m[0, 0, 0], m[0, 0, 7], m[0, 7, 0], m[0, 7, 7]]  # noqa: E731
    assert [int(v) for v in corners(by_centroid)] == [0, 1, 2, 3]
    assert [int(v) for v in corners(by_area)] == [3, 0, 1, 2]


def test_semantic_drops_absent_labels():
    features, labels = batch()
    labels[0][labels[0] == 2] = 7  # labels 0,1,3,4,7: five present, K_max = 8
    proj = make("semantic").eval()
    out = proj(features, labels)
    assert out.mask.sum(1).tolist() == expected_tokens(proj, features, labels)
    assert out.mask.sum(1)[0] == 5 and torch.isfinite(out.tokens).all()


def test_superpixel_geometry():
    labels = torch.full((1, 8, 8), -1, dtype=torch.long)
    labels[0, :4, :4] = 0  # full 4×4 square
    labels[0, 4:, :4] = 1
    labels[0, 4:, 0] = 2  # L-shape for 1: columns 1..3 of the bottom rows
    labels[0, 7, 0] = 1
    geo = superpixel_geometry(labels, 3, 2)
    assert geo.shape == (1, 3, 7 + 4)
    torch.testing.assert_close(geo[0, 0, :7], torch.tensor([0, 0, 0.5, 0.5, 0.25, 0.25, 0.5]))
    torch.testing.assert_close(geo[0, 0, 7:], torch.ones(4))
    torch.testing.assert_close(geo[0, 1, 7:], torch.tensor([0.5, 1.0, 0.75, 1.0]))
    thin = geo[0, 2]  # a 1-pixel-wide column: every bin is filled from the bin under its centre
    torch.testing.assert_close(thin[:4], torch.tensor([0, 0.5, 0.125, 0.875]))
    torch.testing.assert_close(thin[7:], torch.ones(4))


def test_semantic_all_padding_gives_no_tokens():
    features = torch.randn(2, IN_DIM, 8, 8)
    labels = torch.full((2, 32, 32), -1, dtype=torch.long)
    labels[0, :4] = 0
    proj = make("semantic")
    out = proj(features, labels)
    assert out.tokens.shape == (2, 1, OUT_DIM) and out.mask.tolist() == [[True], [False]]
    assert proj(features[1:], labels[1:]).tokens.shape == (1, 0, OUT_DIM)
    assert proj.num_tokens(features, labels).tolist() == [1, 0]


@pytest.mark.parametrize("name", sorted(PROJECTORS))
@pytest.mark.parametrize("grid", [(8, 8), (7, 9)])
def test_footprints_share_every_cell(name, grid):
    """`regions`: B×N×(h·w); a cell's shares over the real tokens sum to 1; padding owns none."""
    features, labels = batch(*grid)
    proj = make(name).eval()
    with torch.no_grad():
        out = proj(features, labels)
    if not type(proj).has_regions:
        assert out.regions is None
        return
    b, n = out.mask.shape
    h, w = grid
    assert out.regions.shape == (b, n, h * w)
    assert (out.regions >= 0).all()
    assert (out.regions[~out.mask] == 0).all()
    shares = out.regions.sum(1)
    if name == "semantic":  # the padded bottom quarter of the last label map covers no token
        valid = F.adaptive_avg_pool2d((labels >= 0).float()[:, None], grid).flatten(1)
        torch.testing.assert_close(shares, valid)
    else:
        torch.testing.assert_close(shares, torch.ones_like(shares))


def test_grid_footprints_by_hand():
    from lightning_modules.projectors.base import grid_output

    # 3 cells pooled to 2 windows: PyTorch's windows are [0, 2) and [1, 3); cell 1 is shared
    r = grid_output(torch.zeros(1, 2, 4), torch.zeros(1, 1, 1, 3), 1, 2).regions[0]
    torch.testing.assert_close(r, torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]]))
    out = make("tokenpacker", s=2)(torch.randn(1, IN_DIM, 3, 3))
    # 2×2 tokens over 3×3 cells: token 0 owns cells (0,0),(0,1),(1,0),(1,1); token 3 only (2,2)
    assert out.regions[0, 0].view(3, 3).tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 0]]
    assert out.regions[0, 3].view(3, 3).tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 1]]
