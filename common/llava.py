"""LLaVA-1.5 checkpoints in the transformers format (`LlavaForConditionalGeneration`): one folder
that holds the LLM, the CLIP vision tower and the trained `mlp2x_gelu` projector.

`llm.path`, `vision.path` (and, through `llm.path`, the `mlp` projector) may each name such a
folder; the checkpoint is read once per process, and each stage takes its own part of it.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, CLIPVisionModel, PreTrainedModel

from common.errors import ConfigError


def is_llava(path: str | Path | None) -> bool:
    """True when `path` is a folder whose `config.json` says `model_type: llava`."""
    config = Path(path) / "config.json" if path else None
    if config is None or not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "llava"
    except (OSError, ValueError) as err:
        raise ConfigError(f"{config} is not a readable JSON config ({err}); fix the file") from err


@lru_cache(maxsize=1)
def _load(path: str) -> nn.Module:
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True, dtype="auto")
    if model.config.vision_config.model_type != "clip_vision_model":
        raise ConfigError(
            f"{path} is a LLaVA with a {model.config.vision_config.model_type!r} vision tower; "
            "the suite reads LLaVA-1.5 (CLIP) checkpoints"
        )
    return model


def forget() -> None:
    """Drop the checkpoint read last, once every stage has taken its part."""
    _load.cache_clear()


def language_model(path: str, dtype: torch.dtype | str) -> PreTrainedModel:
    """LLaVA's LLM and its lm_head as a plain causal LM (e.g. `LlamaForCausalLM`), weights shared
    with the checkpoint read (copied only to change their dtype)."""
    llava = _load(path)
    with torch.device("meta"):
        causal = AutoModelForCausalLM.from_config(llava.config.text_config)
    causal.model = llava.model.language_model
    causal.lm_head = llava.lm_head
    return causal if dtype == "auto" else causal.to(dtype)


def vision_tower(path: str) -> CLIPVisionModel:
    """LLaVA's CLIP vision tower in float32 (the suite computes frozen features in float32)."""
    return _load(path).model.vision_tower.float()


def projector_state(path: str) -> dict[str, torch.Tensor]:
    """The trained projector's weights, named as `two_layer_mlp`'s (`0.*` and `2.*`)."""
    llava = _load(path)
    if llava.config.projector_hidden_act != "gelu":
        raise ConfigError(
            f"{path}: its projector uses {llava.config.projector_hidden_act!r}, not LLaVA-1.5's "
            "GELU; set projector.from_llava=false to train the mlp from scratch"
        )
    proj = llava.model.multi_modal_projector
    return {
        f"{i}.{k}": v.detach().float()
        for i, layer in ((0, proj.linear_1), (2, proj.linear_2))
        for k, v in layer.state_dict().items()
    }
