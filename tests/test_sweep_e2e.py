"""A real 3-trial study on tiny data: `svp sweep` → report files → both notebooks execute."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import nbformat
import pytest
import yaml
from conftest import tiny_run_overrides
from nbclient import NotebookClient

from lightning_modules.cli.config import load_config
from lightning_modules.cli.stages import run_report, run_sweep_command

REPO = Path(__file__).resolve().parent.parent


def _execute(notebook: str, env: dict[str, str]) -> None:
    old = dict(os.environ)
    os.environ.update(env)
    try:
        nb = nbformat.read(REPO / "notebooks" / notebook, as_version=4)
        client = NotebookClient(
            nb,
            timeout=600,
            kernel_name="python3",
            resources={"metadata": {"path": str(REPO / "notebooks")}},
        )
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(old)


@pytest.mark.slow
def test_three_trial_study_report_and_notebooks(synthref_root, tiny_sam_checkpoint, tmp_path):
    space = tmp_path / "tiny_grid.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "directions": ["maximize", "minimize"],
                "metrics": ["val_ciou", "tokens_mean"],
                "grid": [
                    {"projector": "mlp"},
                    {"projector": "pool", "projector.k": 2},
                    {
                        "projector": "semantic",
                        "projector.max_tokens": 8,
                        "superpixels": "grid",
                        "superpixels.k": 4,
                    },
                ],
            }
        )
    )
    runs = tmp_path / "runs"
    cfg = load_config(
        [
            *tiny_run_overrides(synthref_root, tiny_sam_checkpoint, runs),
            "trainer.limit_train_batches=2",
            "sweep.name=tiny",
            f"sweep.space={space}",
        ]
    )
    study = run_sweep_command(cfg)
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 3
    out = runs / "tiny"
    for name in ("report.md", "trials.csv", "pareto.csv", "pareto.png"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert sorted(r["projector"] for r in rows) == ["mlp", "pool", "semantic"]
    by = {r["projector"]: r for r in rows}
    assert float(by["pool"]["tokens_mean"]) == 4.0
    assert float(by["semantic"]["tokens_mean"]) <= 8.0
    for r in rows:
        assert Path(r["run_dir"], "config.yaml").is_file()
        assert any(Path(r["run_dir"], "tb").iterdir())
    assert "semantic" in (out / "report.md").read_text()

    # `svp report study=tiny` rebuilds the same files from storage alone
    (out / "report.md").unlink()
    run_report(load_config([f"runs_root={runs}", "sweep.name=tiny"]))
    assert (out / "report.md").is_file()

    env = {
        "SVP_STUDY": "tiny",
        "SVP_RUNS_ROOT": str(runs),
        "SVP_DATA_ROOT": str(synthref_root),
        "SVP_SAM_CHECKPOINT": str(tiny_sam_checkpoint),
        "SVP_N_IMAGES": "2",
        "SVP_N_STATS": "4",
    }
    _execute("pareto.ipynb", env)
    _execute("superpixels.ipynb", env)
