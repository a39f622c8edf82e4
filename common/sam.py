"""Build, save and load segment-anything models: the official ViT-B/L/H or a small custom SAM.

Checkpoints are SAM's own format, a plain ``state_dict()`` loadable by ``segment_anything``'s
classes. A custom checkpoint ``<name>.pth`` keeps the `SamConfig` that built it in the sidecar
``<name>.json`` beside it; the official sizes need no sidecar.

The checkpoint ``"random"`` builds an official-shape SAM with random weights, and only inside
`random_weights_allowed()` (what `svp bench` uses to measure time and memory at real shape without
a download); anywhere else it is an error, so no run trains or segments with an untrained SAM.
"""

import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from common.errors import ConfigError
from common.files import atomic_write, write_json

MODEL_TYPES = ("custom", "vit_b", "vit_l", "vit_h")
RANDOM_WEIGHTS = "random"
_random_allowed: ContextVar[bool] = ContextVar("random_sam_allowed", default=False)


@dataclass
class SamConfig:
    """SAM architecture; the size fields apply to ``model_type="custom"`` only."""

    model_type: str = "custom"
    checkpoint: str | None = None
    img_size: int = 128
    patch_size: int = 8
    encoder_embed_dim: int = 96
    encoder_depth: int = 4
    encoder_num_heads: int = 4
    encoder_global_attn_indexes: list[int] = field(default_factory=lambda: [1, 3])
    encoder_mlp_ratio: float = 4.0
    window_size: int = 8
    use_rel_pos: bool = True
    prompt_embed_dim: int = 64
    pe_scale: float = 1.0
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 256
    decoder_num_heads: int = 4
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 64
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])


def _check(cfg: SamConfig) -> None:
    if cfg.model_type not in MODEL_TYPES:
        raise ConfigError(
            f"sam.model_type={cfg.model_type!r} is unknown; use one of {', '.join(MODEL_TYPES)}"
        )
    if cfg.model_type != "custom":
        return
    if cfg.img_size % cfg.patch_size:
        raise ConfigError(
            f"sam.img_size={cfg.img_size} is not a multiple of sam.patch_size={cfg.patch_size}"
        )
    for key, dim, heads in (
        ("encoder", cfg.encoder_embed_dim, cfg.encoder_num_heads),
        ("decoder", cfg.prompt_embed_dim // 2, cfg.decoder_num_heads),
    ):
        if dim % heads:
            raise ConfigError(
                f"sam.{key}_num_heads={heads} must divide {dim} "
                f"({'encoder_embed_dim' if key == 'encoder' else 'prompt_embed_dim / 2'})"
            )
    if cfg.prompt_embed_dim % 8 or cfg.mask_in_chans % 4:
        raise ConfigError(
            "sam.prompt_embed_dim must be a multiple of 8 and sam.mask_in_chans of 4 "
            f"(got {cfg.prompt_embed_dim} and {cfg.mask_in_chans})"
        )
    bad = [i for i in cfg.encoder_global_attn_indexes if not 0 <= i < cfg.encoder_depth]
    if bad:
        raise ConfigError(
            f"sam.encoder_global_attn_indexes {bad} are outside 0..{cfg.encoder_depth - 1}"
        )


def build_sam(cfg: SamConfig) -> Sam:
    """A randomly initialised SAM of the configured architecture (in eval mode, like SAM's own)."""
    _check(cfg)
    if cfg.model_type != "custom":
        return sam_model_registry[cfg.model_type](checkpoint=None)
    grid = cfg.img_size // cfg.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=cfg.encoder_depth,
            embed_dim=cfg.encoder_embed_dim,
            img_size=cfg.img_size,
            mlp_ratio=cfg.encoder_mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=cfg.encoder_num_heads,
            patch_size=cfg.patch_size,
            qkv_bias=True,
            use_rel_pos=cfg.use_rel_pos,
            global_attn_indexes=tuple(cfg.encoder_global_attn_indexes),
            window_size=cfg.window_size,
            out_chans=cfg.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(cfg.img_size, cfg.img_size),
            mask_in_chans=cfg.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=cfg.decoder_depth,
                embedding_dim=cfg.prompt_embed_dim,
                mlp_dim=cfg.decoder_mlp_dim,
                num_heads=cfg.decoder_num_heads,
            ),
            transformer_dim=cfg.prompt_embed_dim,
            iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        ),
        pixel_mean=list(cfg.pixel_mean),
        pixel_std=list(cfg.pixel_std),
    )
    # The random Fourier frequencies of point and image positions are a state-dict buffer, so a
    # finer scale than SAM's 1.0 (for small objects on a coarse grid) needs no code to load.
    sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.mul_(cfg.pe_scale)
    sam.eval()
    return sam


def sidecar_path(checkpoint: str | os.PathLike) -> Path:
    """The json holding the `SamConfig` of a custom checkpoint: ``<checkpoint stem>.json``."""
    return Path(checkpoint).with_suffix(".json")


