"""Run an Optuna sweep: one `train_fn` call per trial, the study in an RDB storage under `runs/`.

`n_trials` counts the trials that *hold a slot* of the study: waiting, running or finished, minus
failed trials that were re-queued (their retry holds the slot) and minus surplus trials (below).
A call runs until the study holds `n_trials` and none waits, so resuming adds only what is missing
and any number of workers sharing one storage finish exactly `n_trials` between them.
Optuna's `MaxTrialsCallback` cannot promise that: it counts finished trials only (workers overshoot
by one running trial each) and its check races with other workers' trial creation. Here a trial
that finds `n_trials` slot holders numbered below it (storages number trials atomically) is a
*surplus* trial: it is failed before training, marked `surplus`, and ignored by counts and reports.
Failed trials (train_fn raised) and stale ones (a worker died; no heartbeat for `grace_period` s)
are re-queued with the same params up to `max_retry` times; trials stopped by Ctrl-C are
re-queued when the sweep is resumed.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from common.errors import ConfigError
from sweeps.space import GRID_PARAM, SearchSpace, load_space, override_value, suggest

TrainFn = Callable[[list[str], Path, list], dict]
SURPLUS = "surplus"


@dataclass
class SweepConfig:
    """One sweep worker: which space, which study and storage, and its budget.

    `overrides` are appended to the space's base overrides of every trial (e.g. `projector=pool`
    for `tune_lr`); `n_trials` None takes the space's; `timeout_minutes` is this call's wall-time
    budget (no new trial starts after it); `worker` tells parallel workers' sampler seeds apart.
    """

    name: str = "sweep"
    space: str = "compare_projectors"
    overrides: list[str] = field(default_factory=list)
    storage: str | None = None
    runs_root: str = "runs"
    n_trials: int | None = None
    timeout_minutes: float | None = None
    seed: int | None = 0
    worker: int = 0
    heartbeat_interval: int = 60
    grace_period: int | None = None
    max_retry: int = 1
    n_jobs: int = 1


class SurplusTrial(Exception):
    """A trial created after the study already held all its slots (a race between workers)."""


class RetryTrialCallback:
    """Re-queue a failed or stale trial with its params, at most `max_retry` times per lineage.

    Trials stopped by Ctrl-C (error `KeyboardInterrupt`) did not fail on their own: they are always
    re-queued (by `run_sweep` on resume), whatever `max_retry`.

    Writes Optuna's `failed_trial` / `retry_history` system attrs, so
    `optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(trial)` reads them too.
    """

    def __init__(self, max_retry: int) -> None:
        self.max_retry = max_retry

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state != TrialState.FAIL or trial.user_attrs.get(SURPLUS):
            return
        history = [*trial.system_attrs.get("retry_history", []), trial.number]
        if len(history) > self.max_retry and not _interrupted(trial):
            return
        system_attrs = {**trial.system_attrs, "failed_trial": history[0], "retry_history": history}
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.WAITING,
                params=trial.params,
                distributions=trial.distributions,
                system_attrs=system_attrs,
            )
        )


def storage_url(name: str, storage: str | None = None, runs_root: str | Path = "runs") -> str:
    """The study's storage URL: `storage`, or `sqlite:///<runs_root>/<name>/study.db`."""
    return storage or f"sqlite:///{Path(runs_root) / name / 'study.db'}"


