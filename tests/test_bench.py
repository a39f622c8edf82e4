"""`svp bench` at a real model's shape from configs alone: the shape7b config, random SAM weights
only where bench allows them, a padded vocabulary, and the tokens/s and peak memory columns."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from common.errors import ConfigError
from common.sam import RANDOM_WEIGHTS, load_sam, random_weights_allowed
from lightning_modules.cli import main
from lightning_modules.cli.bench import STEP_PARTS
from lightning_modules.cli.config import load_config


def test_shape7b_builds_llava7b_at_its_real_shape_without_weights():
    """LLaMA-7B (6.74 B parameters with LoRA r 8 on q/v, 32000-token embeddings), CLIP-L/14-336
    (576 patch tokens from layer -2), SAM ViT-H: built on the meta device, sized by the config."""
    from lightning_modules.llm import build_llm, build_tokenizer
    from lightning_modules.vision_tower import build_vision_tower

    cfg = load_config(["model=shape7b"])
    real = load_config(["preset=llava7b"])
    assert cfg.llm.lora == real.llm.lora and cfg.llm.dtype == real.llm.dtype == "bfloat16"
    assert cfg.mask_decoder.model_type == real.mask_decoder.model_type == "vit_h"
    assert cfg.mask_decoder.seg_mlp_hidden == real.mask_decoder.seg_mlp_hidden == 4096
    assert cfg.vision.feature_layer == real.vision.feature_layer == -2
    tokenizer = build_tokenizer(["a red circle"])
    tokenizer.add_tokens([f"<unused_{i}>" for i in range(cfg.llm.vocab_size - len(tokenizer))])
    with torch.device("meta"):
        tower = build_vision_tower(OmegaConf.to_object(cfg.vision))
        llm = build_llm(OmegaConf.to_object(cfg.llm), tokenizer)
    assert tower.grid_size == (24, 24) and tower.out_channels == 1024
    assert sum(p.numel() for p in tower.parameters()) == pytest.approx(303.5e6, rel=1e-3)
    assert tuple(llm.get_input_embeddings().weight.shape) == (32000, 4096)
    lora = sum(p.numel() for n, p in llm.named_parameters() if "lora_" in n)
    assert lora == 32 * 2 * 2 * 8 * 4096  # 32 layers × (q, v) × (A, B) × r 8 × 4096
    total = sum(p.numel() for p in llm.parameters())
    assert total - lora == pytest.approx(6.738e9, rel=1e-3)


def test_a_random_sam_vit_h_builds_from_config_only_inside_bench():
    cfg = load_config(["model=shape7b"])
    md = cfg.mask_decoder
    assert md.checkpoint == RANDOM_WEIGHTS
    with pytest.raises(ConfigError, match="only `svp bench`"):
        load_sam(md.checkpoint, md.model_type)
    with random_weights_allowed(), torch.device("meta"):
        with pytest.warns(UserWarning, match="random weights"):
            sam = load_sam(md.checkpoint, md.model_type)
        with pytest.raises(ConfigError, match="official model_type"):
            load_sam(RANDOM_WEIGHTS, "custom")
    enc = sam.image_encoder
    assert len(enc.blocks) == 32 and enc.patch_embed.proj.out_channels == 1280
    assert enc.img_size == 1024
    assert sum(p.numel() for p in sam.parameters()) == pytest.approx(641.1e6, rel=1e-3)
    with pytest.raises(ConfigError, match="only `svp bench`"):  # the permission ends with it
        load_sam(md.checkpoint, md.model_type)


def test_a_model_outside_bench_refuses_random_sam_weights(synthref_root, tmp_path, capsys):
    from conftest import tiny_run_overrides

    from lightning_modules.llm import tokenizer_for
    from lightning_modules.ris_model import RISModel

    overrides = tiny_run_overrides(synthref_root, tmp_path / "sam.pth", tmp_path)
    overrides += ["mask_decoder.checkpoint=random", "mask_decoder.model_type=vit_b"]
    cfg = load_config(overrides)
    with pytest.raises(ConfigError, match="only `svp bench`"):
        RISModel(cfg, tokenizer_for(cfg))
    assert main(["train", *overrides]) == 2
    assert "mask_decoder.checkpoint=random: random SAM weights are for `svp bench` only" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "run").exists()


def test_llm_vocab_size_is_bench_only(synthref_root, tmp_path):
    from conftest import tiny_run_overrides

    from lightning_modules.cli.bench import bench_tokenizer
    from lightning_modules.llm import build_llm, tokenizer_for

    base = tiny_run_overrides(synthref_root, tmp_path / "sam.pth", tmp_path)
    cfg = load_config([*base, "llm.vocab_size=300"])
    with pytest.raises(ConfigError, match="llm.vocab_size=300 but the tokenizer has"):
        build_llm(OmegaConf.to_object(cfg.llm), tokenizer_for(cfg))
    tokenizer = bench_tokenizer(cfg)
    assert len(tokenizer) == 300
    llm = build_llm(OmegaConf.to_object(cfg.llm), tokenizer)
    assert llm.get_input_embeddings().num_embeddings == 300
    assert llm.get_output_embeddings().out_features == 300
    own = tokenizer_for(cfg)
    assert (
        tokenizer("<image> the red circle [SEG]").input_ids
        == own("<image> the red circle [SEG]").input_ids
    )  # the padding tokens never match text
    with pytest.raises(ConfigError, match="smaller than the tokenizer"):
        bench_tokenizer(load_config([*base, "llm.vocab_size=8"]))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_cpu_peak_memory_sees_an_allocation_already_freed():
    from lightning_modules.cli.bench import _memory_in_use, _peak, _reset_peak

    cpu = torch.device("cpu")
    before = _memory_in_use(cpu)
    assert _reset_peak(cpu)
    block = torch.ones(64 * 1024**2)  # 256 MiB, every page touched
    del block
    grown = (_peak(cpu) - before) / 1024**2
    assert 250 < grown < 400
    assert (_memory_in_use(cpu) - before) / 1024**2 < 100  # freed: only the peak remembers it


def test_bench_device_follows_the_trainer_config():
    from lightning_modules.cli.bench import bench_device

    assert bench_device(load_config([])) == (torch.device("cpu"), False)
    assert bench_device(load_config(["trainer.precision=bf16-mixed"])) == (
        torch.device("cpu"),
        True,
    )
    with pytest.raises(ConfigError, match="trainer.precision='16-mixed'"):
        bench_device(load_config(["trainer.precision=16-mixed"]))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="trainer.accelerator=gpu but torch sees no CUDA"):
            bench_device(load_config(["trainer=gpu"]))


def test_bench_names_an_unknown_projector(capsys):
    assert main(["bench", "--projectors", "mlp,nope"]) == 2
    assert "--projectors mlp,nope: unknown" in capsys.readouterr().err


def _table(out: str) -> dict[str, dict[str, str]]:
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    header = next(line for line in lines if "budget" in line)
    keys = [c.strip() for c in header.strip("|").split("|")]
    rows = [line for line in lines[lines.index(header) + 1 :] if not line.startswith("|---")]
    table = {}
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[cells[0]] = dict(zip(keys, cells))
    return table


def test_bench_at_shape7b_reduced_to_tiny_sizes_reports_tokens_per_second_and_memory(
    synthref_root, tiny_sam_checkpoint, tmp_path, capsys
):
    """`svp bench model=shape7b` with the sizes overridden down: the padded vocabulary, the new
    columns, and semantic's train step as a fraction of mlp's."""
    from conftest import tiny_run_overrides

    overrides = tiny_run_overrides(synthref_root, tiny_sam_checkpoint, tmp_path)
    overrides += [
        "model=shape7b",
        f"mask_decoder.checkpoint={tiny_sam_checkpoint}",
        "mask_decoder.model_type=custom",
        "mask_decoder.seg_mlp_hidden=32",
        "llm.num_hidden_layers=1",
        "llm.vocab_size=400",
        "vision.hidden_size=32",
        "vision.num_hidden_layers=2",
        "vision.num_attention_heads=2",
        "vision.intermediate_size=64",
        "vision.image_size=56",  # patch 14: a 4×4 grid
        "superpixels=grid",
        "superpixels.k=3",
        "data.eval_batch_size=2",
        "trainer.precision=bf16-mixed",  # bf16 autocast, as `trainer=gpu` runs it
    ]
    argv = ["bench", *overrides, "--projectors", "mlp,semantic", "--repeats", "1"]
    assert main([*argv, "--no-baselines"]) == 0
    out = capsys.readouterr().out
    assert "Trivial baselines" not in out
    assert "cpu, bf16-mixed" in out and "vocabulary 400, bfloat16, LoRA r 8" in out
    table = _table(out)
    assert set(table) == {"mlp", "semantic"}
    peak_key = "peak memory (GiB, process RSS)"
    for row in table.values():
        step, seq = float(row["train step (s)"]), float(row["LLM seq len"])
        tokens_per_s = float(row["LLM tokens/s (train)"])
        # two samples' sequences per step (up to the table's rounding of the step to 1 ms)
        assert tokens_per_s * step == pytest.approx(2 * seq, abs=tokens_per_s * 6e-4 + 1)
        if sys.platform.startswith("linux"):
            assert float(row[peak_key]) >= 0
    assert table["mlp"]["tokens/image"] == "16.0"  # 56 px / patch 14 = 4×4
    assert table["semantic"]["tokens/image"] == "9.0"  # grid superpixels, k 3
    mlp, sem = (float(table[n]["train step (s)"]) for n in ("mlp", "semantic"))
    ratio = next(line for line in out.splitlines() if line.startswith("train step, semantic / mlp"))
    assert float(ratio.split(": ")[1].rstrip("×")) == pytest.approx(sem / mlp, rel=0.1)


def test_bench_with_random_sam_needs_a_trained_sam_for_superpixels(synthref_root, tmp_path, capsys):
    from conftest import tiny_run_overrides

    overrides = tiny_run_overrides(synthref_root, tmp_path / "sam.pth", tmp_path)
    argv = ["bench", *overrides, "model=shape7b", "superpixels=sam", "--projectors", "semantic"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "superpixels.checkpoint=random" in err and "need a trained SAM" in err
    assert not Path(tmp_path / "cache").exists()


def test_bench_profile_times_the_parts_of_the_train_step(
    synthref_root, tiny_sam_checkpoint, tmp_path, capsys
):
    """`svp bench --profile` on the tiny preset (pointer and re-ranker on): the parts add up to
    the forward and the step, the re-ranker's candidate decoding is timed apart from the final
    decoding, and the bound is the step over the LLM's own forward and backward."""
    from conftest import tiny_run_overrides

    overrides = tiny_run_overrides(synthref_root, tiny_sam_checkpoint, tmp_path)
    argv = ["bench", *overrides, "--projectors", "mlp,semantic", "--repeats", "1"]
    assert main([*argv, "--no-baselines", "--profile"]) == 0
    out = capsys.readouterr().out.split("## Where a train step goes")[1]
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ")]
    assert [c.strip() for c in rows[0]] == ["part of the train step (s)", "mlp", "semantic"]
    labels = {v: k for k, v in STEP_PARTS.items()}
    parts = {labels[r[0].strip()]: [float(c) for c in r[1:]] for r in rows[1:]}
    assert set(parts) == set(STEP_PARTS)
    bound = next(line for line in out.splitlines() if line.startswith("most speed-up"))
    for i, name in enumerate(("mlp", "semantic")):
        p = {k: v[i] for k, v in parts.items()}
        assert all(v >= 0 for v in p.values())
        assert p["candidates"] > 0 and p["mask_decoder"] > 0 and p["llm_alone"] > 0
        inner = ("candidates", "grounding", "llm", "projector", "mask_decoder")
        assert sum(p[k] for k in inner) <= p["forward"] + 0.003  # rounding to 1 ms each
        whole = p["forward"] + p["backward"] + p["optimizer"]
        assert whole == pytest.approx(p["step"], abs=0.003)
        ratio = float(bound.split(f"{name} ")[1].split("×")[0])
        step, alone = p["step"], p["llm_alone"]  # each rounded to 1 ms, the ratio to 0.1
        assert (
            (step - 5e-4) / (alone + 5e-4) - 0.05 <= ratio <= (step + 5e-4) / (alone - 5e-4) + 0.05
        )
