"""Checks of a run's inputs, made before anything is written."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from common.errors import ConfigError, DataError
from common.files import load_torch_file


def run_dir_for(cfg: DictConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    return Path(cfg.runs_root) / cfg.name / f"{cfg.projector.name}-seed{cfg.seed}"


def check_run_inputs(cfg: DictConfig, training: bool = False) -> None:
    """What a run reads, checked before it writes anything: the values that size it, the SAM
    checkpoint, the data set and its splits, a checkpoint to resume from; for training, that the
    run folder does not hold a finished run; with several processes, the superpixel cache (else
    every rank but one would wait, for hours with ViT-H, while one builds it)."""
    check_values(cfg)
    from common.sam import RANDOM_WEIGHTS

    ckpt = Path(cfg.mask_decoder.checkpoint)
    if str(ckpt) == RANDOM_WEIGHTS:
        raise ConfigError(
            f"mask_decoder.checkpoint={RANDOM_WEIGHTS}: random SAM weights are for `svp bench` "
            "only; point mask_decoder.checkpoint at a SAM checkpoint (or run `svp train-sam`)."
        )
    if not ckpt.is_file():
        relative = ""
        if not ckpt.is_absolute():
            relative = (
                f" under {Path.cwd()} (relative paths, also in a saved config.yaml, are read "
                "from the current folder)"
            )
        raise ConfigError(
            f"mask_decoder.checkpoint={ckpt} does not exist{relative}. Train the small SAM first "
            "with `svp train-sam` (or point mask_decoder.checkpoint at a SAM checkpoint)."
        )
    require_data(cfg)
    require_splits(cfg, training)
    if training:
        check_run_folder(cfg)
    if processes(cfg) > 1:
        from datamodules.ris import RISDataModule

        if not RISDataModule(cfg, tokenizer=None).superpixels_ready():
            raise DataError(
                f"the {cfg.superpixels.name} superpixel cache under {cfg.cache.root} is missing "
                f"or incomplete, and {processes(cfg)} processes would wait for one of them to "
                "build it. Build it first with all of them: `svp precompute trainer=ddp` (with "
                "this run's data, superpixels and cache overrides)."
            )


def check_values(cfg: DictConfig) -> None:
    """ConfigError, naming the key, for sizes and values a run cannot run with."""
    from datamodules.superpixels.store import check_shard_size

    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed={cfg.seed} must be in [0, 2**32 - 1].")
    if not cfg.optim.lr > 0:
        raise ConfigError(f"optim.lr={cfg.optim.lr} must be > 0.")
    if cfg.data.label_size < 1:
        raise ConfigError(f"data.label_size={cfg.data.label_size} (pixels) must be at least 1.")
    check_shard_size(cfg.cache.shard_size)
    for key in ("data.batch_size", "data.eval_batch_size"):
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} must be at least 1.")
    for key in ("limit_train_sentences", "limit_val_sentences", "limit_test_sentences"):
        value = cfg.data[key]
        if value is not None and value < 1:
            raise ConfigError(f"data.{key}={value} must be at least 1, or null for all.")
    for key, needed in (("prompt", "{sentence}"), ("prompt", "<image>"), ("answer", "[SEG]")):
        if needed not in cfg.data[key]:
            raise ConfigError(
                f"data.{key}={cfg.data[key]!r} has no {needed}: the prompt carries the sentence "
                "and one <image> slot for the visual tokens, the answer the [SEG] token."
            )
    if cfg.trainer.accumulate_grad_batches < 1:
        raise ConfigError(
            f"trainer.accumulate_grad_batches={cfg.trainer.accumulate_grad_batches} must be ≥ 1."
        )
    steps = cfg.trainer.max_steps
    if steps == 0 or steps < -1:
        raise ConfigError(
            f"trainer.max_steps={steps} trains nothing; use a number of steps ≥ 1, or -1 to let "
            "trainer.max_epochs decide."
        )


def require_splits(cfg: DictConfig, training: bool) -> None:
    """DataError, naming the key, for an eval split `data.dataset` does not have or, when
    `training`, a data set training draws from (`data.mix`) without `data.train_split`."""
    from datamodules.mix import training_sets
    from datamodules.refer import available_splits

    d = cfg.data
    checks = [(d.dataset, d.split_by, "data.eval_splits", list(d.eval_splits))]
    if training:
        checks += [
            (s.dataset, s.split_by, "data.train_split", [d.train_split]) for s in training_sets(d)
        ]
    for dataset, split_by, key, splits in checks:
        present = available_splits(d.root, dataset, split_by)
        for split in splits:
            if split not in present:
                raise DataError(
                    f"{key}: {dataset} ({split_by}) under {d.root} has no split {split!r}; "
                    f"its splits are {', '.join(present)}."
                )


def check_run_folder(cfg: DictConfig) -> None:
    """A finished run (its metrics.json written) is never trained over, except to resume it; a
    checkpoint to resume from must exist (`checkpoint_state` reads it once the model is built)."""
    run_dir = run_dir_for(cfg)
    if cfg.ckpt_path is None and (run_dir / "metrics.json").is_file():
        raise ConfigError(
            f"{run_dir} holds a finished run. Give this one another name=, seed= or run_dir=, "
            "continue that one with ckpt_path=last, or delete the folder."
        )
    if cfg.ckpt_path not in (None, "last"):
        require_checkpoint_file(cfg.ckpt_path, "ckpt_path")


def require_checkpoint_file(path: str, key: str) -> None:
    if not Path(path).is_file():
        what = "is a folder" if Path(path).is_dir() else "does not exist"
        raise ConfigError(f"{key}={path} {what}; pass a .ckpt file of a run.")


def checkpoint_state(model, path: str, key: str) -> dict:
    """The state dict of the Lightning checkpoint at `path`, read once; ConfigError, naming
    `key`, unless it is readable and its weights are this model's (the same names: a checkpoint
    of another config or another version of the suite is not)."""
    require_checkpoint_file(path, key)
    checkpoint = load_torch_file(
        path, f"{key}={path}", "pass a .ckpt file of a run", weights_only=False, mmap=True
    )
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"{key}={path} is not a Lightning checkpoint (no state_dict in it).")
    state = checkpoint["state_dict"]
    wanted = model.state_dict()
    missing, unexpected = sorted(set(wanted) - set(state)), sorted(set(state) - set(wanted))
    resized = [k for k in wanted if k in state and state[k].shape != wanted[k].shape]
    if missing or unexpected or resized:
        shown = ", ".join(
            [
                *(f"-{k}" for k in missing[:3]),
                *(f"+{k}" for k in unexpected[:3]),
                *(f"{k} {list(state[k].shape)}≠{list(wanted[k].shape)}" for k in resized[:3]),
            ]
        )
        raise ConfigError(
            f"{key}={path} holds other weights than this config's model ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(resized)} of another shape: {shown}); it was "
            "saved with another config or another version of the suite. Evaluate it with its "
            "own run's config.yaml."
        )
    return state


def processes(cfg: DictConfig) -> int:
    """How many processes the run's trainer starts (devices × nodes)."""
    t = cfg.trainer
    devices = t.devices
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if devices in ("auto", -1):
        import torch

        gpu = t.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        devices = torch.cuda.device_count() if gpu else 1
    elif not isinstance(devices, int):
        devices = len(devices)
    return int(devices) * int(t.num_nodes)


def require_folder(root: str, dataset: str, where: str = "") -> None:
    """DataError unless `<root>/<dataset>` exists; `where` names the config key it came from."""
    folder = Path(root) / dataset
    if not folder.is_dir():
        hint = " Generate it with `svp synth`." if dataset == "synthref" else ""
        raise DataError(f"{where}data set folder {folder} is missing.{hint}")


def require_data(cfg: DictConfig) -> None:
    """The RIS data set must exist; a SynthRef made with other `synth.*` settings is warned of."""
    require_folder(cfg.data.root, cfg.data.dataset)
    warn_synthref_mismatch(cfg)


def warn_synthref_mismatch(cfg: DictConfig) -> None:
    """Warn when the SynthRef that `data.root` holds was generated with other `synth.*` settings
    (other split sizes or seed): numbers would not be comparable with the documented ones."""
    if cfg.data.dataset != "synthref" or "synth" not in cfg:
        return
    from datamodules.synthetic import SynthConfig, synthref_mismatch

    synth: SynthConfig = OmegaConf.to_object(cfg.synth)
    if Path(synth.root).resolve() != Path(cfg.data.root).resolve():
        return
    problem = synthref_mismatch(synth)
    if problem:
        import warnings

        warnings.warn(problem, stacklevel=2)
