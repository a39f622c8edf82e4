"""`svp train` / `svp eval`: one RIS run with checkpoints, TensorBoard and a saved config."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from common.errors import ConfigError
from common.files import write_json
from common.threads import use_threads
from lightning_modules.cli.compose import save_config
from lightning_modules.cli.inputs import (
    check_run_inputs,
    checkpoint_state,
    require_checkpoint_file,
    run_dir_for,
)
from lightning_modules.metrics import SPLIT_METRICS

HPARAM_KEYS = (
    "projector",
    "grounding.weight",
    "grounding.pointer",
    "superpixels.name",
    "vision.name",
    "llm.hidden_size",
    "llm.num_hidden_layers",
    "optim.lr",
    "data.batch_size",
    "trainer.max_epochs",
    "seed",
)


def flat_hparams(cfg: DictConfig, token_budget: str | None = None) -> dict[str, Any]:
    """The config keys a sweep varies, flattened to scalars for TensorBoard's hparams tab, with
    the projector's token budget (e.g. `k=4`, `K<=32`) when given."""
    out: dict[str, Any] = {} if token_budget is None else {"token_budget": token_budget}
    for key in HPARAM_KEYS:
        node = OmegaConf.select(cfg, key)
        if isinstance(node, DictConfig):
            for k, v in OmegaConf.to_container(node, resolve=True).items():
                out[f"{key}.{k}"] = v if isinstance(v, int | float | str | bool) else str(v)
        elif node is not None:
            out[key] = node
    return out


def _trainer(
    cfg: DictConfig, run_dir: Path, callbacks: list, logger, progress: bool = True
) -> pl.Trainer:
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

    t = cfg.trainer
    best = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor="val/ciou",
        mode="max",
        save_top_k=1,
    )
    # Lightning 2.6 writes `save_last=True` only when a top-k file is written, so last.ckpt would
    # stay at the best epoch and `ckpt_path=last` would lose every epoch after it. A second,
    # monitor-free callback overwrites last.ckpt after every epoch instead.
    last = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="last",
        save_top_k=1,
        enable_version_counter=False,
    )
    cbs = [best, last, *callbacks]
    if logger is not None:
        cbs.append(LearningRateMonitor(logging_interval="step"))
    kwargs: dict[str, Any] = {
        "accelerator": t.accelerator,
        "devices": t.devices,
        "num_nodes": t.num_nodes,
        "strategy": t.strategy,
        "precision": t.precision,
        "max_epochs": t.max_epochs,
        "max_steps": t.max_steps,
        "check_val_every_n_epoch": t.val_every_n_epochs,
        "log_every_n_steps": t.log_every_n_steps,
        "fast_dev_run": t.fast_dev_run,
        "enable_progress_bar": bool(t.enable_progress_bar and progress),
        "deterministic": t.deterministic,
        "gradient_clip_val": cfg.optim.grad_clip or None,
        "accumulate_grad_batches": t.accumulate_grad_batches,
        "callbacks": cbs,
        "logger": logger if logger is not None else False,
        "default_root_dir": str(run_dir),
        "num_sanity_val_steps": 0,
        "use_distributed_sampler": False,  # RISDataModule shards the data itself
        "enable_model_summary": False,
    }
    if t.limit_train_batches is not None:
        kwargs["limit_train_batches"] = t.limit_train_batches
    if t.limit_val_batches is not None:
        kwargs["limit_val_batches"] = t.limit_val_batches
    if t.max_minutes:
        kwargs["max_time"] = {"minutes": float(t.max_minutes)}
    try:
        return pl.Trainer(**kwargs)
    except (MisconfigurationException, ValueError) as err:
        raise ConfigError(
            f"Lightning refuses the trainer settings (trainer.accelerator={t.accelerator}, "
            f"devices={t.devices}, strategy={t.strategy}, precision={t.precision}, "
            f"max_epochs={t.max_epochs}, …): {err}"
        ) from None


def _metrics_from(results: list[dict], splits: list[str], prefix: str) -> dict[str, float]:
    merged: dict[str, float] = {}
    for r in results:
        merged.update({k: float(v) for k, v in r.items()})
    out: dict[str, float] = {}
    for split in splits:
        for m in SPLIT_METRICS:
            key = f"{prefix}/{split}/{m}"
            if key in merged:
                out[f"{split}_{m}"] = merged[key]
    return out


