"""Sweeps with a fake train_fn: studies, resuming, parallel workers, failures, pruning, reports."""

from __future__ import annotations

import csv
import json
import math
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from common.errors import ConfigError
from sweeps import SweepConfig, load_space, load_study, pareto_report, run_sweep, suggest
from sweeps.space import GRID_PARAM, available_spaces, override_value, trial_overrides
from sweeps.study import SURPLUS, _Objective, slot_holders

optuna.logging.set_verbosity(optuna.logging.ERROR)

BUDGET_KEYS = {
    "pool": "projector.k",
    "c_abstractor": "projector.k",
    "ldpv2": "projector.k",
    "resampler": "projector.num_queries",
    "tokenpacker": "projector.s",
    "semantic": "projector.max_tokens",
}
SMALL_GRID = """
base_overrides: [preset=tiny]
grid:
  - {projector: mlp}
  - {projector: pool, projector.k: 2}
  - {projector: pool, projector.k: 4}
  - {projector: resampler, projector.num_queries: 8}
  - {projector: semantic, projector.max_tokens: 16}
  - {projector: semantic, projector.max_tokens: 32}
"""


def fake_train(overrides: list[str], run_dir: Path, callbacks: list) -> dict:
    """Deterministic metrics from the overrides: cIoU rises with the visual-token count."""
    projector = override_value(overrides, "projector") or "semantic"
    budget = override_value(overrides, BUDGET_KEYS.get(projector, "-"))
    if projector in ("pool", "c_abstractor", "ldpv2"):
        tokens = float(budget or 4) ** 2
    elif projector == "tokenpacker":
        tokens = (8 / float(budget or 2)) ** 2
    elif projector == "mlp":
        tokens = 64.0
    else:
        tokens = float(budget or 16) * (0.75 if projector == "semantic" else 1.0)
    lr = float(override_value(overrides, "optim.lr") or 1e-3)
    ciou = 0.2 + 0.08 * math.log2(tokens) - 0.01 * abs(math.log10(lr) + 3)
    (run_dir / "done.txt").write_text(" ".join(overrides))
    return {
        "val_ciou": ciou,
        "val_giou": ciou + 0.02,
        "testA_ciou": ciou + 0.05,
        "testA_giou": ciou + 0.06,
        "testB_ciou": ciou - 0.05,
        "testB_giou": ciou - 0.04,
        "tokens_mean": tokens,
        "tokens_p95": tokens,
        "train_minutes": 0.01,
        "projector": projector,
        "token_budget": f"{BUDGET_KEYS.get(projector, 'n')}={budget}",
    }


def _cfg(tmp_path: Path, space: str | Path, **kw) -> SweepConfig:
    return SweepConfig(
        **{"name": "s", "space": str(space), "runs_root": str(tmp_path / "runs"), **kw}
    )


def _space_file(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _configs(study: optuna.Study, state: TrialState = TrialState.COMPLETE) -> list[tuple]:
    return [tuple(t.user_attrs["overrides"]) for t in study.get_trials(states=(state,))]


def test_multi_objective_study_and_report(tmp_path, capsys):
    study = run_sweep(_cfg(tmp_path, "compare_projectors", n_trials=3), fake_train, progress=False)
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    for t in trials:
        run_dir = Path(t.user_attrs["run_dir"])
        metrics = t.user_attrs["metrics"]
        assert run_dir.name == f"trial-{t.number:04d}-{metrics['projector']}"
        assert (run_dir / "done.txt").read_text() == " ".join(t.user_attrs["overrides"])
        assert t.values == [metrics["val_ciou"], metrics["tokens_mean"]]
        assert t.user_attrs["overrides"][0].startswith("projector=")

    paths = pareto_report(study, tmp_path / "report")
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    with paths["trials"].open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["trial"]) for r in rows] == [0, 1, 2]
    assert {r["state"] for r in rows} == {"COMPLETE"}
    assert float(rows[0]["val_ciou"]) == pytest.approx(trials[0].user_attrs["metrics"]["val_ciou"])
    with paths["pareto"].open() as f:
        front = {int(r["trial"]) for r in csv.DictReader(f)}
    assert front == {t.number for t in study.best_trials}
    markdown = paths["markdown"].read_text()
    assert "## Pareto front" in markdown and "| val cIoU | val gIoU |" in markdown
    assert markdown.strip() in capsys.readouterr().out


