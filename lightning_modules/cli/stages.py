"""The stages behind `svp train-sam | precompute | superpixels | sweep | report | demo`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from common.errors import ConfigError, DataError, SweepIncomplete
from lightning_modules.cli.inputs import check_values, require_data, require_folder


def _plain(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _refer(cfg: DictConfig, split: str):
    from datamodules.refer import ReferDataset

    return ReferDataset(cfg.data.root, cfg.data.dataset, cfg.data.split_by, split)


# ------------------------------------------------------------------------------ train-sam
def run_train_sam(cfg: DictConfig, force: bool = False, progress: bool = True) -> dict:
    from lightning_modules.sam_pretraining.training import TrainSamConfig, check_config, train_sam

    ts: TrainSamConfig = OmegaConf.to_object(cfg.train_sam)
    check_config(ts)  # config errors first, before looking for data or an existing SAM
    out = Path(ts.out)
    metrics_file = out.parent / "metrics.json"
    if out.is_file() and not force:
        previous = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        print(
            f"small SAM exists at {out} (val single-point mIoU "
            f"{previous.get('miou', float('nan')):.3f}); skipping (use --force to retrain)."
        )
        _warn_sam_settings(previous.get("config"), ts, out)
        return previous
    _require_sam_data(cfg, ts)
    result = train_sam(ts, progress=progress)
    if result:
        print(
            f"small SAM saved to {result['checkpoint']}: val single-point mIoU "
            f"{result['miou']:.3f} after {result['steps']} steps, {result['minutes']:.1f} min"
        )
        for key, accuracy in result.get("semantic_accuracy", {}).items():
            print(f"  semantic head `{key}`: val top-1 {accuracy:.3f} over the instances")
    return result


def _require_sam_data(cfg: DictConfig, ts) -> None:
    """The SAM's training images: its own SynthRef pool (`sam_synth`), generated here when
    `train_sam.root` points at it and it is missing, else the data set at `train_sam.root`."""
    pool = cfg.get("sam_synth")
    own_pool = pool is not None and Path(pool.root).resolve() == Path(ts.root).resolve()
    if ts.dataset == "synthref" and own_pool:
        from datamodules.synthetic import SynthConfig, ensure_synthref

        synth: SynthConfig = OmegaConf.to_object(pool)
        if ensure_synthref(synth, root_keys="sam_synth.root"):
            print(
                f"generated the small SAM's image pool under {synth.root} "
                f"({synth.train_images} training images, sam_synth.*)"
            )
        return
    require_folder(ts.root, ts.dataset, "train_sam.root: ")


def _warn_sam_settings(saved: dict | None, ts, out: Path) -> None:
    """Warn when the SAM kept at `out` was trained with other `train_sam.*` settings."""
    from dataclasses import asdict

    if not saved:
        return
    wanted = {k: v for k, v in asdict(ts).items() if k != "out"}
    differ = [k for k, v in wanted.items() if k in saved and saved[k] != v]
    if differ:
        import warnings

        shown = ", ".join(f"train_sam.{k}={saved[k]!r} (config: {wanted[k]!r})" for k in differ)
        warnings.warn(
            f"the small SAM at {out} was trained with other settings: {shown}. Retrain it with "
            "`svp train-sam --force`, or set train_sam.out to another file.",
            stacklevel=2,
        )


# ------------------------------------------------------------------------------ superpixels
def source_config(cfg: DictConfig) -> dict:
    return _plain(cfg.superpixels)


def cache_splits(cfg: DictConfig, splits: list[str] | None = None) -> list[str]:
    return list(splits) if splits else [cfg.data.train_split, *cfg.data.eval_splits]


def run_precompute(cfg: DictConfig, splits: list[str] | None = None, progress: bool = True):
    from common.threads import use_threads
    from datamodules.ris import RISDataModule
    from datamodules.superpixels.precompute import by_image_set, precompute_superpixels

    # SAM inference on another thread count can flip a mask at the stability threshold
    use_threads(cfg.trainer.threads, "trainer.threads")
    require_data(cfg)
    datasets = [_refer(cfg, s) for s in cache_splits(cfg, splits)]
    if splits is None and cfg.data.get("mix"):  # and the train splits of every mixed data set
        mixed = RISDataModule(cfg, None).superpixel_datasets()
        datasets += [ds for ds in mixed if ds.dataset != cfg.data.dataset]
    t = cfg.trainer
    for group in by_image_set(datasets, source_config(cfg)):
        cache_dir, summary = precompute_superpixels(
            group,
            source_config(cfg),
            cfg.cache.root,
            shard_size=cfg.cache.shard_size,
            accelerator=t.accelerator,
            devices=t.devices,
            strategy=t.strategy,
            num_nodes=t.num_nodes,
            progress=progress,
        )
        print(f"superpixel cache: {cache_dir}")
    return cache_dir, summary


def _sources_for(cfg: DictConfig, names: list[str]) -> dict[str, Any]:
    from datamodules.superpixels import SOURCES, build_source
    from lightning_modules.cli.config import load_config

    sources = {}
    for name in names:
        if name not in SOURCES:
            raise ConfigError(f"unknown superpixel source '{name}'; choose from {sorted(SOURCES)}")
        groups = [f"{k}={v}" for k, v in cfg.groups.items() if k != "superpixels"]
        node = (
            cfg.superpixels
            if name == cfg.superpixels.name
            else load_config([*groups, f"superpixels={name}"]).superpixels
        )
        sources[name] = build_source(_plain(node))
    return sources


def run_superpixel_quality(
    cfg: DictConfig, sources: list[str], split: str = "val", limit: int | None = None
) -> str:
    from datamodules.superpixels.quality import evaluate_sources, format_quality_table

    require_data(cfg)
    rows = evaluate_sources(_refer(cfg, split), _sources_for(cfg, sources), limit, progress=True)
    table = format_quality_table(rows)
    print(table)
    return table


def run_superpixel_show(
    cfg: DictConfig, split: str = "val", count: int = 6, out: str | None = None
) -> list[Path]:
    from datamodules.superpixels.show import write_overlays

    require_data(cfg)
    ds = _refer(cfg, split)
    name = cfg.superpixels.name
    src = _sources_for(cfg, [name])[name]
    folder = Path(out) if out else Path(cfg.runs_root) / "superpixels" / name
    paths = write_overlays(ds, src, folder, list(ds.image_ids[:count]))
    print(f"wrote {len(paths)} overlays to {folder}")
    return paths


# ------------------------------------------------------------------------------ sweeps
def _trial_base(cfg: DictConfig) -> dict:
    """The sweep command's own config, resolved and without its run_dir: each trial's
    overrides go on top of it."""
    base = OmegaConf.to_container(cfg, resolve=True)
    base.pop("run_dir", None)
    return base


def make_train_fn(cfg: DictConfig):
    """A sweep's trial runner: the sweep command's own config + the trial's overrides → `train`."""
    from lightning_modules.cli.config import rebase_config
    from lightning_modules.cli.train import train

    base = _trial_base(cfg)

    def train_fn(overrides: list[str], run_dir: Path, callbacks: list) -> dict:
        trial_cfg = rebase_config(base, [*overrides, f"run_dir={run_dir}"], "sweep base config")
        if trial_cfg.projector.name == "semantic":
            run_precompute(trial_cfg, progress=False)
        return train(trial_cfg, callbacks=callbacks, progress=False)

    return train_fn