def train(cfg: DictConfig, callbacks: list | None = None, progress: bool = True) -> dict[str, Any]:
    """Fit, then test the best checkpoint on every eval split; returns the final metrics."""
    from pytorch_lightning.loggers import TensorBoardLogger

    from datamodules.ris import RISDataModule
    from lightning_modules.alignment import load_aligned
    from lightning_modules.cli.align import aligned_folder
    from lightning_modules.llm import tokenizer_for
    from lightning_modules.ris_model import RISModel

    threads = use_threads(cfg.trainer.threads, "trainer.threads")
    check_run_inputs(cfg, training=True)
    run_dir = run_dir_for(cfg)
    aligned = aligned_folder(cfg, run_dir)  # stage 1 (`svp align`), run first with `run`
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    saved = run_dir / "tokenizer"  # a resumed run keeps its tokenizer
    tokenizer = tokenizer_for(
        cfg, saved if (saved / "tokenizer.json").is_file() else None, aligned=aligned
    )
    dm = RISDataModule(cfg, tokenizer)
    model = RISModel(cfg, tokenizer)  # the components' own config errors surface here
    ckpt_path = cfg.ckpt_path
    if ckpt_path == "last":
        last = run_dir / "checkpoints" / "last.ckpt"
        ckpt_path = str(last) if last.is_file() else None
        if ckpt_path is None:
            print(f"no {last} to resume from; starting fresh")
    if ckpt_path is not None:
        checkpoint_state(model, ckpt_path, "ckpt_path")
    elif aligned is not None:
        load_aligned(model, aligned, cfg)
    version = f"{cfg.projector.name}-seed{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    logger = TensorBoardLogger(
        save_dir=str(run_dir), name="tb", version=version, default_hp_metric=False
    )
    trainer = _trainer(cfg, run_dir, callbacks or [], logger, progress)
    # the run folder is written only once everything it describes is known to build
    save_config(cfg, run_dir / "config.yaml")
    tokenizer.save_pretrained(saved)
    start = time.time()
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    train_minutes = (time.time() - start) / 60
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    test_ckpt = best if best and Path(best).is_file() and not cfg.trainer.fast_dev_run else None
    results = trainer.test(model, datamodule=dm, ckpt_path=test_ckpt, verbose=False)
    metrics = _metrics_from(results, list(cfg.data.eval_splits), "test")
    metrics.update(
        {
            "train_minutes": train_minutes,
            "projector": cfg.projector.name,
            "token_budget": model.projector.token_budget,
            "run_dir": str(run_dir),
            "checkpoint": test_ckpt or "",
            "start_epoch": model.start_epoch,
            "epochs": trainer.current_epoch,
            "tensorboard": logger.log_dir,
            "threads": threads,
        }
    )
    first = cfg.data.eval_splits[0] if cfg.data.eval_splits else None
    if first and f"{first}_tokens_mean" in metrics:
        metrics["tokens_mean"] = metrics[f"{first}_tokens_mean"]
        metrics["tokens_p95"] = metrics[f"{first}_tokens_p95"]
    numeric = {f"final/{k}": v for k, v in metrics.items() if isinstance(v, float)}
    if trainer.is_global_zero:
        logger.log_hyperparams(flat_hparams(cfg, model.projector.token_budget), numeric)
        logger.finalize("success")
        write_json(run_dir / "metrics.json", metrics, sort_keys=True)
    return metrics


def evaluate(cfg: DictConfig, ckpt: str | None = None, tag: str = "") -> dict[str, Any]:
    """Test a checkpoint (default: the run's best, else last) on every eval split; writes
    `eval-<checkpoint>[-<tag>].json` into the run folder."""
    from datamodules.ris import RISDataModule
    from lightning_modules.llm import tokenizer_for
    from lightning_modules.ris_model import RISModel

    threads = use_threads(cfg.trainer.threads, "trainer.threads")
    check_run_inputs(cfg)
    run_dir = run_dir_for(cfg)
    if ckpt is None:
        for name in ("best.ckpt", "last.ckpt"):
            if (run_dir / "checkpoints" / name).is_file():
                ckpt = str(run_dir / "checkpoints" / name)
                break
    if ckpt is None:
        raise ConfigError(
            f"no checkpoint to evaluate: none in {run_dir / 'checkpoints'}. Pass "
            "--ckpt PATH or the run's --config/run_dir."
        )
    require_checkpoint_file(ckpt, "--ckpt")  # before the model is built
    pl.seed_everything(cfg.seed, verbose=False)
    tokenizer = tokenizer_for(cfg, run_dir / "tokenizer")
    model = RISModel(cfg, tokenizer)
    model.load_state_dict(checkpoint_state(model, ckpt, "--ckpt"))
    dm = RISDataModule(cfg, tokenizer)
    trainer = _trainer(cfg, run_dir, [], None)
    results = trainer.test(model, datamodule=dm, verbose=False)
    metrics = _metrics_from(results, list(cfg.data.eval_splits), "test")
    metrics["checkpoint"] = str(ckpt)
    metrics["threads"] = threads
    if trainer.is_global_zero:
        print(format_metrics(metrics, list(cfg.data.eval_splits)))
        name = f"eval-{Path(ckpt).stem}" + (f"-{tag}" if tag else "")
        write_json(run_dir / f"{name}.json", metrics, sort_keys=True)
    return metrics


def format_metrics(metrics: dict, splits: list[str]) -> str:
    """Markdown table of the eval metrics; pointing columns when the grounding pointer is on."""
    pointing = any(f"{s}_point_acc" in metrics for s in splits)
    head = "| split | cIoU | gIoU | tokens mean | tokens p95 |"
    rule = "|---|---|---|---|---|"
    if pointing:
        head += " point acc | cIoU hit | cIoU miss |"
        rule += "---|---|---|"
    lines = [head, rule]
    nan = float("nan")
    for s in splits:
        if f"{s}_ciou" in metrics:
            line = (
                f"| {s} | {metrics[f'{s}_ciou']:.4f} | {metrics[f'{s}_giou']:.4f} | "
                f"{metrics.get(f'{s}_tokens_mean', nan):.1f} | "
                f"{metrics.get(f'{s}_tokens_p95', nan):.1f} |"
            )
            if pointing:
                line += "".join(
                    f" {metrics.get(f'{s}_{k}', nan):.4f} |"
                    for k in ("point_acc", "ciou_hit", "ciou_miss")
                )
            lines.append(line)
    return "\n".join(lines)
