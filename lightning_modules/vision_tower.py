"""Vision towers (CLIP, DINOv2, SAM's image encoder) that turn images into patch feature maps.

A tower returns one layer's patch tokens as a B×C×h×w map (class and register tokens dropped), the
input every projector takes.
"""

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from torch import nn
from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersModel,
)

from common import llava
from common.errors import ConfigError
from common.files import file_key
from common.sam import encoder_state_channels, encoder_states, load_sam

TOWER_NAMES = ("clip", "dinov2", "sam_encoder")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAM_EMBED_DIM = 256
TINY_IMAGE_SIZE = 128


@dataclass
class VisionTowerConfig:
    """Which tower, where its weights are, and the tiny random-init size used when ``path`` is None.

    ``path`` is a ``save_pretrained`` folder for clip/dinov2 (a CLIPVisionModel, a whole
    CLIPModel or a LLaVA-1.5 model; Dinov2Model or Dinov2WithRegistersModel) and a SAM ``.pth``
    checkpoint for sam_encoder. With a path, the patch size and widths are the checkpoint's, and
    so is the input size unless ``image_size`` sets another (CLIP then interpolates its position
    embeddings).
    ``feature_layer`` indexes the hidden states (0 = embeddings, -1 = last layer; LLaVA takes -2;
    SAM: 0 = patch embedding, 1..depth = blocks, -1 = neck).
    """

    name: str = "clip"
    path: str | None = None
    sam_model_type: str = "custom"
    image_size: int | None = None  # None: the checkpoint's own, 128 for a tiny random tower
    patch_size: int = 16
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    intermediate_size: int = 128
    init_seed: int = 0
    feature_layer: int = -2
    frozen: bool = True


def _weights_key(path: str | None) -> str | None:
    """`file_key` of the weight files, so replaced weights change the hash."""
    if path is None:
        return None
    p = Path(path)
    files = (
        sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p, p.with_suffix(".json")]
    )
    return file_key(*(f for f in files if f.is_file()))


def _check_path(cfg: VisionTowerConfig, want_dir: bool) -> None:
    p = Path(cfg.path)
    ok = p.is_dir() if want_dir else p.is_file()
    if not ok:
        kind = "a save_pretrained folder" if want_dir else "a SAM checkpoint file"
        raise ConfigError(
            f"vision.path={cfg.path!r} is not {kind} for vision.name={cfg.name!r}; "
            "point it at local weights or set it to null for a tiny random-init tower"
        )


