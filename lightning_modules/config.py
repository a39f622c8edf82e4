"""The root run config: one schema assembled from every component's own dataclass.

Groups (folders under `configs/`): `preset`, `data`, `model`, `trainer`, `superpixels`, `projector`.
`projector` and `superpixels` are polymorphic: the chosen component's `Config` is the node schema.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from datamodules.augment import FlipConfig
from datamodules.errors import ConfigError
from lightning_modules.config_compose import (
    CONFIG_ROOT,
    GroupSpec,
    compose,
    load_yaml,
    merge_into,
    split_overrides,
)


@dataclass
class DataConfig:
    root: str = "data"
    dataset: str = "synthref"
    split_by: str = "unc"
    train_split: str = "train"
    eval_splits: list[str] = field(default_factory=lambda: ["val", "testA", "testB"])
    batch_size: int = 16
    eval_batch_size: int = 32
    num_workers: int = 0
    label_size: int = 64
    limit_train_sentences: int | None = None
    limit_val_sentences: int | None = None  # per eval split, validation during fit only
    limit_test_sentences: int | None = None  # per eval split, final test
    prompt: str = "<image> What is {sentence} in this image? Please output segmentation mask."
    answer: str = "Sure, [SEG]."
    # training-time flips (probabilities); spatial words in the sentence are swapped with them
    augment: FlipConfig = field(default_factory=FlipConfig)


@dataclass
class MaskDecoderConfig:
    checkpoint: str = "runs/sam/sam_small.pth"
    model_type: str = "custom"
    train_decoder: bool = True
    seg_mlp_hidden: int = 256


@dataclass
class LossConfig:
    ce_weight: float = 1.0
    bce_weight: float = 2.0
    dice_weight: float = 0.5


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    scheduler: str = "cosine"
    grad_clip: float = 1.0


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    max_epochs: int = 8
    max_steps: int = -1
    max_minutes: float | None = None
    val_every_n_epochs: int = 1
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    log_every_n_steps: int = 10
    fast_dev_run: bool = False
    num_image_samples: int = 8
    enable_progress_bar: bool = True
    deterministic: bool = False
    # torch CPU threads (null: torch's default); CPU runs reproduce bit for bit at the same count
    threads: int | None = None


@dataclass
class CacheConfig:
    root: str = "${runs_root}/cache"
    shard_size: int = 64
    features: bool = True


def _component_configs() -> dict[str, type]:
    from datamodules.synthetic import SynthConfig
    from lightning_modules.grounding import GroundingConfig
    from lightning_modules.llm import LLMConfig
    from lightning_modules.sam_training import TrainSamConfig
    from lightning_modules.vision_tower import VisionTowerConfig
    from sweeps.study import SweepConfig

    return {
        "synth": SynthConfig,
        "vision": VisionTowerConfig,
        "llm": LLMConfig,
        "train_sam": TrainSamConfig,
        "sweep": SweepConfig,
        "grounding": GroundingConfig,
    }


def _make_run_schema() -> type:
    comps = _component_configs()
    fields = [
        ("name", str, field(default="run")),
        ("seed", int, field(default=0)),
        ("runs_root", str, field(default="runs")),
        ("run_dir", str | None, field(default=None)),
        ("ckpt_path", str | None, field(default=None)),
        ("groups", dict[str, str], field(default_factory=dict)),
        ("synth", comps["synth"], field(default_factory=comps["synth"])),
        # the small SAM's own image pool (`svp train-sam` generates it when train_sam.root points
        # at it and it is missing); the tiny preset gives it 3× SynthRef's training images
        ("sam_synth", comps["synth"], field(default_factory=comps["synth"])),
        ("data", DataConfig, field(default_factory=DataConfig)),
        ("cache", CacheConfig, field(default_factory=CacheConfig)),
        ("superpixels", Any, field(default=None)),
        ("vision", comps["vision"], field(default_factory=comps["vision"])),
        ("projector", Any, field(default=None)),
        ("llm", comps["llm"], field(default_factory=comps["llm"])),
        ("mask_decoder", MaskDecoderConfig, field(default_factory=MaskDecoderConfig)),
        ("grounding", comps["grounding"], field(default_factory=comps["grounding"])),
        ("loss", LossConfig, field(default_factory=LossConfig)),
        ("optim", OptimConfig, field(default_factory=OptimConfig)),
        ("trainer", TrainerConfig, field(default_factory=TrainerConfig)),
        ("train_sam", comps["train_sam"], field(default_factory=comps["train_sam"])),
        ("sweep", comps["sweep"], field(default_factory=comps["sweep"])),
    ]
    return dataclasses.make_dataclass("RunConfig", fields)


def _projector_schema(name: str) -> type:
    from lightning_modules.projectors import PROJECTORS

    return PROJECTORS[name].Config


def _source_schema(name: str) -> type:
    from datamodules.superpixels import SOURCES

    return SOURCES[name].Config


GROUPS = (
    GroupSpec("preset", "tiny"),
    GroupSpec("data", "synthref"),
    GroupSpec("model", "tiny", target=""),
    # grounding-head recipes on top of the model's (`grounding=patch` for grid-patch tokens)
    GroupSpec("grounding", "default", overlay=True),
    GroupSpec("trainer", "cpu"),
    GroupSpec("superpixels", "sam", schemas=_source_schema),
    GroupSpec("projector", "semantic", schemas=_projector_schema),
)
GROUP_NAMES = tuple(g.name for g in GROUPS)


def load_config(overrides: list[str] | tuple[str, ...] = (), config_root: Path = CONFIG_ROOT):
    """The resolved run config for `overrides` (group selections and dotted `key=value`)."""
    return compose(_make_run_schema(), GROUPS, list(overrides), config_root)


def load_saved_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Rebuild a run's config from its saved `config.yaml` (plus optional new overrides)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass the config.yaml of a run.")
    return rebase_config(load_yaml(path), overrides, str(path))


def rebase_config(
    saved: dict, overrides: list[str] | tuple[str, ...] = (), where: str = "saved config"
) -> DictConfig:
    """`saved` (a resolved config as a dict) with `overrides` applied on top.

    A group selection in `overrides` (e.g. `projector=pool`) replaces that group's saved node with
    the new choice's defaults — except for an overlay group (`grounding=patch`), whose new recipe
    replaces the old recipe's values only: the saved run's own settings of that node (those that
    differ from what its groups alone give, e.g. `grounding.rerank=4`) stay, as its weights need
    them. Dotted overrides are merged last.
    """
    saved = dict(saved)
    choices, values = split_overrides(list(overrides), GROUP_NAMES)
    saved_groups = {k: v for k, v in (saved.pop("groups", None) or {}).items() if k in GROUP_NAMES}
    groups = {**saved_groups, **choices}
    cfg = load_config([f"{k}={v}" for k, v in groups.items()])
    # options newer than the run (absent from its file) take their schema default — the run was
    # trained without them — not what today's preset or recipe sets (a run saved before
    # `grounding.rerank_context` existed must not grow encoder layers its weights lack)
    kept = {k: v for k, v in resolved_dict(cfg).items() if k not in choices and k != "groups"}
    newer = _missing(kept, saved, _schema_defaults(groups))
    overlays = {g.name for g in GROUPS if g.overlay}
    for group in choices:  # a newly chosen group replaces the saved node of that group
        node = saved.pop(group, None)
        if group in overlays and isinstance(node, dict) and group in saved_groups:
            built = load_config([f"{k}={v}" for k, v in saved_groups.items()])
            saved[group] = _changed(node, resolved_dict(built)[group])
    merge_into(cfg, newer, f"{where} (schema defaults of options it predates)")
    merge_into(cfg, saved, where)
    merge_into(cfg, OmegaConf.from_dotlist(values), "command line")
    return cfg


def _schema_defaults(groups: dict) -> dict:
    """Every option's schema default (the dataclasses', before any YAML), the projector's and
    the superpixel source's by the chosen names in `groups`."""

    def plain(schema: type) -> dict:
        return OmegaConf.to_container(OmegaConf.structured(schema), resolve=False)

    out = plain(_make_run_schema())
    for group, schema in (("projector", _projector_schema), ("superpixels", _source_schema)):
        try:
            out[group] = plain(schema(groups[group]))
        except KeyError:  # no such choice saved: nothing to fill in
            out.pop(group, None)
    return out


def _missing(built: dict, saved: dict, defaults: dict) -> dict:
    """The schema defaults (from `defaults`) of the keys of `built` that `saved` lacks, nested
    mappings key by key; keys without a schema default are left out."""
    out = {}
    for key, value in built.items():
        if key not in defaults:
            continue
        if key not in saved:
            out[key] = defaults[key]
        elif isinstance(value, dict) and isinstance(saved[key], dict):
            if isinstance(defaults[key], dict):
                sub = _missing(value, saved[key], defaults[key])
                if sub:
                    out[key] = sub
    return out


def _changed(values: dict, base: dict) -> dict:
    """The entries of `values` that differ from `base` (nested mappings compared key by key)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            sub = _changed(value, base[key])
            if sub:
                out[key] = sub
        elif key not in base or base[key] != value:
            out[key] = value
    return out


def resolved_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