def test_report_names_the_baseline_and_the_budget(tmp_path):
    study = run_sweep(_cfg(tmp_path, "compare_projectors", n_trials=3), fake_train, progress=False)
    values = sorted(t.user_attrs["metrics"]["val_ciou"] for t in study.trials)
    below = [t.number for t in study.trials if t.user_attrs["metrics"]["val_ciou"] <= values[1]]
    budget = ["trainer.max_epochs=1", "data.limit_train_sentences=4800"]
    baseline = ("largest object (val)", values[1])
    paths = pareto_report(study, tmp_path / "r", echo=False, baseline=baseline, budget=budget)
    markdown = paths["markdown"].read_text()
    assert "Every trial trains with: `trainer.max_epochs=1 data.limit_train_sentences=4800`." in (
        markdown
    )
    listed = ", ".join(str(n) for n in below)
    assert (
        f"Baseline: largest object (val), val cIoU {values[1]:.4f}; trials at or below it: "
        f"{listed}." in markdown
    )
    top = ("largest object (val)", values[0] - 0.01)
    paths = pareto_report(study, tmp_path / "r", echo=False, baseline=top)
    assert "every trial is above it." in paths["markdown"].read_text()


def test_resume_adds_missing_trials(tmp_path):
    first = run_sweep(_cfg(tmp_path, "compare_projectors", n_trials=3), fake_train, progress=False)
    params = [t.params for t in first.trials]
    study = run_sweep(_cfg(tmp_path, "compare_projectors", n_trials=5), fake_train, progress=False)
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert [t.params for t in study.trials[:3]] == params
    again = run_sweep(_cfg(tmp_path, "compare_projectors", n_trials=5), fake_train, progress=False)
    assert len(again.trials) == 5


def test_resume_with_another_space_is_an_error(tmp_path):
    run_sweep(_cfg(tmp_path, "compare_projectors", n_trials=1), fake_train, progress=False)
    with pytest.raises(ConfigError, match="compare_projectors"):
        run_sweep(_cfg(tmp_path, "tune_lr", n_trials=1), fake_train, progress=False)


def test_grid_runs_each_config_once(tmp_path):
    space = load_space("compare_grid")
    study = run_sweep(_cfg(tmp_path, "compare_grid"), fake_train, progress=False)
    expected = sorted(space.base_overrides + g for g in space.grid)
    assert sorted(_configs(study)) == expected
    assert len(study.trials) == len(space.grid)
    run_sweep(_cfg(tmp_path, "compare_grid"), fake_train, progress=False)
    assert len(study.trials) == len(space.grid)


def _worker(cfg: SweepConfig) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)

    def slow_train(overrides, run_dir, callbacks):
        time.sleep(0.05)
        return fake_train(overrides, run_dir, callbacks)

    run_sweep(cfg, slow_train, progress=False)


@pytest.mark.parametrize("sampler", ["grid", pytest.param("random", marks=pytest.mark.slow)])
def test_two_workers_share_the_trials(tmp_path, sampler):
    text = SMALL_GRID
    if sampler == "random":
        text = "sampler: random\nn_trials: 6\nparams:\n  x: {float: [0.0, 1.0]}\n"
    space = _space_file(tmp_path, text)
    ctx = mp.get_context("spawn")
    workers = [
        ctx.Process(target=_worker, args=(_cfg(tmp_path, space, worker=i),)) for i in range(2)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    study = load_study("s", runs_root=tmp_path / "runs")
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 6
    assert len({t.number for t in study.trials}) == len(study.trials)
    assert all(t.user_attrs.get(SURPLUS) for t in study.trials if t.state != TrialState.COMPLETE)
    assert len(set(_configs(study))) == 6
    if sampler == "grid":
        assert {t.params[GRID_PARAM] for t in done} == set(range(6))


def test_failed_trial_is_recorded_retried_and_the_study_goes_on(tmp_path):
    space = _space_file(tmp_path, SMALL_GRID)
    failures = []

    def flaky(overrides, run_dir, callbacks):
        if "projector=resampler" in overrides and not failures:
            failures.append(run_dir)
            raise RuntimeError("out of memory")
        return fake_train(overrides, run_dir, callbacks)

    study = run_sweep(_cfg(tmp_path, space), flaky, progress=False)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1 and failed[0].user_attrs["error"] == "RuntimeError: out of memory"
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params == failed[0].params
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 6
    assert len(set(_configs(study))) == 6
    report = pareto_report(study, tmp_path / "report", echo=False)
    assert "RuntimeError: out of memory" in report["markdown"].read_text()


def test_failed_trial_without_retry_stays_failed(tmp_path):
    space = _space_file(tmp_path, SMALL_GRID)

    def broken_pool(overrides, run_dir, callbacks):
        if "projector=pool" in overrides:
            raise ValueError("bad budget")
        return fake_train(overrides, run_dir, callbacks)

    study = run_sweep(_cfg(tmp_path, space, max_retry=0), broken_pool, progress=False)
    assert len(study.trials) == 6
    assert len(study.get_trials(states=(TrialState.FAIL,))) == 2
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4


def test_trial_interrupted_by_ctrl_c_reruns_on_resume(tmp_path):
    space = _space_file(tmp_path, SMALL_GRID)
    calls = []

    def interrupted_once(overrides, run_dir, callbacks):
        calls.append(overrides)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return fake_train(overrides, run_dir, callbacks)

    cfg = _cfg(tmp_path, space, max_retry=0)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, interrupted_once, progress=False)
    study = run_sweep(cfg, interrupted_once, progress=False)
    assert [t.state for t in study.trials[:2]] == [TrialState.COMPLETE, TrialState.FAIL]
    assert study.trials[2].params == study.trials[1].params
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 6
    assert len(set(_configs(study))) == 6


