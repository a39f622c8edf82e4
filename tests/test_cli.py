"""`svp` entry points: help texts, error exits, synth + data stats end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lightning_modules.cli import build_parser, main

SUBCOMMANDS = [
    ["synth"],
    ["data", "stats"],
    ["train-sam"],
    ["precompute"],
    ["align"],
    ["superpixels", "quality"],
    ["superpixels", "show"],
    ["train"],
    ["eval"],
    ["sweep"],
    ["report"],
    ["bench"],
    ["demo"],
]


def test_svp_help_console_script():
    out = subprocess.run(
        [sys.executable, "-m", "lightning_modules.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for cmd in ("synth", "data", "train-sam", "precompute", "superpixels", "train", "sweep"):
        assert cmd in out


@pytest.mark.parametrize("argv", SUBCOMMANDS, ids=lambda a: " ".join(a))
def test_each_subcommand_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*argv, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "usage: svp" in out


def test_synth_help_documents_every_option(capsys):
    from dataclasses import fields

    from datamodules.synthetic import SynthConfig

    with pytest.raises(SystemExit):
        build_parser().parse_args(["synth", "--help"])
    out = capsys.readouterr().out
    for f in fields(SynthConfig):
        assert "--" + f.name.replace("_", "-") in out


def test_synth_then_stats(tmp_path, capsys):
    root = tmp_path / "d"
    args = [
        "synth",
        "--root",
        str(root),
        "--train-images",
        "6",
        "--val-images",
        "3",
        "--testA-images",
        "2",
        "--testB-images",
        "2",
        "--image-size",
        "64",
        "--quiet",
    ]
    assert main(args) == 0
    assert (root / "synthref" / "refs(unc).p").is_file()
    assert main(args) == 2  # exists: refuses without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--skip-existing"]) == 0
    # other settings than the existing data set's: not skipped silently
    other = [a if a != "6" else "7" for a in args]
    assert main([*other, "--skip-existing"]) == 2
    assert "train 6 (config: 7)" in capsys.readouterr().err
    assert main(["data", "stats", "--root", str(root), "--dataset", "synthref"]) == 0
    out = capsys.readouterr().out
    for split in ("train", "val", "testA", "testB"):
        assert split in out


def test_bad_input_exits_nonzero_with_message(tmp_path, capsys):
    assert main(["data", "stats", "--root", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing" in err
    assert main(["train", "trainer.max_epoch=1"]) == 2
    assert "trainer.max_epoch" in capsys.readouterr().err
    for cmd in ("train", "precompute", "train-sam"):
        key = "train_sam.threads" if cmd == "train-sam" else "trainer.threads"
        assert main([cmd, f"{key}=0"]) == 2
        assert f"{key}=0 must be a positive thread count" in capsys.readouterr().err
    assert main(["train-sam", "train_sam.semantic_weight=-1"]) == 2
    assert "train_sam.semantic_weight=-1.0 must not be negative" in capsys.readouterr().err


def test_show_config(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "projector=pool", "projector.k=2", "--show-config"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "name: pool" in out and "k: 2" in out


def test_overrides_after_an_option_are_overrides_in_order(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "projector=pool", "projector.k=2", "--show-config", "projector.k=3"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "name: pool" in out and "k: 3" in out
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--show-config", "--nope"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --nope" in capsys.readouterr().err


def test_quality_overrides_after_sources_are_overrides(synthref_root, capsys):
    """`--sources grid data.root=X`: argparse's nargs="*" takes both; the override must apply."""
    argv = [
        "superpixels",
        "quality",
        "--limit",
        "2",
        "--sources",
        "grid",
        f"data.root={synthref_root}",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| grid | 2 |" in out and "slic" not in out


def test_train_sam_generates_its_image_pool_and_names_changed_settings(tmp_path, capsys):
    """`svp train-sam` builds the preset's SAM image pool (`sam_synth`) when it is missing,
    refuses a pool made with other settings, and warns when a kept SAM had other settings."""
    import json

    import pytest

    data, sam = tmp_path / "data", tmp_path / "runs" / "sam" / "sam_small.pth"
    args = [
        "train-sam",
        f"data.root={data}",
        f"train_sam.out={sam}",
        "sam_synth.train_images=3",
        "sam_synth.val_images=2",
        "sam_synth.testA_images=1",
        "sam_synth.testB_images=1",
        "sam_synth.image_size=64",
        "train_sam.sam.img_size=64",
        "train_sam.sam.encoder_depth=2",
        "train_sam.sam.encoder_global_attn_indexes=[1]",
        "train_sam.max_steps=2",
        "train_sam.val_limit=2",
    ]
    assert main(args) == 0
    pool = data / "sam_pool"
    info = json.loads((pool / "synthref" / "instances.json").read_text())["info"]
    assert info["images"] == {"train": 3, "val": 2, "testA": 1, "testB": 1}
    saved = json.loads((sam.parent / "metrics.json").read_text())["config"]
    assert saved["root"] == str(pool)
    assert not (data / "synthref").exists()  # the RIS data set is not the SAM's business
    with pytest.warns(UserWarning, match=r"train_sam.max_steps=2 \(config: 3\)"):
        assert main([*args, "train_sam.max_steps=3"]) == 0  # kept, with a warning
    capsys.readouterr()
    assert main([*args, "sam_synth.train_images=4", "--force"]) == 2
    err = capsys.readouterr().err
    assert "train 3 (config: 4)" in err and "sam_synth.root" in err


def test_training_on_a_synthref_made_with_other_settings_warns(synthref_root):
    """`svp train` on data whose split sizes differ from `synth.*` says so (numbers would not be
    comparable with the documented ones) but goes on."""
    import pytest

    from lightning_modules.cli.config import load_config
    from lightning_modules.cli.inputs import warn_synthref_mismatch

    with pytest.warns(UserWarning, match=r"train 24 \(config: 600\)"):
        warn_synthref_mismatch(load_config([f"data.root={synthref_root}"]))
    same = [f"data.root={synthref_root}", "synth.train_images=24", "synth.val_images=8"]
    same += ["synth.testA_images=6", "synth.testB_images=6", "synth.image_size=64"]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_synthref_mismatch(load_config(same))


def test_sweep_where_every_trial_fails_exits_2_with_the_count(synthref_root, tmp_path, capsys):
    from conftest import tiny_run_overrides

    overrides = tiny_run_overrides(synthref_root, tmp_path / "no-sam.pth", tmp_path, "mlp")
    argv = ["sweep", *overrides, "sweep=demo_grid", "sweep.name=broken", "sweep.n_trials=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error: study 'broken': none of its 2 trials completed (2 failed)" in err
    assert (tmp_path / "broken" / "report.md").is_file()  # the report is written all the same


def test_bench_runs_every_projector_with_the_commands_overrides(
    synthref_root, tiny_sam_checkpoint, tmp_path, capsys
):
    """`svp bench`: the trivial baselines, then one row per projector, each model built from the
    command's own settings (here the tiny widths of the test overrides)."""
    from conftest import tiny_run_overrides

    from lightning_modules.projectors import PROJECTORS

    overrides = tiny_run_overrides(synthref_root, tiny_sam_checkpoint, tmp_path, "mlp")
    assert main(["bench", *overrides, "superpixels=grid", "superpixels.k=4"]) == 0
    out = capsys.readouterr().out
    assert "largest_object" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "budget" not in line]
    names = {line.split("|")[1].strip() for line in rows}
    assert set(PROJECTORS) <= names
    # mlp: one token per patch of the tiny SAM's 8×8 grid, an LLM sequence of the tiny prompt
    mlp = next(line for line in rows if line.split("|")[1].strip() == "mlp")
    assert mlp.split("|")[3].strip() == "64.0"
    # the projector the command chose keeps its overrides; the others take their defaults
    argv = ["bench", *overrides, "superpixels=grid", "projector=pool", "projector.k=2"]
    assert main([*argv, "--projectors", "pool,ldpv2", "--no-baselines", "--repeats", "1"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()]
    budgets = {r[1].strip(): (r[2].strip(), r[3].strip()) for r in rows if len(r) > 9}
    assert budgets["pool"] == ("k=2", "4.0") and budgets["ldpv2"] == ("k=4", "16.0")


def test_report_context_is_the_baseline_on_the_trials_test_sentences(synthref_root, tmp_path):
    """The demo report's baseline: largest object on the sentences the trials are tested on."""
    from datamodules.refer import ReferDataset
    from lightning_modules.cli.bench import baseline_predictions
    from lightning_modules.cli.config import load_config
    from lightning_modules.cli.stages import report_context
    from lightning_modules.metrics import ciou
    from sweeps.space import load_space

    cfg = load_config([f"data.root={synthref_root}", "sweep.space=demo_grid"])
    context = report_context(cfg)
    assert context["budget"] == list(load_space("demo_grid").base_overrides)
    name, value = context["baseline"]
    preds, targets = baseline_predictions(
        ReferDataset(synthref_root, "synthref", "unc", "val"), "largest_object"
    )
    assert name == "largest object (val)" and value == pytest.approx(ciou(preds, targets))
    cfg = load_config([f"data.root={synthref_root}", "sweep.space=compare_projectors"])
    limited = report_context(cfg)["baseline"][1]
    assert 0 < limited < 1
