"""`svp demo` end to end on a tiny configuration: every stage really runs, then all skip."""

from __future__ import annotations

from pathlib import Path

import yaml

from lightning_modules.cli import main


def test_demo_runs_every_stage_and_skips_them_on_rerun(tmp_path, capsys):
    space = tmp_path / "grid.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "base_overrides": ["trainer.limit_train_batches=2"],
                "grid": [{"projector": "mlp"}, {"projector": "semantic"}],
            }
        )
    )
    args = [
        "demo",
        f"data.root={tmp_path / 'data'}",
        f"runs_root={tmp_path / 'runs'}",
        "synth.train_images=12",
        "synth.val_images=4",
        "synth.testA_images=3",
        "synth.testB_images=3",
        "synth.image_size=64",
        "train_sam.sam.img_size=64",
        "train_sam.sam.encoder_depth=2",
        "train_sam.sam.encoder_global_attn_indexes=[1]",
        "train_sam.max_steps=3",
        "train_sam.val_limit=10",
        "superpixels.points_per_side=4",
        "llm.hidden_size=32",
        "llm.intermediate_size=64",
        "llm.num_attention_heads=2",
        "llm.num_key_value_heads=2",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        f"sweep.space={space}",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    runs = tmp_path / "runs"
    # the demo's short SAM has its own file: it never stands in for the tiny preset's SAM
    assert (runs / "demo" / "sam" / "sam_small.pth").is_file()
    assert not (runs / "sam" / "sam_small.pth").exists()
    assert list((runs / "cache").glob("sam-*/meta.json"))
    for name in ("report.md", "trials.csv", "pareto.png"):
        assert (runs / "demo" / name).is_file()
    assert "tensorboard --logdir" in out
    report = (runs / "demo" / "report.md").read_text()
    assert "mlp" in report and "semantic" in report

    assert main(args) == 0  # everything cached: stages skip
    out = capsys.readouterr().out
    assert "skipping generation" in out and "use --force to retrain" in out
    assert "is complete" in out  # the superpixel cache
    assert Path(runs / "demo" / "report.md").is_file()