def _dying_worker(cfg: SweepConfig) -> None:
    optuna.logging.set_verbosity(optuna.logging.CRITICAL)
    run_sweep(cfg, lambda overrides, run_dir, callbacks: os._exit(3), progress=False)


def _worker_dies(target, cfg: SweepConfig) -> None:
    """Run `target(cfg)` in a worker process that exits with 3 mid-trial, then wait past the
    grace period (1 s in these configs), so its trial is stale."""
    dead = mp.get_context("spawn").Process(target=target, args=(cfg,))
    dead.start()
    dead.join(60)
    assert dead.exitcode == 3
    time.sleep(2.5)


def test_stale_trial_of_a_dead_worker_is_retried(tmp_path):
    space = _space_file(tmp_path, SMALL_GRID)
    cfg = _cfg(tmp_path, space, heartbeat_interval=1, grace_period=1)
    _worker_dies(_dying_worker, cfg)
    study = run_sweep(cfg, fake_train, progress=False)
    stale = study.trials[0]
    assert stale.state == TrialState.FAIL
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 6
    assert len(set(_configs(study))) == 6
    assert any(t.system_attrs.get("failed_trial") == 0 for t in study.trials)


def _dies_before_its_second_draw(cfg: SweepConfig) -> None:
    """A worker that dies in its second trial after the grid sampler gave the trial its grid
    point and before the trial drew its params from it."""
    import sweeps.study

    optuna.logging.set_verbosity(optuna.logging.CRITICAL)
    calls = []

    def suggest(trial, space):
        calls.append(trial.number)
        if len(calls) == 2:
            os._exit(3)
        return sweeps.space.suggest(trial, space)

    sweeps.study.suggest = suggest
    run_sweep(cfg, fake_train, progress=False)


def test_grid_trial_killed_before_drawing_its_point_reruns_that_point(tmp_path):
    space = _space_file(tmp_path, SMALL_GRID)
    cfg = _cfg(tmp_path, space, heartbeat_interval=1, grace_period=1)
    _worker_dies(_dies_before_its_second_draw, cfg)
    died = load_study("s", runs_root=tmp_path / "runs").trials[1]
    assert died.state == TrialState.RUNNING and not died.params and "grid_id" in died.system_attrs
    study = run_sweep(cfg, fake_train, progress=False)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 6 and len(set(_configs(study))) == 6
    assert sorted(t.params[GRID_PARAM] for t in done) == list(range(6))
    rerun = [t for t in done if t.system_attrs.get("failed_trial") == 1]
    assert len(rerun) == 1 and rerun[0].system_attrs["grid_id"] == died.system_attrs["grid_id"]


def _slow_worker(cfg: SweepConfig) -> None:
    optuna.logging.set_verbosity(optuna.logging.CRITICAL)

    def slow_train(overrides, run_dir, callbacks):
        (run_dir / "started.txt").write_text(" ".join(overrides))
        time.sleep(0.4)
        return fake_train(overrides, run_dir, callbacks)

    run_sweep(cfg, slow_train, progress=False)


