"""`svp align`: the alignment stage (LLaVA's stage 1) into an output folder that `svp train
align.checkpoint=<folder>` starts from: `aligned.pt`, `tokenizer/`, `config.yaml`, `metrics.json`
and TensorBoard curves under `tb/`."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from common.errors import ConfigError
from common.files import atomic_write, file_key, process_tag, write_json
from common.threads import use_threads
from lightning_modules.cli.compose import save_config
from lightning_modules.cli.inputs import processes

RUN = "run"  # align.checkpoint=run: align inside the RIS run's folder first (sweeps, the demo)


def aligned_folder(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The `svp align` folder a RIS run starts from (None: no alignment); with
    `align.checkpoint=run` it is `<run_dir>/align`, aligned here first when it is missing."""
    from lightning_modules.alignment import ALIGNED_FILE

    where = cfg.align.checkpoint
    if where is None:
        return None
    if where != RUN:
        lacks = [n for n in (ALIGNED_FILE, "tokenizer") if not (Path(where) / n).exists()]
        if lacks:
            raise ConfigError(
                f"align.checkpoint={where} is not an `svp align` output folder (no "
                f"{' or '.join(lacks)} in it); point it at one (align.out of `svp align`), or "
                f"use align.checkpoint={RUN} to align inside this run"
            )
        return Path(where)
    folder = run_dir / "align"
    if not (folder / ALIGNED_FILE).is_file():
        if processes(cfg) > 1:  # every process would align on its own, into the same folder
            raise ConfigError(
                f"align.checkpoint={RUN} aligns inside the run, which {processes(cfg)} processes "
                f"cannot share. Align first with the same overrides (`svp align ... "
                f"align.out={folder}`, several processes are fine there), then train with "
                f"align.checkpoint={folder}"
            )
        staged = DictConfig(cfg.copy())
        staged.align.out = str(folder)
        align(staged, progress=bool(cfg.trainer.enable_progress_bar))
    return folder


def _dataset_images(cfg: DictConfig) -> dict[str, int]:
    path = Path(cfg.data.root) / cfg.data.dataset / "instances.json"
    if not path.is_file():
        return {}
    images = json.loads(path.read_text(encoding="utf-8"))["images"]
    return {im["file_name"]: int(im["id"]) for im in images}


def _conversation_texts(entries: list[dict]) -> list[str]:
    return [t["value"].replace("<image>", " ") for e in entries for t in e["conversations"]]


def align(cfg: DictConfig, progress: bool = True) -> dict[str, Any]:
    """Train the alignment stage; write its folder (`align.out`) whole at the end, so a failed
    run leaves a finished one as it was. Returns its metrics."""
    from datamodules.conversations import ConversationDataModule, image_index, read_conversations
    from datamodules.refer import image_dir
    from datamodules.ris import RISDataModule
    from lightning_modules.alignment import ALIGNED_FILE, AlignModel
    from lightning_modules.llm import tokenizer_for

    threads = use_threads(cfg.trainer.threads, "trainer.threads")
    a = cfg.align
    if a.epochs < 1 or a.batch_size < 1:
        raise ConfigError(
            f"align.epochs={a.epochs} and align.batch_size={a.batch_size} must be at least 1"
        )
    if not a.lr > 0:
        raise ConfigError(f"align.lr={a.lr} must be > 0")
    synthref = Path(cfg.data.root) / "synthref"
    if Path(a.data).parent == synthref and not Path(a.data).exists() and synthref.is_dir():
        # a SynthRef written before it wrote its conversations
        from datamodules.synthref.conversations import write_synthref_conversations

        write_synthref_conversations(synthref)
    entries = read_conversations(a.data, a.limit_conversations)
    folder = Path(a.image_folder) if a.image_folder else image_dir(cfg.data.root, cfg.data.dataset)
    index = image_index(entries, folder, _dataset_images(cfg))
    tokenizer = tokenizer_for(cfg, extra_texts=_conversation_texts(entries))
    store = None
    if cfg.projector.name == "semantic":
        if not index.shared:
            raise ConfigError(
                f"projector=semantic reads superpixels, which `svp align` takes from the "
                f"{cfg.data.dataset} cache; {a.data} names images outside it. Align a projector "
                "without superpixels, or use conversations about the data set's images"
            )
        ris = RISDataModule(cfg, tokenizer)
        ris.prepare_data()
        ris.setup("validate")
        store = ris.stores[(cfg.data.dataset, cfg.data.split_by)]
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    instances = Path(cfg.data.root) / cfg.data.dataset / "instances.json"
    feature_key = file_key(instances if index.shared else a.data)[:8]
    model = AlignModel(cfg, tokenizer, feature_key)
    dm = ConversationDataModule(cfg, tokenizer, entries, index, store)

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.{process_tag()}-", dir=out.parent))
    try:
        from pytorch_lightning.loggers import TensorBoardLogger

        t = cfg.trainer
        logger = TensorBoardLogger(save_dir=str(stage), name="tb", version="align")
        trainer = pl.Trainer(
            accelerator=t.accelerator,
            devices=t.devices,
            num_nodes=t.num_nodes,
            strategy=t.strategy,
            precision=t.precision,
            max_epochs=int(a.epochs),
            gradient_clip_val=cfg.optim.grad_clip or None,
            logger=logger,
            log_every_n_steps=t.log_every_n_steps,
            enable_checkpointing=False,
            enable_progress_bar=bool(t.enable_progress_bar and progress),
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=1.0 if len(dm.val_set) else 0,
            use_distributed_sampler=False,
        )
        start = time.time()
        trainer.fit(model, datamodule=dm)
        metrics = {
            "minutes": (time.time() - start) / 60,
            "conversations": len(dm.train_set),
            "steps": trainer.global_step,
            "threads": threads,
            "projector": cfg.projector.name,
            **{k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("align/")},
        }
        if trainer.is_global_zero:
            state = {**model.aligned_state(), "projector_name": cfg.projector.name}
            tokenizer.save_pretrained(stage / "tokenizer")
            save_config(cfg, stage / "config.yaml")
            write_json(stage / "metrics.json", metrics, sort_keys=True)
            atomic_write(stage / ALIGNED_FILE, lambda f: torch.save(state, f))
            if out.exists():
                shutil.rmtree(out)
            stage.rename(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {**metrics, "out": str(out)}