def slot_holders(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that count towards `n_trials` (see the module docstring)."""
    retried = _retried(trials)
    return [t for t in trials if not t.user_attrs.get(SURPLUS) and t.number not in retried]


def _retried(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of the trials a later trial re-runs."""
    return {
        t.system_attrs["retry_history"][-1] for t in trials if "retry_history" in t.system_attrs
    }


def worker_space(cfg: SweepConfig) -> SearchSpace:
    """The worker's search space (`cfg.overrides` appended to its base overrides), its settings
    checked: ConfigError, naming the key, for values a sweep cannot run with."""
    space = load_space(cfg.space)
    space = replace(space, base_overrides=(*space.base_overrides, *cfg.overrides))
    if cfg.n_trials is not None and cfg.n_trials < 1:
        raise ConfigError(
            f"sweep.n_trials={cfg.n_trials}: a study needs at least one trial; leave it unset "
            f"(null) for the space's {space.n_trials}."
        )
    n_trials = study_size(cfg, space)
    if space.grid and n_trials > len(space.grid):
        raise ConfigError(
            f"sweep.n_trials={n_trials} exceeds the {len(space.grid)} configs of grid space "
            f"'{cfg.space}'; leave sweep.n_trials unset to run each config once."
        )
    if cfg.n_jobs < 1:
        raise ConfigError(f"sweep.n_jobs={cfg.n_jobs} must be at least 1 (trials run at once).")
    if cfg.worker < 0:
        raise ConfigError(f"sweep.worker={cfg.worker} must be ≥ 0 (it seeds the sampler).")
    if cfg.timeout_minutes is not None and not cfg.timeout_minutes > 0:
        raise ConfigError(f"sweep.timeout_minutes={cfg.timeout_minutes} must be > 0, or null.")
    return space


def run_sweep(cfg: SweepConfig, train_fn: TrainFn, progress: bool = True) -> optuna.Study:
    """Create or resume study `cfg.name` and run trials until it holds its `n_trials`."""
    start = time.monotonic()
    space = worker_space(cfg)
    n_trials = study_size(cfg, space)
    storage = _make_storage(cfg)
    existing = _existing_trials(storage, cfg.name)
    study = optuna.create_study(
        study_name=cfg.name,
        storage=storage,
        directions=list(space.directions),
        sampler=_make_sampler(space, cfg, existing),
        pruner=_make_pruner(space),
        load_if_exists=True,
    )
    _check_same_space(study, cfg, space)
    if existing:
        _requeue_dead_trials(study, cfg.max_retry)
    objective = _Objective(space, train_fn, Path(cfg.runs_root) / cfg.name, n_trials, storage)
    callbacks = [RetryTrialCallback(cfg.max_retry), _StopWhenFull(n_trials)]
    while (todo := _todo(study, n_trials)) > 0:
        timeout = None
        if cfg.timeout_minutes is not None:
            timeout = cfg.timeout_minutes * 60 - (time.monotonic() - start)
            if timeout <= 0:
                break
        study.optimize(
            objective,
            n_trials=todo,
            timeout=timeout,
            n_jobs=cfg.n_jobs,
            catch=(Exception,),
            callbacks=callbacks,
            show_progress_bar=progress,
        )
    if progress:
        _print_summary(study, n_trials)
    return study


class _Objective:
    def __init__(
        self,
        space: SearchSpace,
        train_fn: TrainFn,
        study_dir: Path,
        n_trials: int,
        storage: optuna.storages.RDBStorage | None = None,
    ):
        self.space = space
        self.train_fn = train_fn
        self.study_dir = study_dir
        self.n_trials = n_trials
        self.storage = storage

    def _first_heartbeat(self, trial: optuna.Trial) -> None:
        """Record the trial's heartbeat before anything else runs. Optuna's heartbeat thread
        writes its first one a moment later, and a trial whose worker dies before that has none:
        it is never found stale, and holds its slot for good."""
        storage = self.storage
        if storage is None or storage.heartbeat_interval is None:
            return
        study_id = storage.get_study_id_from_name(trial.study.study_name)
        storage.record_heartbeat(
            storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        )

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        self._first_heartbeat(trial)
        holders = slot_holders(trial.study.get_trials(deepcopy=False))
        if sum(t.number < trial.number for t in holders) >= self.n_trials:
            trial.set_user_attr(SURPLUS, True)
            raise SurplusTrial(f"the study already holds its {self.n_trials} trials; skipped")
        overrides = suggest(trial, self.space)
        projector = override_value(overrides, "projector")
        run_dir = self.study_dir / f"trial-{trial.number:04d}{f'-{projector}' if projector else ''}"
        run_dir.mkdir(parents=True, exist_ok=True)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("overrides", overrides)
        callbacks = []
        if self.space.pruning is not None:
            from sweeps.pruning import OptunaPruningCallback

            callbacks.append(OptunaPruningCallback(trial, monitor=self.space.pruning.monitor))
        try:
            metrics = self.train_fn(overrides, run_dir, callbacks)
        except optuna.TrialPruned:
            raise
        except (Exception, KeyboardInterrupt) as err:
            trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:1000])
            raise
        trial.set_user_attr("metrics", {k: _plain(v) for k, v in metrics.items()})
        missing = [m for m in self.space.metrics if m not in metrics]
        if missing:
            raise KeyError(f"train_fn returned no {missing} (it returned {sorted(metrics)})")
        values = [float(metrics[m]) for m in self.space.metrics]
        return values[0] if len(values) == 1 else values


class _StopWhenFull:
    def __init__(self, n_trials: int) -> None:
        self.n_trials = n_trials

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if _todo(study, self.n_trials) == 0:
            study.stop()


def _todo(study: optuna.Study, n_trials: int) -> int:
    """Trials this worker may still run: free slots plus re-queued trials waiting for a worker."""
    holders = slot_holders(study.get_trials(deepcopy=False))
    waiting = sum(t.state == TrialState.WAITING for t in holders)
    return max(0, n_trials - len(holders)) + waiting


def _interrupted(trial: FrozenTrial) -> bool:
    return str(trial.user_attrs.get("error", "")).startswith("KeyboardInterrupt")


