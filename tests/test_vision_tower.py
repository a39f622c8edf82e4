import os

import numpy as np
import pytest
import torch

from common.errors import ConfigError
from common.sam import SamConfig, build_sam, save_sam
from lightning_modules.vision_tower import (
    TOWER_NAMES,
    VisionTowerConfig,
    build_vision_tower,
)


def pixels(n=2, size=128, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "name, channels", [("clip", 64), ("dinov2", 64), ("sam_encoder", 256)], ids=TOWER_NAMES
)
def test_tiny_towers_give_patch_feature_maps(name, channels):
    layer = -1 if name == "sam_encoder" else -2  # SAM: -1 is the neck output
    tower = build_vision_tower(VisionTowerConfig(name=name, feature_layer=layer))
    out = tower(pixels())
    assert out.shape == (2, channels, 8, 8)
    assert (tower.out_channels, tower.grid_size) == (channels, (8, 8))
    assert torch.isfinite(out).all()
    assert not any(p.requires_grad for p in tower.parameters())
    tower.train()
    assert not tower.model.training and not out.requires_grad


def test_trainable_tower_gets_gradients():
    tower = build_vision_tower(VisionTowerConfig(name="clip", frozen=False))
    tower.train()
    assert tower.model.training
    tower(pixels()).sum().backward()
    assert all(p.grad is not None for p in tower.model.embeddings.parameters())


@pytest.mark.parametrize("name", ["clip", "dinov2"])
def test_feature_layer_selects_a_different_layer(name):
    x = pixels()
    last = build_vision_tower(VisionTowerConfig(name=name, feature_layer=-1))(x)
    penultimate = build_vision_tower(VisionTowerConfig(name=name, feature_layer=-2))(x)
    again = build_vision_tower(VisionTowerConfig(name=name, feature_layer=-2))(x)
    assert torch.equal(penultimate, again)
    assert not torch.allclose(last, penultimate)
    with pytest.raises(ConfigError, match="vision.feature_layer"):
        build_vision_tower(VisionTowerConfig(name=name, feature_layer=5))


def test_preprocess_resizes_and_normalises():
    tower = build_vision_tower(VisionTowerConfig(name="dinov2"))
    mean_colour = np.round(np.array([0.485, 0.456, 0.406]) * 255).astype(np.uint8)
    images = [np.broadcast_to(mean_colour, (30, 50, 3)), np.zeros((64, 20, 3), np.uint8)]
    out = tower.preprocess(images)
    assert out.shape == (2, 3, 128, 128)
    assert out[0].abs().max() < 0.01
    batch = tower.preprocess(torch.from_numpy(np.stack([images[0]] * 2)))
    assert torch.allclose(batch[1], out[0])


@pytest.mark.parametrize("name", ["clip", "dinov2"])
def test_saved_hf_tower_loads_through_the_same_code(tmp_path, name):
    tiny = build_vision_tower(VisionTowerConfig(name=name))
    tiny.model.save_pretrained(tmp_path)
    loaded = build_vision_tower(VisionTowerConfig(name=name, path=str(tmp_path)))
    x = pixels()
    assert torch.allclose(tiny(x), loaded(x), atol=1e-6)
    assert loaded.grid_size == (8, 8) and loaded.config_hash() != tiny.config_hash()
    larger = build_vision_tower(VisionTowerConfig(name=name, path=str(tmp_path), image_size=160))
    assert larger(pixels(size=160)).shape == (2, 64, 10, 10)


def _clip_vision_config(**sizes):
    from transformers import CLIPVisionConfig

    # CLIP ViT-L/14-336's geometry (patch 14, 336 px) at tiny widths
    widths = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    return CLIPVisionConfig(image_size=336, patch_size=14, **{**widths, **sizes})