def test_sweep_killed_then_rerun_equals_an_uninterrupted_sweep(tmp_path):
    """SIGKILL a sweep worker in the middle of a trial; the rerun (once the dead trial's grace
    period has passed) completes the same set of trials as a sweep that ran through, none twice."""
    space = _space_file(tmp_path, SMALL_GRID)
    whole = run_sweep(_cfg(tmp_path / "whole", space), fake_train, progress=False)
    cfg = _cfg(tmp_path / "killed", space, heartbeat_interval=1, grace_period=1)
    worker = mp.get_context("spawn").Process(target=_slow_worker, args=(cfg,))
    worker.start()
    runs = tmp_path / "killed" / "runs"
    deadline = time.monotonic() + 120
    while len(list(runs.rglob("started.txt"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(worker.pid, signal.SIGKILL)  # while its third trial trains
    worker.join(30)
    assert worker.exitcode == -signal.SIGKILL
    killed = load_study("s", runs_root=runs)
    assert len(killed.get_trials(states=(TrialState.COMPLETE,))) == 2
    time.sleep(2.5)  # past the grace period: the dead worker's trial is stale
    study = run_sweep(cfg, fake_train, progress=False)
    assert sorted(_configs(study)) == sorted(_configs(whole))
    assert len(_configs(study)) == 6
    values = {tuple(t.user_attrs["overrides"]): t.values for t in whole.trials}
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        assert trial.values == values[tuple(trial.user_attrs["overrides"])]


def test_surplus_trial_is_failed_before_training_and_ignored(tmp_path):
    cfg = _cfg(tmp_path, "compare_projectors", n_trials=1)
    study = run_sweep(cfg, fake_train, progress=False)
    objective = _Objective(load_space("compare_projectors"), fake_train, tmp_path / "x", 1)
    study.optimize(objective, n_trials=1, catch=(Exception,))
    late = study.trials[-1]
    assert late.state == TrialState.FAIL and late.user_attrs[SURPLUS] and not late.params
    assert not (tmp_path / "x").exists()
    assert len(slot_holders(study.trials)) == 1
    report = pareto_report(study, tmp_path / "report", echo=False)
    with report["trials"].open() as f:
        assert len(list(csv.DictReader(f))) == 1


def test_suggest_samples_conditional_params():
    space = load_space("compare_projectors")
    study = optuna.create_study(
        directions=list(space.directions), sampler=optuna.samplers.RandomSampler(seed=0)
    )
    seen = set()
    for _ in range(60):
        overrides = suggest(study.ask(), space)
        keys = [o.split("=")[0] for o in overrides]
        projector = override_value(overrides, "projector")
        seen.add(projector)
        assert keys[0] == "projector" and "optim.lr" in keys
        budget = BUDGET_KEYS.get(projector)
        assert [k for k in keys if k.startswith("projector.")] == ([budget] if budget else [])
        assert ("superpixels" in keys) == (projector == "semantic")
        lr = float(override_value(overrides, "optim.lr"))
        assert 1e-4 <= lr <= 1e-2
    assert len(seen) == 7


def test_pruning_callback_prunes_a_worse_trial(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    import torch

    space = _space_file(
        tmp_path,
        "directions: [maximize]\nmetrics: [val_ciou]\nsampler: random\nn_trials: 3\n"
        "pruning: {n_startup_trials: 2, n_warmup_steps: 0}\n"
        "params:\n  optim.lr: {float: [1.0e-4, 1.0e-2], log: true}\n",
    )
    scores = iter([0.9, 0.8, 0.1])

    class Tiny(pl.LightningModule):
        def __init__(self, score):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)
            self.score = score

        def training_step(self, batch, _):
            return self.layer(batch[0]).pow(2).mean()

        def validation_step(self, batch, _):
            self.log("val/ciou", self.score)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def train(overrides, run_dir, callbacks):
        score = next(scores)
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)))
        trainer = pl.Trainer(
            max_epochs=3,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_train_batches=1,
            limit_val_batches=1,
            default_root_dir=run_dir,
        )
        trainer.fit(Tiny(score), data, data)
        return {"val_ciou": score, "tokens_mean": 16.0, "projector": "semantic"}

    study = run_sweep(_cfg(tmp_path, space), train, progress=False)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2 + [TrialState.PRUNED]
    assert study.trials[0].intermediate_values == pytest.approx({0: 0.9, 1: 0.9, 2: 0.9})
    assert study.trials[2].intermediate_values == {0: pytest.approx(0.1)}
    report = pareto_report(study, tmp_path / "report", echo=False)
    assert "PRUNED" in report["markdown"].read_text()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("params: {x: {int: [1, 2], lgo: true}}", "unknown key 'params.x.lgo'"),
        ("params: {x: {int: [1, 2]}}\nsamplr: tpe", "unknown key 'samplr'"),
        ("params: {x: {int: [3, 2]}}", "params.x.int: expected [low, high]"),
        ("params: {x: {float: [0.0, 1.0], log: true}}", "positive lower bound"),
        ("params: {x: {int: [1, 2], when: {p: a}}}", "params.x.when: 'p'"),
        ("params: {p: {choices: [a]}, x: {int: [1, 2], when: {p: b}}}", "'b' is not among"),
        ("params: {x: {choices: [a]}}\npruning: true", "multi-objective studies cannot prune"),
        ("params: {x: {choices: [a]}}\nmetrics: [val_ciou]", "one metric per direction"),
        ("params: {x: {choices: [a]}}\nmetrics: [ciou, tokens_mean]", "unknown 'ciou'"),
        ("grid: [{projector: mlp}]\nn_trials: 2", "exceeds the 1 grid configs"),
        ("grid: [{projector: mlp}, {projector: mlp}]", "grid[1] repeats grid[0]"),
        ("grid: [{projector: mlp}]\nsampler: tpe", "sampler: 'grid'"),
        ("params: {x: {choices: [a]}}\ngrid: [{projector: mlp}]", "exactly one of `params`"),
        ("params: [oops", "not valid YAML"),
    ],
)
def test_load_space_errors_name_the_key(tmp_path, text, message):
    path = _space_file(tmp_path, text + ("" if "n_trials" in text else "\nn_trials: 4"))
    with pytest.raises(ConfigError) as err:
        load_space(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_load_space_unknown_name_lists_spaces():
    with pytest.raises(ConfigError) as err:
        load_space("nope")
    assert "compare_projectors" in str(err.value) and "tune_lr" in str(err.value)


@pytest.mark.parametrize("name", available_spaces())
def test_every_shipped_space_composes_into_run_configs(name):
    """Each configs/sweep/*.yaml loads, and every trial it can make is a valid run config: each
    grid entry, and each parameter's choices or bounds over the base overrides."""
    from lightning_modules.cli.config import load_config

    space = load_space(name)
    assert space.n_trials >= 1
    trials = trial_overrides(space)
    assert len(trials) >= max(len(space.grid), len(space.params))
    for overrides in trials:
        load_config(overrides)
    if name == "demo_grid":  # `make demo`: the MLP and each compressive projector once
        from lightning_modules.projectors import PROJECTORS

        projectors = [dict(o.split("=", 1) for o in trial)["projector"] for trial in space.grid]
        assert sorted(projectors) == sorted(set(PROJECTORS) - {"resampler", "c_abstractor"})


def test_load_study_lists_existing_studies(tmp_path):
    run_sweep(_cfg(tmp_path, "compare_projectors", n_trials=1), fake_train, progress=False)
    assert load_study("s", runs_root=tmp_path / "runs").study_name == "s"
    with pytest.raises(ConfigError, match="Studies under .*: s\\."):
        load_study("other", runs_root=tmp_path / "runs")


def test_unfinished_names_what_is_left(tmp_path):
    """A study is done when it holds its trials, none open, at least one completed: else the
    reason, with the counts (`svp sweep` exits 2 with it)."""
    from sweeps.study import unfinished

    done = run_sweep(_cfg(tmp_path, "compare_projectors", n_trials=2), fake_train, progress=False)
    assert unfinished(done, 2) is None
    assert "1 not started" in unfinished(done, 3)

    def broken(overrides, run_dir, callbacks):
        raise RuntimeError("training crashed")

    cfg = _cfg(tmp_path, "compare_projectors", n_trials=2, name="broken", max_retry=0)
    failed = run_sweep(cfg, broken, progress=False)
    assert "none of its 2 trials completed (2 failed)" in unfinished(failed, 2)
    failed.ask()  # a trial left RUNNING (its worker killed, within the grace period)
    study = load_study("broken", runs_root=tmp_path / "runs")
    assert "1 running" in unfinished(study, 3)


def test_zero_trials_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="sweep.n_trials=0"):
        run_sweep(_cfg(tmp_path, "compare_projectors", n_trials=0), fake_train, progress=False)
    with pytest.raises(ConfigError, match="sweep.n_trials=-1"):
        run_sweep(_cfg(tmp_path, "compare_projectors", n_trials=-1), fake_train, progress=False)


