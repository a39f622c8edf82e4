"""Config composition: groups, presets, dotted overrides, clear errors, saved-config round trip."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from datamodules.errors import ConfigError
from lightning_modules.config import GROUP_NAMES, load_config, load_saved_config
from lightning_modules.config_compose import group_choices, save_config
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


def test_grounding_recipe_group_overrides_the_model_and_yields_to_the_command_line(tmp_path):
    """`grounding=patch` merges configs/grounding/patch.yaml over the model's grounding node;
    dotted overrides still win; a saved run keeps its recipe and can switch it."""
    preset = load_config(["projector=mlp"])  # the tiny preset's recipe: the re-ranker
    assert preset.groups["grounding"] == "patch_rerank" and preset.grounding.rerank == 8
    assert preset.grounding.rerank_context == 2 and preset.grounding.rerank_spread == 0.1
    plain = load_config(["projector=mlp", "grounding=default"])
    assert plain.grounding.pointer_vote == 0 and plain.grounding.rerank == 0
    patch = load_config(["projector=mlp", "grounding=patch"])
    assert patch.grounding.rerank == 0  # a recipe replaces the preset's recipe
    assert patch.grounding.pointer_vote == 4 and patch.groups["grounding"] == "patch"
    assert patch.grounding.keys_from == plain.grounding.keys_from  # the model's settings stay
    louder = load_config(["projector=mlp", "grounding=patch", "grounding.pointer_vote=2"])
    assert louder.grounding.pointer_vote == 2  # the command line beats the recipe
    path = save_config(patch, tmp_path / "config.yaml")
    assert load_saved_config(path).grounding.pointer_vote == 4
    back = load_saved_config(path, ["grounding=default"])
    assert back.grounding.pointer_vote == 0 and back.groups["grounding"] == "default"


def test_a_new_grounding_recipe_keeps_the_saved_runs_own_grounding_settings(tmp_path):
    """A run trained with `grounding.rerank=4` has re-ranker weights: evaluating it with
    `grounding=patch` adds the recipe's vote and keeps the re-ranker (and back again), while a new
    projector still replaces the saved projector node whole."""
    run = load_config(
        [
            "projector=mlp",
            "grounding=default",
            "grounding.rerank=4",
            "grounding.rerank_from=features",
        ]
    )
    path = save_config(run, tmp_path / "config.yaml")
    voted = load_saved_config(path, ["grounding=patch"])
    assert voted.grounding.pointer_vote == 4 and voted.groups["grounding"] == "patch"
    assert voted.grounding.rerank == 4 and voted.grounding.rerank_from == "features"
    back = load_saved_config(save_config(voted, tmp_path / "voted.yaml"), ["grounding=default"])
    assert back.grounding.pointer_vote == 0 and back.grounding.rerank == 4
    # a setting the new recipe sets and the run also set on its own: the run's value stays
    own = load_config(["projector=mlp", "grounding=default", "grounding.pointer_vote=2"])
    kept = load_saved_config(save_config(own, tmp_path / "own.yaml"), ["grounding=patch"])
    assert kept.grounding.pointer_vote == 2
    pool = load_saved_config(path, ["projector=pool"])
    assert pool.projector.name == "pool" and pool.grounding.rerank == 4


def test_a_saved_run_takes_schema_defaults_for_options_newer_than_it(tmp_path):
    """A run saved before an option existed was trained without it: reloading it gives that
    option its schema default (off), not what today's preset or recipe sets — the tiny preset's
    recipe now sets `grounding.rerank_context: 2`, which a session-13 run's weights lack. Options
    the file does hold keep their saved values; a new group choice still brings its own values."""
    cfg = load_config(["projector=semantic", "projector.sspe_frequencies=3"])
    assert cfg.grounding.rerank_context == 2 and cfg.grounding.rerank_spread == 0.1
    saved = OmegaConf.to_container(cfg, resolve=True)
    del saved["grounding"]["rerank_context"], saved["grounding"]["rerank_spread"]
    del saved["projector"]["shape_size"]  # filled from the projector's own schema
    saved["projector"]["max_tokens"] = 32
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(saved)))
    old = load_saved_config(path)
    assert old.grounding.rerank_context == 0 and old.grounding.rerank_spread == 0.0
    assert old.grounding.rerank == 8 and old.groups["grounding"] == "patch_rerank"
    assert old.projector.shape_size == 4 and old.projector.max_tokens == 32
    assert old.projector.sspe_frequencies == 3
    # the command line still wins, and a newly chosen group comes with its own values
    assert load_saved_config(path, ["grounding.rerank_context=1"]).grounding.rerank_context == 1
    pool = load_saved_config(path, ["projector=pool"])
    assert pool.projector.name == "pool" and pool.grounding.rerank_context == 0
