"""`RISModel`: vision tower → projector → LLM ([SEG]) → grounding → SAM mask decoder."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from common import llava
from common.files import file_key
from common.sam import load_sam
from lightning_modules.feature_cache import MEMORY, FrozenEncoder
from lightning_modules.grounding import Grounding, GroundingConfig, picked_hits
from lightning_modules.llm import (
    build_llm,
    build_sequence,
    frozen_dtype,
    image_token_id,
    llm_precision,
    seg_state,
    seg_token_id,
    text_loss,
    tokenizer_for,
)
from lightning_modules.mask_decoder import SamDecoder, mask_losses
from lightning_modules.metrics import SplitMetrics
from lightning_modules.projectors import build_projector
from lightning_modules.schedules import warmup_cosine
from lightning_modules.vision_tower import build_vision_tower


class RISModel(pl.LightningModule):
    """LISA-style referring segmentation with a swappable visual projector.

    Each stage is built from its config node (`vision`, `projector`, `llm`, `grounding`,
    `mask_decoder`); `forward` runs them in that order.
    """

    def __init__(self, cfg: DictConfig | dict, tokenizer=None):
        super().__init__()
        cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
        self.save_hyperparameters({"cfg": OmegaConf.to_container(cfg, resolve=True)})
        self.cfg = cfg
        self.tokenizer = tokenizer if tokenizer is not None else tokenizer_for(cfg)
        self.seg_id = seg_token_id(self.tokenizer)
        self.image_id = image_token_id(self.tokenizer)
        # Built, and registered, in this order: it fixes the random initialisation and the order
        # of the parameters (gradient clipping sums their norms in it), so seeded runs reproduce.
        sam = load_sam(cfg.mask_decoder.checkpoint, cfg.mask_decoder.model_type)
        tower = build_vision_tower(OmegaConf.to_object(cfg.vision))
        llm = build_llm(OmegaConf.to_object(cfg.llm), self.tokenizer)
        hidden = llm.get_input_embeddings().embedding_dim
        projector = build_projector(cfg.projector, tower.out_channels, hidden)
        if llava.is_llava(cfg.llm.path):
            projector.start_from_llava(cfg.llm.path)
        llava.forget()
        cache = Path(cfg.cache.root) / "features" if cfg.cache.features else None
        MEMORY.limit_bytes = int(cfg.cache.memory_mb) * 1024**2
        # features are cached per image id: the key names the encoder *and* the images (the data
        # set's annotation file), so a regenerated or replaced data set gets other entries
        images = file_key(Path(cfg.data.root) / cfg.data.dataset / "instances.json")[:8]
        self.mask_decoder = SamDecoder(
            sam,
            cfg.mask_decoder.train_decoder,
            f"sam-{file_key(cfg.mask_decoder.checkpoint)}-{images}",
            cache,
        )
        self.tower = tower
        self.llm = llm
        self.llm_dtype = frozen_dtype(llm)
        self.projector = projector
        self.grounding = Grounding(
            GroundingConfig(**OmegaConf.to_container(cfg.grounding, resolve=True)),
            hidden,
            cfg.mask_decoder.seg_mlp_hidden,
            self.mask_decoder,
            len(self.tokenizer),
            self.image_id,
            projector.has_regions,
            cfg.projector.name,
        )
        frozen = bool(cfg.vision.frozen)
        self.tower_features = FrozenEncoder(
            tower,
            f"tower-{tower.config_hash()}-{images}",
            tower.preprocess,
            memory=frozen,
            disk_dir=cache if frozen else None,
        )
        self.eval_splits = list(cfg.data.eval_splits)
        self.split_metrics = torch.nn.ModuleList(SplitMetrics() for _ in self.eval_splits)
        self.start_epoch = 0
        self.image_samples: list[dict] = []

    def forward(self, batch: dict) -> dict[str, Any]:
        images, image_ids = batch["images"], batch["image_ids"]
        if self.cfg.vision.frozen:
            feats = self.tower_features(images, image_ids)  # computed once per image, cached
        else:
            feats = self.tower(self.tower.preprocess(images))
        proj = self.projector(feats, batch.get("labels"))  # tokens, their mask and footprints
        seq = build_sequence(self.llm, proj.tokens, proj.mask, batch, self.image_id, self.seg_id)
        with llm_precision(self.llm_dtype, seq.embeds.device):
            out = self.llm(
                inputs_embeds=seq.embeds,
                attention_mask=seq.attention_mask,
                output_hidden_states=True,
            )
        seg_hidden = seg_state(out.hidden_states[-1], seq.seg_pos)
        prompt, pointer = self.grounding(seg_hidden, proj, feats, batch, self.mask_decoder)
        return {
            **pointer,
            "mask_logits": self.mask_decoder(prompt, images, image_ids),
            "seg_hidden": seg_hidden,
            "ce": text_loss(out.logits, seq.labels),
            "num_tokens": proj.mask.sum(1),
            "seq_len": seq.attention_mask.sum(1),
        }

    def losses(self, out: dict, batch: dict) -> dict[str, torch.Tensor]:
        w = self.cfg.loss
        bce, dice = mask_losses(out["mask_logits"], batch["masks"])
        total = w.ce_weight * out["ce"] + w.bce_weight * bce + w.dice_weight * dice
        total, pointer = self.grounding.add_losses(total, out)
        return {"loss": total, "ce": out["ce"], "bce": bce, "dice": dice, **pointer}

    # ------------------------------------------------------------------ lightning hooks
    def on_train_start(self) -> None:
        self.start_epoch = self.current_epoch  # > 0 when resumed from a checkpoint

    def on_train_end(self) -> None:
        """With several processes, check that every rank ends with the same trainable weights."""
        if self.trainer.world_size == 1:
            return
        digest = hashlib.sha256()
        for p in self.parameters():
            if p.requires_grad:
                digest.update(p.detach().float().cpu().numpy().tobytes())
        digests = self._gather([digest.hexdigest()])
        if len(set(digests)) > 1:
            raise RuntimeError(f"the processes ended with different weights: {digests}")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # each step draws its random numbers from (seed, epoch, batch), as the data order is
        # drawn from (seed, epoch): a run resumed from a checkpoint goes on as one that never
        # stopped, whatever else drew from the global generator in between
        key = [self.cfg.seed, self.current_epoch, batch_idx]
        torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))
        out = self(batch)
        losses = self.losses(out, batch)
        bs = len(batch["images"])
        for k, v in losses.items():
            self.log(f"train/{k}", v, batch_size=bs, prog_bar=k == "loss")
        self.log("train/tokens_per_image", out["num_tokens"].float().mean(), batch_size=bs)
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx, dataloader_idx, "val")

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx, dataloader_idx, "test")

    def _eval_step(self, batch: dict, batch_idx: int, idx: int, stage: str) -> None:
        out = self(batch)
        loss = self.losses(out, batch)["loss"]
        preds = [(m > 0).to(torch.uint8) for m in out["mask_logits"]]
        targets = [g.to(self.device) for g in batch["masks"]]
        hits = None
        if "ground_target" in out:  # the token the pointer picked, else the top-scored one
            pick = out.get("point_pick", out["ground_logits"].argmax(-1))
            hits = picked_hits(pick, out["ground_target"], out["ground_valid"])
        self.split_metrics[idx].update(preds, targets, out["num_tokens"], out["seq_len"], hits)
        self.log(
            f"{stage}_loss/{self.eval_splits[idx]}",
            loss,
            batch_size=len(preds),
            add_dataloader_idx=False,
            sync_dist=True,
        )
        if batch_idx == 0 and idx == 0:
            self.image_samples = _image_samples(batch, preds, self.cfg.trainer.num_image_samples)

    def _eval_epoch_end(self, stage: str) -> None:
        for split, metrics in zip(self.eval_splits, self.split_metrics):
            for name, value in metrics.compute(self._gather).items():
                self.log(f"{stage}/{split}/{name}", value, sync_dist=False)
        if stage == "val" and self.eval_splits:
            first = self.eval_splits[0]
            self.log("val/ciou", self.trainer.callback_metrics[f"val/{first}/ciou"])
            self._log_images()

    def _gather(self, values: list) -> list:
        if self.trainer is None or self.trainer.world_size == 1:
            return list(values)
        gathered: list = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(gathered, list(values))
        return [v for part in gathered for v in part]

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def _log_images(self) -> None:
        logger = self.logger
        if not self.image_samples or logger is None or not hasattr(logger, "experiment"):
            return
        if self.global_rank != 0 or not hasattr(logger.experiment, "add_image"):
            return
        from lightning_modules.visualize import prediction_grid

        grid = prediction_grid(self.image_samples)
        logger.experiment.add_image("val/predictions", grid, self.global_step, dataformats="HWC")

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        o = self.cfg.optim
        opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self.trainer else 1
        warm = min(o.warmup_steps, max(1, total // 10))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warm, total, floor=0.05))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _image_samples(batch: dict, preds: list[torch.Tensor], count: int) -> list[dict]:
    samples = []
    for b in range(min(count, len(preds))):
        sample = {
            "image": batch["images"][b].cpu().numpy(),
            "gt": batch["masks"][b].cpu().numpy(),
            "pred": preds[b].cpu().numpy(),
            "sentence": batch["sentences"][b],
        }
        if "superpixels" in batch:
            sample["superpixels"] = batch["superpixels"][b].cpu().numpy()
        samples.append(sample)
    return samples