def check_sweep(cfg: DictConfig) -> None:
    """The worker's settings and every config a trial of the space can compose (`trial_overrides`),
    checked before the study is made: a wrong key or value fails at once, naming the trial's
    overrides, instead of in every trial."""
    from lightning_modules.cli.config import rebase_config
    from sweeps.space import trial_overrides
    from sweeps.study import worker_space

    sweep = cfg.sweep
    space = worker_space(OmegaConf.to_object(sweep))
    base = _trial_base(cfg)
    for overrides in trial_overrides(space):
        try:
            check_values(rebase_config(base, overrides, "sweep base config"))
        except ConfigError as err:
            raise ConfigError(
                f"sweep space '{sweep.space}', a trial with overrides {' '.join(overrides)}: {err}"
            ) from None


def run_sweep_command(cfg: DictConfig):
    """Run the sweep and write its report; a `SweepIncomplete` error (after the report) when no
    trial completed or trials are left unfinished."""
    from sweeps.report import pareto_report
    from sweeps.study import run_sweep, study_size, unfinished

    check_sweep(cfg)
    sweep_cfg = OmegaConf.to_object(cfg.sweep)
    study = run_sweep(sweep_cfg, make_train_fn(cfg), progress=True)
    out_dir = Path(cfg.runs_root) / study.study_name
    paths = pareto_report(study, out_dir, **report_context(cfg))
    _print_where(paths, out_dir)
    problem = unfinished(study, study_size(sweep_cfg))
    if problem:
        raise SweepIncomplete(problem)
    return study


def report_context(cfg: DictConfig) -> dict:
    """What a sweep report names beside its trials: the largest-object baseline on the first
    eval split (the cIoU a model that ignores the sentence can reach) and the space's training
    budget (its base overrides)."""
    from lightning_modules.cli.config import rebase_config
    from sweeps.space import load_space

    out: dict = {}
    try:
        out["budget"] = list(load_space(cfg.sweep.space).base_overrides)
        trial = rebase_config(OmegaConf.to_container(cfg, resolve=True), out["budget"])
    except ConfigError:
        return out
    baseline = largest_object_baseline(trial)
    if baseline is not None:
        out["baseline"] = baseline
    return out


