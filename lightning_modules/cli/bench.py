"""`svp bench`: trivial baselines and per-projector efficiency (tokens, step time, latency)."""

from __future__ import annotations

import time

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lightning_modules.metrics import ciou, giou

BASELINES = ("whole_image", "largest_object", "random_object")


def baseline_predictions(refer, name: str, seed: int = 0) -> tuple[list, list]:
    """Predictions of a trivial baseline for every sentence of `refer` (a ReferDataset)."""
    rng = np.random.default_rng(seed)
    preds, targets = [], []
    instance_cache: dict[int, np.ndarray] = {}
    for i in range(len(refer)):
        item = refer[i]
        gt = item["mask"]
        if name == "whole_image":
            pred = np.ones_like(gt)
        else:
            image_id = item["image_id"]
            if image_id not in instance_cache:
                instance_cache[image_id] = refer.instance_masks(image_id)
            masks = instance_cache[image_id]
            if len(masks) == 0:
                pred = np.zeros_like(gt)
            elif name == "largest_object":
                pred = masks[int(np.argmax(masks.reshape(len(masks), -1).sum(1)))]
            elif name == "random_object":
                pred = masks[int(rng.integers(len(masks)))]
            else:
                raise ValueError(f"unknown baseline {name!r}; choose from {BASELINES}")
        preds.append(torch.from_numpy(np.ascontiguousarray(pred)))
        targets.append(torch.from_numpy(np.ascontiguousarray(gt)))
    return preds, targets


def trivial_baselines(cfg: DictConfig, splits: list[str] | None = None) -> list[dict]:
    from datamodules.refer import ReferDataset

    rows = []
    for split in splits or list(cfg.data.eval_splits):
        refer = ReferDataset(cfg.data.root, cfg.data.dataset, cfg.data.split_by, split)
        for name in BASELINES:
            preds, targets = baseline_predictions(refer, name, cfg.seed)
            rows.append(
                {
                    "split": split,
                    "baseline": name,
                    "ciou": ciou(preds, targets),
                    "giou": giou(preds, targets),
                }
            )
    return rows


def format_baselines(rows: list[dict]) -> str:
    lines = ["| split | baseline | cIoU | gIoU |", "|---|---|---|---|"]
    lines += [
        f"| {r['split']} | {r['baseline']} | {r['ciou']:.4f} | {r['giou']:.4f} |" for r in rows
    ]
    return "\n".join(lines)


def _projector_row(cfg: DictConfig, name: str, batch, tokenizer, repeats: int) -> dict:
    from lightning_modules.cli.config import rebase_config
    from lightning_modules.ris_model import RISModel

    # the command's own settings (dotted overrides included), with this projector's defaults
    pcfg = rebase_config(OmegaConf.to_container(cfg, resolve=True), [f"projector={name}"])
    model = RISModel(pcfg, tokenizer)
    model.eval()
    with torch.no_grad():
        model(batch)  # warm-up (fills the frozen-feature memory)
        start = time.perf_counter()
        for _ in range(repeats):
            out = model(batch)
        latency = (time.perf_counter() - start) / repeats
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    start = time.perf_counter()
    for _ in range(repeats):
        loss = model.losses(model(batch), batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    step = (time.perf_counter() - start) / repeats
    tokens = out["num_tokens"].float()
    bs = len(batch["images"])
    return {
        "projector": name,
        "budget": model.projector.token_budget,
        "tokens_mean": float(tokens.mean()),
        "seq_len_mean": float(out["seq_len"].float().mean()),
        "train_step_s": step,
        "latency_ms_per_sample": 1000 * latency / bs,
        "params_m": sum(p.numel() for p in model.projector.parameters()) / 1e6,
    }


def projector_bench(cfg: DictConfig, repeats: int = 3) -> str:
    """Baselines on the eval splits, then one row per projector on one eval batch."""
    from datamodules.ris import RISDataModule
    from lightning_modules.llm import tokenizer_for
    from lightning_modules.projectors import PROJECTORS

    torch.manual_seed(cfg.seed)
    out = ["## Trivial baselines", "", format_baselines(trivial_baselines(cfg)), ""]
    tokenizer = tokenizer_for(cfg)
    dm = RISDataModule(cfg, tokenizer)
    dm.needs_superpixels = True
    dm.prepare_data()
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()[0]))
    rows = [_projector_row(cfg, name, batch, tokenizer, repeats) for name in sorted(PROJECTORS)]
    out += [
        f"## Projectors (one eval batch of {len(batch['images'])}, {repeats} repeats)",
        "",
        "| projector | budget | tokens/image | LLM seq len | train step (s) | "
        "latency (ms/sample) | projector params (M) |",
        "|---|---|---|---|---|---|---|",
    ]
    out += [
        f"| {r['projector']} | {r['budget']} | {r['tokens_mean']:.1f} | {r['seq_len_mean']:.1f} | "
        f"{r['train_step_s']:.3f} | {r['latency_ms_per_sample']:.2f} | {r['params_m']:.3f} |"
        for r in rows
    ]
    return "\n".join(out)