def _tiny_hf_config(cfg: VisionTowerConfig):
    sizes = dict(
        image_size=cfg.image_size or TINY_IMAGE_SIZE,
        patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
    )
    if cfg.name == "clip":
        return CLIPVisionConfig(intermediate_size=cfg.intermediate_size, **sizes)
    if cfg.intermediate_size % cfg.hidden_size:
        raise ConfigError(
            f"vision.intermediate_size={cfg.intermediate_size} must be a multiple of "
            f"vision.hidden_size={cfg.hidden_size} for DINOv2 (its MLP ratio is an integer)"
        )
    return Dinov2Config(mlp_ratio=cfg.intermediate_size // cfg.hidden_size, **sizes)


def _load_hf(cfg: VisionTowerConfig) -> nn.Module:
    _check_path(cfg, want_dir=True)
    if llava.is_llava(cfg.path):
        if cfg.name != "clip":
            raise ConfigError(
                f"vision.path={cfg.path!r} is a LLaVA checkpoint, whose tower is CLIP; "
                "set vision.name=clip"
            )
        return llava.vision_tower(cfg.path)
    if cfg.name == "clip":
        return CLIPVisionModel.from_pretrained(cfg.path, local_files_only=True)
    model_type = AutoConfig.from_pretrained(cfg.path, local_files_only=True).model_type
    if model_type == "dinov2_with_registers":
        return Dinov2WithRegistersModel.from_pretrained(cfg.path, local_files_only=True)
    if model_type != "dinov2":
        raise ConfigError(
            f"vision.path={cfg.path!r} holds a {model_type!r} model, not DINOv2; "
            "fix vision.path or vision.name"
        )
    return Dinov2Model.from_pretrained(cfg.path, local_files_only=True)


def _tiny_sam_encoder(cfg: VisionTowerConfig) -> ImageEncoderViT:
    return ImageEncoderViT(
        img_size=cfg.image_size or TINY_IMAGE_SIZE,
        patch_size=cfg.patch_size,
        embed_dim=cfg.hidden_size,
        depth=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        mlp_ratio=cfg.intermediate_size / cfg.hidden_size,
        out_chans=SAM_EMBED_DIM,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
    )


class VisionTower(nn.Module):
    """``forward(pixel_values B×3×S×S) -> B×C×h×w`` patch features of one layer."""

    def __init__(self, cfg: VisionTowerConfig):
        super().__init__()
        if cfg.name not in TOWER_NAMES:
            raise ConfigError(
                f"vision.name={cfg.name!r} is unknown; use one of {', '.join(TOWER_NAMES)}"
            )
        self.cfg = cfg
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            if cfg.name == "sam_encoder":
                self.model, mean, std = self._build_sam(cfg)
            elif cfg.path:
                self.model = _load_hf(cfg)
            else:
                model_cls = CLIPVisionModel if cfg.name == "clip" else Dinov2Model
                self.model = model_cls(_tiny_hf_config(cfg))
        if cfg.name == "clip":
            mean, std = CLIP_MEAN, CLIP_STD
        self._setup_geometry()
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        if cfg.frozen:
            self.model.requires_grad_(False)
        self.train()

    @staticmethod
    def _build_sam(cfg: VisionTowerConfig):
        if not cfg.path:
            return _tiny_sam_encoder(cfg), IMAGENET_MEAN, IMAGENET_STD
        _check_path(cfg, want_dir=False)
        sam = load_sam(cfg.path, cfg.sam_model_type)
        mean = tuple((sam.pixel_mean.flatten() / 255).tolist())
        std = tuple((sam.pixel_std.flatten() / 255).tolist())
        return sam.image_encoder, mean, std

    def _setup_geometry(self) -> None:
        cfg = self.cfg
        if cfg.name == "sam_encoder":
            patch = self.model.patch_embed.proj.kernel_size[0]
            self.out_channels = encoder_state_channels(
                self.model, cfg.feature_layer, "vision.feature_layer"
            )
            size = cfg.image_size or self.model.img_size
            if self.model.img_size != size:
                raise ConfigError(
                    f"vision.image_size={cfg.image_size} but the SAM encoder in "
                    f"{cfg.path} takes {self.model.img_size}; leave vision.image_size unset (null)"
                )
            self._num_prefix = 0
        else:
            hf = self.model.config
            size = cfg.image_size or hf.image_size
            patch = hf.patch_size
            self.out_channels = hf.hidden_size
            self._num_prefix = 1 + getattr(hf, "num_register_tokens", 0)
            layers = hf.num_hidden_layers
            if not -layers - 1 <= cfg.feature_layer <= layers:
                raise ConfigError(
                    f"vision.feature_layer={cfg.feature_layer} is outside "
                    f"-{layers + 1}..{layers} for a {layers}-layer tower"
                )
        if size % patch:
            raise ConfigError(
                f"vision.image_size={size} is not a multiple of the tower's patch size {patch}"
            )
        side = size // patch
        self.grid_size = (side, side)
        self.image_size = size

    def train(self, mode: bool = True) -> "VisionTower":
        """Switch mode; a frozen tower's weights stay in eval mode (no dropout, fixed features)."""
        super().train(mode)
        if self.cfg.frozen:
            self.model.eval()
        return self

    def config_hash(self) -> str:
        """Stable hash of the config and the weight files' identity (name, size, mtime)."""
        key = {"config": asdict(self.cfg), "weights": _weights_key(self.cfg.path)}
        blob = json.dumps(key, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def preprocess(self, images: torch.Tensor | Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 H×W×3 images (a B×H×W×3 tensor or a list) -> normalised B×3×S×S pixel values.

        The whole image is resized to S×S (no crop), so every pixel of the mask is seen.
        """
        out = []
        for image in images:
            x = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image))
            x = x.permute(2, 0, 1)[None].float() / 255.0
            size = (self.image_size, self.image_size)
            out.append(F.interpolate(x, size=size, mode="bilinear", antialias=True))
        pixels = torch.cat(out).to(self.pixel_mean.device)
        return (pixels - self.pixel_mean) / self.pixel_std

    def _sam_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """SAM encoder state at `feature_layer` (0 = patch embedding (+ position), 1..depth = block
        outputs, depth + 1 (or -1) = neck), computed no further than needed."""
        return encoder_states(self.model, pixel_values, self.cfg.feature_layer, neck=False)[1]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.frozen):
            if self.cfg.name == "sam_encoder":
                return self._sam_features(pixel_values)
            kwargs = {"output_hidden_states": True}
            if self.cfg.name == "clip":
                kwargs["interpolate_pos_encoding"] = self.image_size != self.model.config.image_size
            out = self.model(pixel_values=pixel_values, **kwargs)
            tokens = out.hidden_states[self.cfg.feature_layer][:, self._num_prefix :]
            h, w = self.grid_size
            return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


def build_vision_tower(cfg: VisionTowerConfig) -> VisionTower:
    """The tower named by ``cfg.name``: local weights when ``cfg.path`` is set, else tiny."""
    return VisionTower(cfg)
