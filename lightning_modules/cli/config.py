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

from common.errors import ConfigError
from lightning_modules.cli.compose import (
    CONFIG_ROOT,
    GroupSpec,
    check_not_a_node,
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
    # training drawn from several data sets by sample rates, as LISA: {refcoco: 1, refcoco+: 1,
    # refcocog: 1} (datamodules/mix.py); null trains on `dataset` alone. Evaluation stays on
    # `dataset`. Typed Any: a Dict[str, float] node would refuse new keys from the command line
    mix: Any = None
    batch_size: int = 16
    eval_batch_size: int = 32
    num_workers: int = 0
    label_size: int = 64
    limit_train_sentences: int | None = None
    limit_val_sentences: int | None = None  # per eval split, validation during fit only
    limit_test_sentences: int | None = None  # per eval split, final test
    prompt: str = "<image> What is {sentence} in this image? Please output segmentation mask."
    answer: str = "Sure, [SEG]."


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
    warmup_steps: int = 50  # linear warm-up (at most a tenth of the run), then cosine to 5 %
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
    # optimizer steps every N batches (the effective batch: data.batch_size × N × processes)
    accumulate_grad_batches: int = 1
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
    features: bool = True  # frozen features on disk under <root>/features
    memory_mb: int = 2048  # the RAM in front of them, per process (least recently used out)


def _component_configs() -> dict[str, type]:
    from datamodules.synthetic import SynthConfig
    from lightning_modules.alignment import AlignConfig
    from lightning_modules.grounding import GroundingConfig
    from lightning_modules.llm import LLMConfig
    from lightning_modules.sam_pretraining.training import TrainSamConfig
    from lightning_modules.vision_tower import VisionTowerConfig
    from sweeps.study import SweepConfig

    return {
        "synth": SynthConfig,
        "vision": VisionTowerConfig,
        "llm": LLMConfig,
        "train_sam": TrainSamConfig,
        "sweep": SweepConfig,
        "grounding": GroundingConfig,
        "align": AlignConfig,
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
        ("align", comps["align"], field(default_factory=comps["align"])),
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
    saved = load_yaml(path)
    if not saved:
        raise ConfigError(f"config file {path} is empty; pass the config.yaml of a run.")
    return rebase_config(saved, overrides, str(path))


def rebase_config(
    saved: dict, overrides: list[str] | tuple[str, ...] = (), where: str = "saved config"
) -> DictConfig:
    """`saved` (a resolved config as a dict) with `overrides` applied on top.

    A group selection in `overrides` (e.g. `projector=pool`) replaces that group's saved node with
    the new choice's defaults; dotted overrides are merged last.
    """
    saved = dict(saved)
    choices, values = split_overrides(list(overrides), GROUP_NAMES)
    saved_groups = {k: v for k, v in (saved.pop("groups", None) or {}).items() if k in GROUP_NAMES}
    cfg = load_config([f"{k}={v}" for k, v in {**saved_groups, **choices}.items()])
    for group in choices:
        saved.pop(group, None)
    merge_into(cfg, saved, where)
    check_not_a_node(cfg, values)
    merge_into(cfg, OmegaConf.from_dotlist(values), "command line")
    return cfg