def save_sam(model: Sam, cfg: SamConfig, path: str | os.PathLike) -> Path:
    """Write ``model.state_dict()`` to ``path`` and its config to the sidecar, each atomically."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda f: torch.save(state, f))
    meta = asdict(cfg) | {"checkpoint": None}
    write_json(sidecar_path(path), meta)
    return path


def _read_sidecar(checkpoint: Path) -> SamConfig:
    side = sidecar_path(checkpoint)
    if not side.is_file():
        raise ConfigError(
            f"{side} is missing: a custom SAM checkpoint needs the config json written beside it "
            "by `svp train-sam`; for an official checkpoint pass model_type vit_b, vit_l or vit_h"
        )
    try:
        raw = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{side} is not a readable SAM config json ({e})") from e
    known = {f.name for f in fields(SamConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{side} has unknown SamConfig keys {unknown}; rerun `svp train-sam`")
    cfg = SamConfig(**raw)
    if cfg.model_type != "custom":
        raise ConfigError(f"{side} has model_type={cfg.model_type!r}; expected 'custom'")
    return cfg


def _fit_state_dict(model: Sam, state: dict, checkpoint: Path, model_type: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        parts = [
            f"{name} ({len(keys)}): {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"
            for name, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", shapes),
            )
            if keys
        ]
        raise ConfigError(
            f"{checkpoint} does not fit a SAM of model_type={model_type!r}: {'; '.join(parts)}. "
            "Check the model type, or retrain it with `svp train-sam`"
        )
    model.to_empty(device="cpu")
    model.load_state_dict(state, strict=True)


@contextmanager
def random_weights_allowed() -> Iterator[None]:
    """Inside, `load_sam` takes the checkpoint ``"random"``: for measuring, never for training."""
    token = _random_allowed.set(True)
    try:
        yield
    finally:
        _random_allowed.reset(token)


def _random_sam(model_type: str) -> Sam:
    if not _random_allowed.get():
        raise ConfigError(
            f"SAM checkpoint {RANDOM_WEIGHTS!r} means random weights, which only `svp bench` "
            "takes (it measures time and memory, not masks); point the checkpoint key at a "
            "trained SAM (`svp train-sam`, or a downloaded sam_vit_*.pth)"
        )
    if model_type == "custom":
        raise ConfigError(
            f"SAM checkpoint {RANDOM_WEIGHTS!r} needs an official model_type (vit_b, vit_l or "
            "vit_h): a custom SAM's sizes live in the sidecar json of its checkpoint"
        )
    warnings.warn(
        f"SAM {model_type} with random weights (checkpoint {RANDOM_WEIGHTS!r}): its masks mean "
        "nothing; it serves to measure time and memory",
        stacklevel=3,
    )
    return build_sam(SamConfig(model_type=model_type))


def load_sam(checkpoint: str | os.PathLike, model_type: str = "custom") -> Sam:
    """Load a SAM-format checkpoint; ``custom`` rebuilds the architecture from its sidecar json.

    The model is built on the meta device and filled from the file, skipping the random init
    (seconds for ViT-H on CPU). ``"random"``: see the module docstring.
    """
    path = Path(checkpoint)
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"SAM model_type={model_type!r} is unknown; use one of {', '.join(MODEL_TYPES)}"
        )
    if str(checkpoint) == RANDOM_WEIGHTS:
        return _random_sam(model_type)
    if not path.is_file():
        raise ConfigError(
            f"SAM checkpoint {path} does not exist; train a small one with `svp train-sam` "
            "or point the checkpoint key at a downloaded sam_vit_*.pth"
        )
    cfg = _read_sidecar(path) if model_type == "custom" else SamConfig(model_type=model_type)
    with torch.device("meta"):
        model = build_sam(cfg)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"{path} is not a readable torch state dict ({e})") from e
    if not isinstance(state, dict):
        raise ConfigError(f"{path} holds a {type(state).__name__}, not a SAM state dict")
    _fit_state_dict(model, state, path, model_type)
    model.pixel_mean.copy_(torch.tensor(cfg.pixel_mean).view(-1, 1, 1))
    model.pixel_std.copy_(torch.tensor(cfg.pixel_std).view(-1, 1, 1))
    return model


def sam_from_config(cfg: SamConfig) -> Sam:
    """``load_sam(cfg.checkpoint, cfg.model_type)`` when a checkpoint is set, else `build_sam`."""
    if cfg.checkpoint:
        return load_sam(cfg.checkpoint, cfg.model_type)
    return build_sam(cfg)


def encoder_depth_layer(encoder: ImageEncoderViT, layer: int, key: str = "layer") -> int:
    """`layer` in SAM-encoder state numbering — 0 = patch embedding (+ position), 1..depth = block
    outputs, depth + 1 (or −1) = neck — as a non-negative index; a ConfigError naming the config
    entry `key` if out of range."""
    depth = len(encoder.blocks)
    if not -depth - 2 <= layer <= depth + 1:
        raise ConfigError(
            f"{key}={layer} is outside -{depth + 2}..{depth + 1} for a SAM encoder with {depth} "
            "blocks (0 = patch embedding, 1..depth = blocks, -1 = neck output)"
        )
    return layer % (depth + 2)


def encoder_states(
    encoder: ImageEncoderViT, pixels: torch.Tensor, layer: int, neck: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One pass of SAM's image encoder: (the neck output, or None without `neck`; the state at
    `layer` as B×C×h×w). Without `neck` the pass stops at `layer`. Same arithmetic as
    `ImageEncoderViT.forward`."""
    depth = len(encoder.blocks)
    layer = encoder_depth_layer(encoder, layer)
    neck = neck or layer == depth + 1
    x = encoder.patch_embed(pixels)
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    kept = x if layer == 0 else None
    for i, block in enumerate(encoder.blocks[: depth if neck else layer], start=1):
        x = block(x)
        if i == layer:
            kept = x
    out = encoder.neck(x.permute(0, 3, 1, 2)) if neck else None
    return out, (out if layer == depth + 1 else kept.permute(0, 3, 1, 2))


def encoder_state_channels(encoder: ImageEncoderViT, layer: int, key: str = "layer") -> int:
    """Channels of the encoder state at `layer` (numbered as in `encoder_states`); out of range is
    a ConfigError naming `key`."""
    if encoder_depth_layer(encoder, layer, key) == len(encoder.blocks) + 1:
        return encoder.neck[0].out_channels
    return encoder.patch_embed.proj.out_channels