@pytest.mark.parametrize("sampler", ["grid", "random"])
def test_two_workers_share_one_postgresql_storage(tmp_path, sampler):
    """The RDB that many machines share: a throw-away PostgreSQL server (pgserver, started here
    on a local socket and stopped after) and two worker processes on it complete exactly the
    study's trials, none twice."""
    pgserver = pytest.importorskip("pgserver")
    pytest.importorskip("psycopg")
    server = pgserver.get_server(tmp_path / "pg", cleanup_mode="stop")
    try:
        url = server.get_uri()
        text = SMALL_GRID
        if sampler == "random":
            text = "sampler: random\nn_trials: 6\nparams:\n  x: {float: [0.0, 1.0]}\n"
        space = _space_file(tmp_path, text)
        ctx = mp.get_context("spawn")
        cfgs = [_cfg(tmp_path, space, worker=i, storage=url, name=sampler) for i in range(2)]
        workers = [ctx.Process(target=_worker, args=(cfg,)) for cfg in cfgs]
        for w in workers:
            w.start()
        for w in workers:
            w.join(180)
        assert [w.exitcode for w in workers] == [0, 0]
        study = load_study(sampler, storage=url)
        done = study.get_trials(states=(TrialState.COMPLETE,))
        assert len(done) == 6 and len(set(_configs(study))) == 6
        assert len({t.number for t in study.trials}) == len(study.trials)
    finally:
        server.cleanup()