def largest_object_baseline(cfg: DictConfig, split: str | None = None) -> tuple[str, float] | None:
    """The largest-object baseline's cIoU on `split`'s test sentences (default: the first eval
    split; `data.limit_test_sentences`), named; None without that split or data."""
    from datamodules.ris import _limit
    from lightning_modules.cli.bench import baseline_predictions
    from lightning_modules.metrics import ciou

    if split is None and not cfg.data.eval_splits:
        return None
    split = split or cfg.data.eval_splits[0]
    try:
        refer = _refer(cfg, split)
    except DataError:
        return None
    preds, targets = baseline_predictions(refer, "largest_object")
    keep = _limit(range(len(preds)), cfg.data.limit_test_sentences, cfg.seed)
    preds, targets = [preds[i] for i in keep], [targets[i] for i in keep]
    return f"largest object ({split})", ciou(preds, targets)


def run_runs_report(cfg: DictConfig, folder: str, out: str | None = None) -> dict:
    """`svp report --runs <folder>`: the runs under it summarised over their seeds."""
    from sweeps.report import FRONT_SPLITS, runs_report

    found = {split: largest_object_baseline(cfg, split) for split in FRONT_SPLITS}
    baselines = {split: b[1] for split, b in found.items() if b is not None}
    paths = runs_report(folder, out or folder, baselines)
    print(Path(paths["markdown"]).read_text())
    print("\nreport files:")
    for k, v in paths.items():
        print(f"  {k}: {v}")
    return paths


def run_report(cfg: DictConfig) -> dict:
    from sweeps.report import load_study, pareto_report

    name = cfg.sweep.name
    study = load_study(name, storage=cfg.sweep.storage, runs_root=cfg.runs_root)
    out_dir = Path(cfg.runs_root) / name
    paths = pareto_report(study, out_dir, **report_context(cfg))
    _print_where(paths, out_dir)
    return paths


def _print_where(paths: dict, out_dir: Path) -> None:
    print("\nreport files:")
    for k, v in paths.items():
        print(f"  {k}: {v}")
    print(f"TensorBoard: tensorboard --logdir {out_dir}")


# ------------------------------------------------------------------------------ bench/demo
def run_bench(
    cfg: DictConfig,
    projectors: list[str] | None = None,
    repeats: int = 3,
    baselines: bool = True,
    profile: bool = False,
) -> None:
    from lightning_modules.cli.bench import projector_bench

    print(projector_bench(cfg, projectors, repeats, baselines, profile))


# What `svp demo` changes in the tiny preset to fit its budget on 2 CPU cores (docs/RESULTS.md).
# The demo's small SAM has its own file, so a short demo never stands in for the tiny preset's
# full 1,500-step SAM; every later stage (superpixel cache, mask decoder, vision
# tower) keys on that file and follows it.
DEMO_OVERRIDES = (
    "sweep.space=demo_grid",
    "sweep.name=demo",
    "train_sam.max_steps=200",
    "train_sam.val_limit=150",
    "train_sam.out=${runs_root}/demo/sam/sam_small.pth",
    # the demo's SAM trains on SynthRef itself, not on the preset's 3× image pool (`sam_synth`)
    "train_sam.root=${data.root}",
    "superpixels.points_per_side=8",
    # the 200-step SAM's stability scores are lower: at 0.5 it keeps ~2 masks per image (ASA 0.89),
    # at 0.2 ~13 (ASA 0.94), measured on 30 val images
    "superpixels.stability_score_thresh=0.2",
)


def run_demo(cfg: DictConfig) -> None:
    """SynthRef → small SAM → superpixels → short projector grid → report (cached stages skip)."""
    from datamodules.synthetic import SynthConfig, ensure_synthref

    check_sweep(cfg)  # before the stages: a wrong override fails in seconds, not after them
    t0 = time.time()
    stages: list[tuple[str, float]] = []

    def stage(name: str, start: float) -> None:
        stages.append((name, time.time() - start))
        print(f"[demo] {name}: {stages[-1][1] / 60:.1f} min")

    s = time.time()
    synth: SynthConfig = OmegaConf.to_object(cfg.synth)
    if not ensure_synthref(synth):
        print(f"[demo] SynthRef found under {synth.root}; skipping generation")
    from datamodules.refer import stats_table

    print(stats_table(cfg.data.root, cfg.data.dataset, cfg.data.split_by))
    stage("synthref", s)

    s = time.time()
    run_train_sam(cfg)
    stage("train-sam", s)

    s = time.time()
    run_precompute(cfg)
    stage("precompute", s)

    s = time.time()
    study = run_sweep_command(cfg)
    stage("sweep", s)
    total = (time.time() - t0) / 60
    print(
        f"[demo] done in {total:.1f} min; study '{study.study_name}' under "
        f"{Path(cfg.runs_root) / study.study_name}"
    )
