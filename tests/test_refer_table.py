"""`svp eval --table`: a checkpoint on every RefCOCO/+/g split present, in the papers' layout."""

from __future__ import annotations

import csv

from conftest import tiny_run_overrides
from refer_fixture import write_synthref_as_refcoco

from lightning_modules.cli import main


def test_table_covers_every_split_present(synthref_root, tiny_sam_checkpoint, tmp_path, capsys):
    overrides = tiny_run_overrides(synthref_root, tiny_sam_checkpoint, tmp_path, "mlp")
    overrides += ["superpixels=grid", "superpixels.k=4", "trainer.max_steps=2"]
    overrides += ["trainer.limit_val_batches=1", "data.limit_test_sentences=4"]
    assert main(["train", *overrides]) == 0
    config = tmp_path / "tiny" / "mlp-seed0" / "config.yaml"
    root = write_synthref_as_refcoco(synthref_root, tmp_path / "refer")
    assert main(["eval", "--config", str(config), "--table", f"data.root={root}"]) == 0
    run = config.parent
    with open(run / "refer-table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["dataset"], r["split"]) for r in rows] == [
        ("refcoco", "val"),
        ("refcoco", "testA"),
        ("refcoco", "testB"),
        ("refcoco+", "val"),
        ("refcoco+", "testA"),
        ("refcoco+", "testB"),
        ("refcocog", "val"),
        ("refcocog", "test"),
    ]
    tokens = float(rows[0]["tokens_mean"])  # mlp: one token per patch of the tiny SAM's grid
    assert tokens == 64 and all(float(r["tokens_mean"]) == tokens for r in rows)
    assert all(0.0 <= float(r["ciou"]) <= 1.0 for r in rows)
    # every sentence of a split, whatever the run's data.limit_test_sentences
    assert int(rows[-1]["sentences"]) > 4
    table = (run / "refer-table.md").read_text()
    assert table.splitlines()[0].startswith("| | RefCOCO val | RefCOCO testA | RefCOCO testB |")
    assert "| cIoU |" in table and "RefCOCOg test" in table
    # RefCOCO and RefCOCO+ share the images: the same cIoU on the same refs
    assert rows[0]["ciou"] == rows[3]["ciou"]


def test_table_without_refer_data_is_a_clear_error(synthref_root, tmp_path, capsys):
    assert main(["eval", "--table", f"data.root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "refcoco/refs(unc).p" in err
