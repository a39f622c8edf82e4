"""`svp diagnose grounding`: every prompt source trains, evaluates and writes its curve."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_run_overrides

from common.errors import ConfigError
from datamodules.synthetic import EXPRESSION_KINDS
from lightning_modules.cli import main
from lightning_modules.cli.config import load_config
from lightning_modules.probes.grounding import (
    MODES,
    GroundingProbe,
    check_mode,
    diagnose_grounding,
)


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_trains_and_writes_a_curve(mode, synthref_root, tiny_sam_checkpoint, tmp_path):
    cfg = load_config(
        [
            *tiny_run_overrides(synthref_root, tiny_sam_checkpoint, tmp_path / "runs", "semantic"),
            "data.limit_val_sentences=8",
        ]
    )
    result = diagnose_grounding(cfg, mode=mode, steps=3, eval_every=2, progress=False)
    assert [p["step"] for p in result["curve"]] == [2, 3]
    for point in result["curve"]:
        if mode == "pointing":  # no mask decoder: no cIoU, no mask losses
            assert point["val_ciou"] is None and point["train_dice"] is None
        else:
            assert 0.0 <= point["val_ciou"] <= 1.0 and 0.0 <= point["val_giou"] <= 1.0
            assert math.isfinite(point["train_dice"])
        assert point["seg_std"] >= 0.0
        if mode in ("llm", "pointing"):  # the tiny preset's grounding pointer is on
            assert 0.0 <= point["val_point_acc"] <= 1.0
            assert 0.0 <= point["train_point_acc"] <= 1.0
    written = tmp_path / "runs" / "diagnose" / f"semantic-{mode}" / "diagnose.json"
    assert json.loads(written.read_text()) == result


def test_pointing_mode_needs_the_grounding_head(synthref_root, tiny_sam_checkpoint, tmp_path):
    overrides = tiny_run_overrides(synthref_root, tiny_sam_checkpoint, tmp_path / "runs")
    cfg = load_config([*overrides, "grounding.weight=0", "grounding.pointer=false"])
    with pytest.raises(ConfigError, match="grounding pointer"):
        diagnose_grounding(cfg, mode="pointing", steps=1, progress=False)


def test_oracle_token_reaches_the_seg_hidden_state(synthref_root, tiny_sam_checkpoint, tmp_path):
    """The oracle token is the only visual token: different targets give different [SEG] states."""
    from datamodules.ris import RISDataModule
    from lightning_modules.llm import tokenizer_for
    from lightning_modules.ris_model import RISModel

    cfg = load_config(tiny_run_overrides(synthref_root, tiny_sam_checkpoint, tmp_path / "r"))
    tok = tokenizer_for(cfg)
    dm = RISDataModule(cfg, tok)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    probe = GroundingProbe(RISModel(cfg, tok), "oracle_token").eval()
    hidden = probe._hidden(batch)
    moved = dict(batch, masks=[torch.roll(m, shifts=8, dims=1) for m in batch["masks"]])
    assert not torch.allclose(hidden, probe._hidden(moved))


def test_cli_rejects_bad_steps_and_modes(synthref_root, tiny_sam_checkpoint, tmp_path, capsys):
    args = tiny_run_overrides(synthref_root, tiny_sam_checkpoint, tmp_path / "runs")
    assert main(["diagnose", "grounding", "--steps", "0", *args]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(["diagnose", "grounding", "--mode", "nope", *args]) == 2
    assert "unknown" in capsys.readouterr().err
    assert main(["diagnose", "grounding", "--select-steps", "-5", "--mode", "llm", *args]) == 2
    assert "--select-steps -5 must be ≥ 0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="needs projector=semantic"):
        check_mode("oracle_select", "mlp")


def _probe_overrides(synthref_root, tiny_sam_checkpoint, tmp_path) -> list[str]:
    """The tiny semantic preset on 24 train and 8 val sentences."""
    return [
        *tiny_run_overrides(synthref_root, tiny_sam_checkpoint, tmp_path / "runs", "semantic"),
        "data.limit_train_sentences=24",
        "data.limit_val_sentences=8",
    ]


def test_pointing_probe_trains_and_writes(synthref_root, tiny_sam_checkpoint, tmp_path):
    from lightning_modules.probes.pointing import pointing_probe

    args = _probe_overrides(synthref_root, tiny_sam_checkpoint, tmp_path)
    assert main(["diagnose", "pointing", "--steps", "0", *args]) == 2
    assert main(["diagnose", "pointing", "--pointer", "lstm", *args]) == 2
    assert main(["diagnose", "pointing", "--train-fraction", "0", *args]) == 2
    result = pointing_probe(load_config(args), steps=5, batch_size=4, progress=False)
    for key in ("val_top1_features_only", "val_top1_with_geometry"):
        assert 0.0 <= result[key] <= 1.0
        by_kind = result[f"{key}_by_kind"]
        assert set(by_kind) <= {*EXPRESSION_KINDS, "other"} and by_kind
        assert all(0.0 <= v <= 1.0 for v in by_kind.values())
    written = tmp_path / "runs" / "diagnose" / "pointing" / "pointing.json"
    assert json.loads(written.read_text()) == result
    assert result["train_sentences"] == 24


def test_transformer_pointer_on_part_of_the_images(synthref_root, tiny_sam_checkpoint, tmp_path):
    from lightning_modules.probes.pointing import TransformerPointer, pointing_probe

    args = _probe_overrides(synthref_root, tiny_sam_checkpoint, tmp_path)
    cfg = load_config(args)
    half = pointing_probe(cfg, 3, 4, progress=False, pointer="transformer", train_fraction=0.5)
    assert half["pointer"] == "transformer" and 0 < half["train_sentences"] < 24
    assert 0.0 <= half["val_top1_with_geometry"] <= 1.0
    # the transformer reads the words: the same superpixels score differently for other sentences
    torch.manual_seed(0)
    net = TransformerPointer(vocab=20, feat_dim=5, geo_dim=0, layers=1).eval()
    keys, mask = torch.randn(2, 3, 5), torch.tensor([[True, True, True], [True, True, False]])
    a = net([torch.tensor([1, 2, 3]), torch.tensor([4, 5])], keys, mask)
    b = net([torch.tensor([6, 7, 8]), torch.tensor([4, 5])], keys, mask)
    assert torch.isinf(a[1, 2]) and not torch.allclose(a[0], b[0])
    assert torch.allclose(a[1], b[1], atol=1e-6)  # the other sample is unaffected


def test_fourier_geometry_expands_the_seven_numbers_and_zeroes_padding():
    from lightning_modules.probes.pointing import fourier_geometry
    from lightning_modules.projectors.semantic import GEOMETRY_DIM

    geometry = torch.rand(2, 3, GEOMETRY_DIM + 16)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = fourier_geometry(geometry, 2, mask)
    assert out.shape == (2, 3, GEOMETRY_DIM + 16 + 4 * GEOMETRY_DIM)
    torch.testing.assert_close(out[..., : GEOMETRY_DIM + 16], geometry)
    x = geometry[0, 0, 0]
    waves = out[0, 0, GEOMETRY_DIM + 16 :]
    # sin of column 0 at π, then at 2π; cos of column 0 at π comes after all 2·7 sines
    torch.testing.assert_close(waves[0], torch.sin(torch.pi * x))
    torch.testing.assert_close(waves[1], torch.sin(2 * torch.pi * x))
    torch.testing.assert_close(waves[2 * GEOMETRY_DIM], torch.cos(torch.pi * x))
    assert (out[0, 2, GEOMETRY_DIM + 16 :] == 0).all() and (
        out[1, 1:, GEOMETRY_DIM + 16 :] == 0
    ).all()
    assert fourier_geometry(geometry, 0, mask) is geometry
