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


def test_sam_checkpoint_loads_its_image_encoder(tmp_path):
    sam_cfg = SamConfig(img_size=64, patch_size=8, encoder_depth=2, encoder_global_attn_indexes=[1])
    sam = build_sam(sam_cfg)
    ckpt = save_sam(sam, sam_cfg, tmp_path / "sam.pth")
    tower = build_vision_tower(
        VisionTowerConfig(name="sam_encoder", path=str(ckpt), image_size=64, feature_layer=-1)
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
    with pytest.raises(ConfigError, match="vision.image_size=64"):
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
