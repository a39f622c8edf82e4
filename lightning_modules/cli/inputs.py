"""Checks of a run's inputs, made before anything is written."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from common.errors import ConfigError, DataError


def check_run_inputs(cfg: DictConfig) -> None:
    """The SAM checkpoint and the data set exist; with several processes, so does the superpixel
    cache (else every rank but one would wait, for hours with ViT-H, while one builds it)."""
    ckpt = Path(cfg.mask_decoder.checkpoint)
    if not ckpt.is_file():
        raise ConfigError(
            f"mask_decoder.checkpoint={ckpt} does not exist. Train the small SAM first with "
            "`svp train-sam` (or point mask_decoder.checkpoint at a SAM checkpoint)."
        )
    require_data(cfg)
    if processes(cfg) > 1:
        from datamodules.ris import RISDataModule

        if not RISDataModule(cfg, tokenizer=None).superpixels_ready():
            raise DataError(
                f"the {cfg.superpixels.name} superpixel cache under {cfg.cache.root} is missing "
                f"or incomplete, and {processes(cfg)} processes would wait for one of them to "
                "build it. Build it first with all of them: `svp precompute trainer=ddp` (with "
                "this run's data, superpixels and cache overrides)."
            )


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
