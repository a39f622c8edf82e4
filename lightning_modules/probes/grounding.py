"""`svp diagnose grounding`: where does a RIS model fail to learn? Oracle prompts, one at a time.

The RIS chain is vision tower → projector → LLM → [SEG] hidden → prompt → SAM mask decoder. When a
run stays at trivial-baseline cIoU, this probe trains the same model with the [SEG] prompt taken
from a different source, so each link is tested on its own:

* ``llm``: the model as configured (what `svp train` trains);
* ``oracle_point``: the target's centroid (SAM's Fourier encoding) → linear → the [SEG] MLP; the
  ceiling of the prompt → mask-decoder link;
* ``oracle_token``: that same vector spliced in as the *only* visual token and read back from the
  [SEG] hidden state; tests that the LLM can carry location to [SEG];
* ``text_only``: a bag of the sentence's word embeddings → the [SEG] MLP; how far the mask decoder
  gets by matching text to SAM's image embedding without any grounding in the LLM;
* ``oracle_select`` (``semantic`` only): the projector's real tokens, but the LLM sees only the
  token of the superpixel that overlaps the target most; the selection is done for the LLM;
* ``pointing``: the model as configured, trained on the grounding pointer's loss alone (needs
  the pointer): how far pointing — the link that limits the tiny preset — goes with more steps or
  a larger batch. No cIoU.

``--select-steps N`` runs the first N steps as ``oracle_select`` and the rest as ``mode``: a
curriculum that trains the token → [SEG] → prompt path before the LLM must learn to select.

It logs train losses, val cIoU/gIoU and the spread across the batch of the [SEG] hidden state
(`seg_std`): a spread that falls towards 0 while cIoU stays flat means the prompt collapsed to one
constant "typical object" prompt. No Lightning: a plain loop, so a 600-step probe takes minutes.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from tqdm.auto import tqdm

from common.errors import ConfigError
from lightning_modules.grounding import grounding_loss
from lightning_modules.llm import build_sequence, seg_state
from lightning_modules.mask_decoder import mask_losses
from lightning_modules.schedules import warmup_cosine

MODES = ("llm", "oracle_point", "oracle_token", "text_only", "oracle_select", "pointing")


def check_mode(mode: str, projector: str) -> None:
    """Raise a ConfigError unless `mode` is known and works with `projector`."""
    if mode not in MODES:
        raise ConfigError(f"diagnose mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    if mode == "oracle_select" and projector != "semantic":
        raise ConfigError("diagnose mode oracle_select needs projector=semantic")


class GroundingProbe(nn.Module):
    """Wraps a `RISModel`; `forward(batch)` returns mask logits with the prompt from `mode`."""

    def __init__(self, model, mode: str):
        super().__init__()
        check_mode(mode, model.cfg.projector.name)
        if mode == "pointing" and model.grounding.pointer is None:
            raise ConfigError(
                "diagnose mode pointing trains the grounding pointer, which is off: set "
                "grounding.weight > 0 (the tiny preset has it on) and use a projector whose "
                "tokens have footprints (not resampler)"
            )
        self.model, self.mode = model, mode
        hidden = model.llm.get_input_embeddings().embedding_dim
        pe_dim = model.mask_decoder.prompt_dim
        if mode in ("oracle_point", "oracle_token"):
            self.oracle = nn.Linear(pe_dim, hidden)
        elif mode == "text_only":
            self.oracle = nn.EmbeddingBag(len(model.tokenizer), hidden)
        self.seg_std = float("nan")
        self.point_acc = float("nan")  # top-1 pointing accuracy of the grounding pointer, if any

    def _centroid_code(self, masks: list[torch.Tensor]) -> torch.Tensor:
        points = []
        for m in masks:
            ys, xs = torch.nonzero(m, as_tuple=True)
            h, w = m.shape
            if len(xs) == 0:
                points.append(torch.tensor([0.5, 0.5]))
            else:
                points.append(
                    torch.stack([(xs.float().mean() + 0.5) / w, (ys.float().mean() + 0.5) / h])
                )
        coords = torch.stack(points)[:, None, :].to(self.model.device)
        return self.model.mask_decoder.sam.prompt_encoder.pe_layer._pe_encoding(coords)[:, 0]

    def _target_token(self, batch: dict, grid_h: int, k: int) -> torch.Tensor:
        """B×k bool: the token whose superpixel overlaps the target mask most."""
        from lightning_modules.projectors.semantic import order_superpixels

        cfg = self.model.projector.cfg
        labels, _ = order_superpixels(batch["labels"], cfg.max_tokens, cfg.ordering, grid_h)
        keep = torch.zeros(labels.shape[0], k, dtype=torch.bool, device=labels.device)
        for b, gt in enumerate(batch["masks"]):
            small = F.interpolate(gt[None, None].float(), size=labels.shape[1:], mode="nearest")
            inside = labels[b][small[0, 0] > 0]
            inside = inside[inside >= 0]
            if len(inside):
                keep[b, int(torch.bincount(inside).argmax())] = True
            else:
                keep[b, 0] = True
        return keep

    def _hidden(self, batch: dict) -> torch.Tensor:
        m = self.model
        if self.mode == "oracle_point":
            return self.oracle(self._centroid_code(batch["masks"]))
        if self.mode == "text_only":
            ids, lengths = batch["input_ids"], batch["text_lengths"]
            return torch.stack(
                [self.oracle(ids[b, : int(lengths[b])][None])[0] for b in range(ids.shape[0])]
            )
        if self.mode == "oracle_token":
            tokens = self.oracle(self._centroid_code(batch["masks"]))[:, None, :]
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        else:
            feats = m.tower_features(batch["images"], batch["image_ids"])
            proj = m.projector(feats, batch.get("labels"))
            tokens, mask = proj.tokens, proj.mask
            if self.mode == "oracle_select":
                mask = mask & self._target_token(batch, feats.shape[-2], mask.shape[1])
        seq = build_sequence(m.llm, tokens, mask, batch, m.image_id, m.seg_id)
        out = m.llm(
            inputs_embeds=seq.embeds, attention_mask=seq.attention_mask, output_hidden_states=True
        )
        return seg_state(out.hidden_states[-1], seq.seg_pos)

    def forward(self, batch: dict) -> dict:
        m = self.model
        if self.mode in ("llm", "pointing"):  # the whole model, grounding pointer included
            out = m(batch)
            if self.mode == "pointing":
                out.pop("mask_logits")
            if out["seg_hidden"].shape[0] > 1:
                self.seg_std = float(out["seg_hidden"].detach().std(0).mean())
            return out
        hidden = self._hidden(batch)
        if hidden.shape[0] > 1:
            self.seg_std = float(hidden.detach().std(0).mean())
        prompt = m.grounding.seg_mlp(hidden)
        return {"mask_logits": m.mask_decoder(prompt, batch["images"], batch["image_ids"])}

    def loss(self, out: dict, batch: dict) -> tuple[torch.Tensor, float, float]:
        w = self.model.cfg.loss
        total, bce, dice = torch.zeros((), device=self.model.device), math.nan, math.nan
        if "mask_logits" in out:
            bce_m, dice_m = mask_losses(out["mask_logits"], batch["masks"])
            total = w.bce_weight * bce_m + w.dice_weight * dice_m
            bce, dice = float(bce_m.detach()), float(dice_m.detach())
        self.point_acc = float("nan")
        if "ground_logits" in out:
            ground, acc = grounding_loss(
                out["ground_logits"], out["ground_target"], out["ground_valid"]
            )
            total = total + self.model.cfg.grounding.weight * ground
            self.point_acc = float(acc)
        return total, bce, dice


def _finite(x: float) -> float | None:
    """`x`, or None (JSON null) where it is NaN: a quantity the mode does not measure."""
    return x if math.isfinite(x) else None


@torch.no_grad()
def _evaluate(probe: GroundingProbe, loader) -> tuple[float, float, float]:
    """Val cIoU and gIoU with the metrics `svp train` logs, and the grounding pointer's pointing
    accuracy (NaN without one)."""
    from lightning_modules.metrics import CIoU, GIoU

    probe.eval()
    ciou, giou = CIoU(), GIoU()
    hits, count = 0.0, 0
    for batch in loader:
        out = probe(batch)
        if "mask_logits" in out:
            preds = [(logit > 0).to(torch.uint8) for logit in out["mask_logits"]]
            ciou.update(preds, batch["masks"])
            giou.update(preds, batch["masks"])
        if "ground_logits" in out:
            _, acc = grounding_loss(out["ground_logits"], out["ground_target"], out["ground_valid"])
            n = int(out["ground_valid"].sum())
            hits, count = hits + float(acc) * n, count + n
    probe.train()
    if probe.mode == "pointing":
        c = g = math.nan
    else:
        c, g = float(ciou.compute()), float(giou.compute())
    return c, g, hits / count if count else math.nan


def diagnose_grounding(
    cfg: DictConfig,
    mode: str = "llm",
    steps: int = 600,
    eval_every: int = 200,
    out: str | Path | None = None,
    progress: bool = True,
    select_steps: int = 0,
) -> dict:
    """Train `steps` steps with the prompt from `mode`; returns (and writes) the learning curve.

    The LLM's text loss is left out in every mode: the answer text is constant, so it says nothing
    about grounding. Optimiser, lr, warmup and cosine schedule are the run's own (`optim.*`).
    """
    from common.files import write_json
    from datamodules.ris import RISDataModule
    from lightning_modules.cli.inputs import check_run_inputs
    from lightning_modules.llm import tokenizer_for
    from lightning_modules.ris_model import RISModel

    if steps < 1 or eval_every < 1:
        raise ConfigError(f"--steps ({steps}) and --eval-every ({eval_every}) must be ≥ 1")
    if select_steps < 0:
        raise ConfigError(f"--select-steps {select_steps} must be ≥ 0 (0: no oracle_select steps)")
    check_mode(mode, cfg.projector.name)
    if select_steps:
        check_mode("oracle_select", cfg.projector.name)
    check_run_inputs(cfg)  # the SAM checkpoint and the data set exist, else a clear error
    torch.manual_seed(cfg.seed)
    tag = f"{cfg.projector.name}-{mode}" + (f"-select{select_steps}" if select_steps else "")
    run = Path(out) if out else Path(cfg.runs_root) / "diagnose" / tag
    run.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer_for(cfg, run / "tokenizer")
    dm = RISDataModule(cfg, tokenizer)
    dm.prepare_data()
    dm.setup("fit")
    probe = GroundingProbe(RISModel(cfg, tokenizer), mode)
    probe.train()
    params = [p for p in probe.parameters() if p.requires_grad]
    o = cfg.optim
    opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    warm = max(1, min(o.warmup_steps, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warm, steps, floor=0.05))
    val = dm.val_dataloader()[0]
    curve: list[dict] = []
    recent: list[tuple[float, float, float]] = []
    step, start = 0, time.time()
    bar = tqdm(total=steps, desc=f"diagnose {mode}", disable=not progress)
    while step < steps:
        for batch in dm.train_dataloader():
            probe.mode = "oracle_select" if step < select_steps else mode
            out_ = probe(batch)
            loss, bce, dice = probe.loss(out_, batch)
            opt.zero_grad()
            loss.backward()
            if o.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
            opt.step()
            sched.step()
            step += 1
            recent.append((bce, dice, probe.seg_std, probe.point_acc))
            bar.update()
            if step % eval_every == 0 or step == steps:
                probe.mode = mode
                ciou, giou, val_acc = _evaluate(probe, val)
                bce_m, dice_m, std_m, acc_m = np.mean(recent, axis=0).tolist()
                recent = []
                point = {
                    "step": step,
                    "val_ciou": _finite(ciou),
                    "val_giou": _finite(giou),
                    "train_bce": _finite(bce_m),
                    "train_dice": _finite(dice_m),
                    "seg_std": _finite(std_m),
                    "train_point_acc": _finite(acc_m),
                    "val_point_acc": _finite(val_acc),
                    "minutes": (time.time() - start) / 60,
                }
                curve.append(point)
                masks = (
                    f"val cIoU {ciou:.4f} gIoU {giou:.4f} | train dice {dice_m:.3f} | "
                    if math.isfinite(ciou)
                    else ""
                )
                bar.write(
                    f"step {step}: {masks}[SEG] hidden spread {std_m:.4f} | point acc train "
                    f"{acc_m:.3f} val {val_acc:.3f}"
                )
            if step >= steps:
                break
    bar.close()
    result = {
        "mode": mode,
        "select_steps": select_steps,
        "projector": cfg.projector.name,
        "steps": steps,
        "curve": curve,
    }
    write_json(run / "diagnose.json", result)
    print(f"learning curve written to {run / 'diagnose.json'}")
    return result