@pytest.mark.parametrize("folder", ["CLIPModel", "CLIPVisionModel"])
def test_real_clip_folders_give_their_own_geometry(tmp_path, folder):
    """A whole CLIPModel folder (as openai/clip-vit-large-patch14-336 ships) and a CLIPVisionModel
    folder load from `vision.path` alone: image size, patch size and width come from the
    checkpoint (336 px / patch 14 → a 24×24 grid)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionModel

    torch.manual_seed(0)
    if folder == "CLIPModel":
        text = CLIPTextConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=99,
            max_position_embeddings=16,
        )
        config = CLIPConfig(
            text_config=text.to_dict(),
            vision_config=_clip_vision_config().to_dict(),
            projection_dim=16,
        )
        model = CLIPModel(config)
        vision = model.vision_model
    else:
        model = vision = CLIPVisionModel(_clip_vision_config())
    model.save_pretrained(tmp_path)
    tower = build_vision_tower(VisionTowerConfig(name="clip", path=str(tmp_path)))
    assert tower.image_size == 336 and tower.grid_size == (24, 24) and tower.out_channels == 32
    x = pixels(1, size=336)
    expected = vision(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
    expected = expected.transpose(1, 2).reshape(1, 32, 24, 24)
    torch.testing.assert_close(tower(x), expected)


@pytest.mark.parametrize("registers", [0, 4])
def test_real_dinov2_folders_give_their_own_geometry(tmp_path, registers):
    """DINOv2 and DINOv2 with registers (patch 14, 518 px as released; tiny widths): geometry
    from the checkpoint, class and register tokens dropped."""
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    sizes = dict(
        image_size=518,
        patch_size=14,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
    )
    if registers:
        model = Dinov2WithRegistersModel(
            Dinov2WithRegistersConfig(num_register_tokens=registers, **sizes)
        )
    else:
        model = Dinov2Model(Dinov2Config(**sizes))
    model.save_pretrained(tmp_path)
    tower = build_vision_tower(VisionTowerConfig(name="dinov2", path=str(tmp_path)))
    assert tower.grid_size == (37, 37) and tower.out_channels == 32
    out = tower(pixels(1, size=518))
    assert out.shape == (1, 32, 37, 37) and torch.isfinite(out).all()
    smaller = build_vision_tower(
        VisionTowerConfig(name="dinov2", path=str(tmp_path), image_size=224)
    )
    assert smaller(pixels(1, size=224)).shape == (1, 32, 16, 16)


def test_sam_checkpoint_loads_its_image_encoder(tmp_path):
    sam_cfg = SamConfig(img_size=64, patch_size=8, encoder_depth=2, encoder_global_attn_indexes=[1])
    sam = build_sam(sam_cfg)
    ckpt = save_sam(sam, sam_cfg, tmp_path / "sam.pth")
    tower = build_vision_tower(
        VisionTowerConfig(name="sam_encoder", path=str(ckpt), feature_layer=-1)
    )
    x = pixels(size=64)
    assert torch.allclose(tower(x), sam.image_encoder(x), atol=1e-6)
    assert (tower.out_channels, tower.grid_size) == (sam_cfg.prompt_embed_dim, (8, 8))
    # earlier states: 0 = patch embedding, 1..depth = blocks (embed_dim channels)
    enc = sam.image_encoder
    blocks = build_vision_tower(
        VisionTowerConfig(name="sam_encoder", path=str(ckpt), image_size=64, feature_layer=1)
    )
    expected = enc.blocks[0](enc.patch_embed(x) + enc.pos_embed).permute(0, 3, 1, 2)
    assert torch.allclose(blocks(x), expected, atol=1e-6)
    assert blocks.out_channels == sam_cfg.encoder_embed_dim
    with pytest.raises(ConfigError, match="vision.image_size=128 .* takes 64"):
        build_vision_tower(VisionTowerConfig(name="sam_encoder", path=str(ckpt), image_size=128))


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="vision.name"):
        build_vision_tower(VisionTowerConfig(name="resnet"))
    with pytest.raises(ConfigError, match="vision.path"):
        build_vision_tower(VisionTowerConfig(name="clip", path=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="vision.path"):
        build_vision_tower(VisionTowerConfig(name="sam_encoder", path=str(tmp_path)))


def test_config_hash_is_stable_and_tracks_config_and_weights(tmp_path):
    cfg = VisionTowerConfig(name="clip")
    tower = build_vision_tower(cfg)
    assert tower.config_hash() == build_vision_tower(VisionTowerConfig(name="clip")).config_hash()
    other = build_vision_tower(VisionTowerConfig(name="clip", feature_layer=-1))
    assert other.config_hash() != tower.config_hash()
    tower.model.save_pretrained(tmp_path)
    loaded = build_vision_tower(VisionTowerConfig(name="clip", path=str(tmp_path)))
    before = loaded.config_hash()
    weights = next(tmp_path.glob("*.safetensors"))
    os.utime(weights, (0, weights.stat().st_mtime + 10))
    assert loaded.config_hash() != before