def test_svp_report_writes_nothing_under_home(tmp_path):
    """`svp report` in a fresh process: matplotlib's font cache goes to the temp folder, not
    under $HOME."""
    import os
    import subprocess
    import sys

    run_sweep(_cfg(tmp_path, "compare_projectors", n_trials=2), fake_train, progress=False)
    home = tmp_path / "home"
    home.mkdir()
    repo = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), PYTHONPATH=str(repo))
    argv = [sys.executable, "-m", "lightning_modules.cli", "report", "study=s"]
    proc = subprocess.run(
        [*argv, f"runs_root={tmp_path / 'runs'}"], env=env, cwd=repo, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "runs" / "s" / "pareto.png").is_file()
    assert list(home.rglob("*")) == []


def test_runs_report_summarises_the_seeds(tmp_path):
    """`svp report --runs`: per projector and budget, the mean and the min–max over seeds."""
    from sweeps.report import runs_report

    runs = {
        ("mlp", "h*w", 0): (256.0, 0.30),
        ("mlp", "h*w", 1): (256.0, 0.40),
        ("semantic", "K<=64", 0): (20.0, 0.45),
        ("semantic", "K<=64", 1): (22.0, 0.41),
        ("pool", "k=4", 0): (16.0, 0.20),
    }
    for (projector, budget, seed), (tokens, val) in runs.items():
        run = tmp_path / "cmp" / f"{projector}-seed{seed}"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(f"seed: {seed}\n")
        metrics = {"projector": projector, "token_budget": budget, "tokens_mean": tokens}
        metrics.update(train_minutes=1.0, val_ciou=val, testA_ciou=val + 0.1, testB_ciou=val - 0.1)
        (run / "metrics.json").write_text(json.dumps(metrics))
    paths = runs_report(tmp_path / "cmp", tmp_path / "out", {"val": 0.1145, "testB": 0.0741})
    with paths["csv"].open() as f:
        rows = {r["projector"]: r for r in csv.DictReader(f)}
    assert int(rows["mlp"]["seeds"]) == 2 and float(rows["mlp"]["val_ciou"]) == pytest.approx(0.35)
    assert (float(rows["mlp"]["val_min"]), float(rows["mlp"]["val_max"])) == (0.30, 0.40)
    assert float(rows["semantic"]["tokens_mean"]) == pytest.approx(21.0)
    markdown = paths["markdown"].read_text()
    assert "Largest-object baseline: val 0.1145, testB 0.0741." in markdown
    front = [
        line.split(" | ")[0].strip("| ") for line in markdown.splitlines() if "testB |" in line
    ]
    assert front == ["pool", "semantic"]  # mlp: more tokens, lower mean cIoU than semantic
    assert "| val, testB |" in markdown
    assert paths["plot"].stat().st_size > 0
    with pytest.raises(ConfigError, match="no finished runs"):
        runs_report(tmp_path / "out", tmp_path / "none")
