"""Stage 1, as LLaVA's: align the projector (and, offline, the tiny LLM) with the LLM on
image–text conversations, before RIS training (`svp align`, then `svp train align.checkpoint=…`).

`AlignModel` is the RIS model's first half (vision tower → projector → LLM), trained on the
answers' next-token loss. Its weights are saved under the same names `RISModel` gives them
(`projector.*`, `llm.*`), so `load_aligned` hands them over as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from common.errors import ConfigError
from common.files import load_torch_file
from lightning_modules.feature_cache import MEMORY, FrozenEncoder
from lightning_modules.llm import (
    build_llm,
    build_sequence,
    frozen_dtype,
    image_token_id,
    llm_precision,
    text_loss,
)
from lightning_modules.projectors import build_projector
from lightning_modules.schedules import warmup_cosine
from lightning_modules.vision_tower import build_vision_tower

ALIGNED_FILE = "aligned.pt"


@dataclass
class AlignConfig:
    """The alignment stage. Defaults follow LLaVA-1.5's stage 1 where they apply (one epoch,
    lr 1e-3, no weight decay, 3 % warm-up then cosine, LLM frozen); `svp train` starts from
    `checkpoint` when it is set."""

    # LLaVA-format conversations; SynthRef writes its own beside its annotations
    data: str = "${data.root}/${data.dataset}/conversations.json"
    image_folder: str | None = None  # null: the RIS data set's image folder
    train_llm: bool = False  # LLaVA's stage 1 trains the projector alone
    epochs: int = 1
    batch_size: int = 32  # per process (LLaVA: 256 over 8 GPUs)
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    limit_conversations: int | None = None
    val_conversations: int = 256  # the file's last ones, held out for a text-loss check
    out: str = "${runs_root}/align/${name}"
    # `svp train` starts from this `svp align` folder (null: no alignment)
    checkpoint: str | None = None


class AlignModel(pl.LightningModule):
    """Vision tower (frozen) → projector → LLM, trained on the answers' text loss."""

    def __init__(self, cfg: DictConfig, tokenizer, feature_key: str) -> None:
        super().__init__()
        self.save_hyperparameters({"cfg": OmegaConf.to_container(cfg, resolve=True)})
        self.cfg = cfg
        self.image_id = image_token_id(tokenizer)
        tower = build_vision_tower(OmegaConf.to_object(cfg.vision))
        llm = build_llm(OmegaConf.to_object(cfg.llm), tokenizer)
        hidden = llm.get_input_embeddings().embedding_dim
        self.tower = tower
        self.llm = llm
        self.projector = build_projector(cfg.projector, tower.out_channels, hidden)
        if not cfg.align.train_llm:
            llm.requires_grad_(False)
        self.llm_dtype = frozen_dtype(llm)
        cache = Path(cfg.cache.root) / "features" if cfg.cache.features else None
        MEMORY.limit_bytes = int(cfg.cache.memory_mb) * 1024**2
        self.tower_features = FrozenEncoder(
            tower, f"tower-{tower.config_hash()}-{feature_key}", tower.preprocess, disk_dir=cache
        )

    def forward(self, batch: dict) -> torch.Tensor:
        """The answers' next-token loss."""
        feats = self.tower_features(batch["images"], batch["image_ids"])
        proj = self.projector(feats, batch.get("labels"))
        seq = build_sequence(self.llm, proj.tokens, proj.mask, batch, self.image_id, None)
        with llm_precision(self.llm_dtype, seq.embeds.device):
            out = self.llm(inputs_embeds=seq.embeds, attention_mask=seq.attention_mask)
        return text_loss(out.logits, seq.labels)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        key = [self.cfg.seed, self.current_epoch, batch_idx]
        torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))
        loss = self(batch)
        self.log("align/train_ce", loss, batch_size=len(batch["images"]), prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss = self(batch)
        self.log("align/val_ce", loss, batch_size=len(batch["images"]), sync_dist=True)

    def configure_optimizers(self):
        a = self.cfg.align
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = max(1, round(a.warmup_ratio * total))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warm, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def aligned_state(self) -> dict:
        """What RIS training takes over: the projector, and the LLM when it trained here."""
        state = {"projector": self.projector.state_dict()}
        if self.cfg.align.train_llm:
            state["llm"] = self.llm.state_dict()
        return state


def load_aligned(model: torch.nn.Module, folder: str | Path, cfg: DictConfig) -> list[str]:
    """Copy an `svp align` folder's projector (and LLM) weights into `model` (a `RISModel`);
    returns the parts it loaded. ConfigError when the folder was aligned with another projector
    or LLM shape."""
    path = Path(folder) / ALIGNED_FILE
    if not path.is_file():
        raise ConfigError(
            f"align.checkpoint={str(folder)!r} holds no {ALIGNED_FILE}; point it at an "
            "`svp align` output folder (align.out), or run `svp align` first"
        )
    saved = load_torch_file(
        path,
        f"align.checkpoint={str(folder)!r}: {ALIGNED_FILE}",
        "run `svp align` again into that folder",
        weights_only=True,
    )
    if not isinstance(saved, dict) or "projector_name" not in saved:
        raise ConfigError(
            f"align.checkpoint={str(folder)!r}: {ALIGNED_FILE} is not an `svp align` output; "
            "run `svp align` again into that folder"
        )
    if saved["projector_name"] != cfg.projector.name:
        raise ConfigError(
            f"align.checkpoint={str(folder)!r} aligned projector={saved['projector_name']}, this "
            f"run trains projector={cfg.projector.name}; align with the same projector"
        )
    loaded = []
    for part in ("projector", "llm"):
        if part not in saved:
            continue
        try:
            getattr(model, part).load_state_dict(saved[part])
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise ConfigError(
                f"align.checkpoint={str(folder)!r}: its {part} does not fit this run's "
                f"({first}); align with the same projector and llm settings"
            ) from e
        loaded.append(part)
    return loaded
