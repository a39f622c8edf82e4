"""Config composition: groups, presets, dotted overrides, clear errors, saved-config round trip."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from common.errors import ConfigError
from lightning_modules.cli.compose import group_choices, save_config
from lightning_modules.cli.config import GROUP_NAMES, load_config, load_saved_config
from lightning_modules.projectors import PROJECTORS


def test_default_is_tiny_semantic_on_synthref():
    cfg = load_config()
    assert cfg.groups["preset"] == "tiny"
    assert cfg.projector.name == "semantic"
    assert cfg.superpixels.name == "sam"
    assert cfg.data.dataset == "synthref"
    assert cfg.vision.name == "sam_encoder"
    # interpolations follow the keys they point at
    cfg = load_config(["runs_root=/x"])
    assert cfg.mask_decoder.checkpoint == "/x/sam/sam_small.pth"
    assert cfg.superpixels.checkpoint == "/x/sam/sam_small.pth"


@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_every_projector_has_a_config_file_and_schema(name):
    cfg = load_config([f"projector={name}"])
    assert cfg.projector.name == name
    assert set(cfg.projector.keys()) == set(OmegaConf.structured(PROJECTORS[name].Config).keys())


def test_group_files_cover_registries():
    from datamodules.superpixels import SOURCES

    assert set(group_choices("projector")) == set(PROJECTORS)
    assert set(group_choices("superpixels")) == set(SOURCES)


def test_polymorphic_group_takes_its_own_schema():
    cfg = load_config(["projector=pool", "projector.k=3"])
    assert cfg.projector.k == 3 and isinstance(cfg.projector.k, int)
    with pytest.raises(ConfigError, match=r"projector\.max_tokens.*Allowed keys under 'projector'"):
        load_config(["projector=pool", "projector.max_tokens=3"])


def test_unknown_key_names_full_dotted_key_and_suggests():
    with pytest.raises(ConfigError) as err:
        load_config(["trainer.max_epoch=2"])
    msg = str(err.value)
    assert "trainer.max_epoch" in msg and "max_epochs" in msg and "Did you mean" in msg


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"trainer\.max_epochs"):
        load_config(["trainer.max_epochs=many"])
    with pytest.raises(ConfigError, match=r"projector\.use_sspe"):
        load_config(["projector=semantic", "projector.use_sspe=perhaps"])


def test_unknown_group_choice_lists_choices():
    with pytest.raises(ConfigError, match="unknown projector 'nope'.*mlp"):
        load_config(["projector=nope"])
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny"):
        load_config(["preset=huge"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(["trainer.max_epochs"])


def test_llava7b_preset_composes():
    cfg = load_config(["preset=llava7b"])
    assert cfg.llm.lora.enabled and cfg.llm.lora.r == 8 and cfg.llm.lora.alpha == 16
    assert list(cfg.llm.lora.target_modules) == ["q_proj", "v_proj"]
    assert cfg.mask_decoder.model_type == "vit_h"
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.data.dataset == "refcoco"
    # LISA's effective batch: 4 sentences × 5 accumulated batches × 8 GPUs
    assert cfg.data.batch_size * cfg.trainer.accumulate_grad_batches * 8 == 160


def test_saved_config_round_trip(tmp_path):
    cfg = load_config(["projector=tokenpacker", "projector.s=4", "seed=7", "optim.lr=0.01"])
    path = save_config(cfg, tmp_path / "config.yaml")
    again = load_saved_config(path)
    assert OmegaConf.to_container(again, resolve=True) == OmegaConf.to_container(cfg, resolve=True)
    changed = load_saved_config(path, ["seed=8", "projector=pool"])
    assert changed.seed == 8 and changed.projector.name == "pool"
    assert changed.optim.lr == 0.01


def test_groups_are_recorded():
    cfg = load_config(["projector=ldpv2", "superpixels=slic"])
    assert set(cfg.groups) == set(GROUP_NAMES)
    assert cfg.groups["projector"] == "ldpv2" and cfg.groups["superpixels"] == "slic"


def test_tiny_preset_recipe_and_llava7b_keeps_lisas_path():
    """The tiny preset turns the pointer on with the re-ranker of the schema defaults;
    `preset=llava7b` keeps LISA's plain [SEG] path."""
    tiny = load_config(["projector=mlp"])
    assert tiny.grounding.weight == 1.0 and tiny.grounding.pointer
    assert tiny.grounding.rerank == 8 and tiny.grounding.rerank_spread == 0.1
    assert tiny.grounding.rerank_context == 2
    real = load_config(["preset=llava7b"])
    assert real.grounding.weight == 0.0 and not real.grounding.pointer


def test_saved_run_with_removed_options_is_a_clear_error(tmp_path):
    """A config.yaml holding an option the suite no longer has names the key."""
    saved = OmegaConf.to_container(load_config(), resolve=True)
    saved["grounding"]["pointer_vote"] = 4
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(saved)))
    with pytest.raises(ConfigError, match=r"grounding\.pointer_vote"):
        load_saved_config(path)