def _requeue_dead_trials(study: optuna.Study, max_retry: int) -> None:
    """On resume: re-queue trials stopped by Ctrl-C, and stale ones (their worker died)."""
    trials = study.get_trials(deepcopy=False)
    retried = _retried(trials)
    retry = RetryTrialCallback(max_retry)
    for t in trials:
        if t.state == TrialState.FAIL and _interrupted(t) and t.number not in retried:
            retry(study, t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _make_storage(cfg: SweepConfig) -> optuna.storages.RDBStorage:
    url = storage_url(cfg.name, cfg.storage, cfg.runs_root)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        try:
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _storage_error(url, err) from None
        engine_kwargs["connect_args"] = {"timeout": 60}
    try:
        return _open_storage(url, engine_kwargs, cfg)
    except sqlalchemy.exc.SQLAlchemyError:
        # Workers starting together race to create the tables; the loser finds them made.
        time.sleep(1.0)
        try:
            return _open_storage(url, engine_kwargs, cfg)
        except sqlalchemy.exc.SQLAlchemyError as err:
            raise _storage_error(url, err) from None


def _storage_error(url: str, err: BaseException) -> ConfigError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ConfigError(
        f"sweep.storage: cannot open '{url}' ({reason}). Give an RDB URL such as "
        "sqlite:///runs/study.db or postgresql://user@host/db, and check that its server runs."
    )


def _open_storage(url: str, engine_kwargs: dict, cfg: SweepConfig) -> optuna.storages.RDBStorage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=cfg.heartbeat_interval,
                grace_period=cfg.grace_period,
                heartbeat_stale_trial_callback=RetryTrialCallback(cfg.max_retry),
            )
    except (
        ValueError,
        ImportError,
        optuna.exceptions.StorageInternalError,
        sqlalchemy.exc.ArgumentError,
    ) as err:
        raise _storage_error(url, err) from None


def _existing_trials(storage: optuna.storages.RDBStorage, name: str) -> int:
    try:
        return storage.get_n_trials(storage.get_study_id_from_name(name))
    except KeyError:
        return 0


def _make_sampler(
    space: SearchSpace, cfg: SweepConfig, existing: int
) -> optuna.samplers.BaseSampler:
    if space.sampler == "grid":
        # Trial number i runs grid point i of a seeded shuffle: every worker must shuffle alike.
        return optuna.samplers.GridSampler(
            {GRID_PARAM: list(range(len(space.grid)))}, seed=cfg.seed
        )
    seed = None
    if cfg.seed is not None:
        # Mix in the worker and the study's size so resumed runs and parallel workers do not
        # replay the random proposals of earlier or sibling runs.
        seed = int(np.random.SeedSequence([cfg.seed, cfg.worker, existing]).generate_state(1)[0])
    if space.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if space.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def _make_pruner(space: SearchSpace) -> optuna.pruners.BasePruner:
    if space.pruning is None:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=space.pruning.n_startup_trials,
        n_warmup_steps=space.pruning.n_warmup_steps,
    )


def _check_same_space(study: optuna.Study, cfg: SweepConfig, space: SearchSpace) -> None:
    attrs = study.user_attrs
    if "space" not in attrs:
        study.set_user_attr("space", str(cfg.space))
        study.set_user_attr("metrics", list(space.metrics))
        study.set_user_attr("directions", list(space.directions))
        return
    if attrs["space"] != str(cfg.space) or attrs["metrics"] != list(space.metrics):
        raise ConfigError(
            f"study '{cfg.name}' was created with sweep space '{attrs['space']}' "
            f"(metrics {attrs['metrics']}), not '{cfg.space}' (metrics {list(space.metrics)}). "
            "Resume it with its own space, or pick a new sweep.name."
        )


def _plain(value: Any) -> Any:
    """Tensor and numpy scalars as Python numbers, so the storage can hold them as JSON."""
    return value.item() if hasattr(value, "item") else value


def study_size(cfg: SweepConfig, space: SearchSpace | None = None) -> int:
    """The trials the study holds when done: `sweep.n_trials`, else the space's."""
    return cfg.n_trials or (space or load_space(cfg.space)).n_trials


def unfinished(study: optuna.Study, n_trials: int | None = None) -> str | None:
    """Why the study is not done, or None: no trial completed, or trials still wait, run (on
    another worker, or a dead one within its grace period) or were never started."""
    holders = slot_holders(study.get_trials(deepcopy=False))
    counts = {s: sum(t.state == s for t in holders) for s in TrialState}
    done = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
    open_ = counts[TrialState.RUNNING] + counts[TrialState.WAITING]
    missing = max(0, (n_trials or len(holders)) - len(holders))
    total = n_trials or len(holders)
    if open_ or missing:
        return (
            f"study '{study.study_name}': {open_ + missing} of {total} trials are unfinished "
            f"({counts[TrialState.RUNNING]} running, {counts[TrialState.WAITING]} waiting, "
            f"{missing} not started); rerun the same `svp sweep` to finish them (a running trial "
            "of a dead worker is retried after sweep.grace_period)."
        )
    if not done:
        return (
            f"study '{study.study_name}': none of its {total} trials completed "
            f"({counts[TrialState.FAIL]} failed); each failed trial's error is in its "
            "`error` user attribute (`svp report` lists them)."
        )
    return None


def _print_summary(study: optuna.Study, n_trials: int) -> None:
    holders = slot_holders(study.get_trials(deepcopy=False))
    counts = {s.name: sum(t.state == s for t in holders) for s in TrialState}
    summary = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
    print(f"study '{study.study_name}': {len(holders)}/{n_trials} trials ({summary or 'none'})")
    if counts["RUNNING"]:
        print(
            "  running trials belong to other workers, or to a dead one: rerun after the "
            "grace period (sweep.grace_period, default 2 x heartbeat_interval) to retry them."
        )
