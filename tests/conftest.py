"""Shared fixtures: a tiny SynthRef and a tiny SAM checkpoint, built once per test run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.sam import SamConfig

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parent.parent

TINY_SYNTH = dict(train_images=24, val_images=8, testA_images=6, testB_images=6, image_size=64)

# the small SAM of the tests: SAM's own classes at tiny widths
TINY_SAM = SamConfig(
    img_size=64,
    patch_size=8,
    encoder_embed_dim=32,
    encoder_depth=2,
    encoder_num_heads=2,
    encoder_global_attn_indexes=[1],
    window_size=4,
    prompt_embed_dim=32,
    mask_in_chans=8,
    decoder_depth=1,
    decoder_mlp_dim=64,
    decoder_num_heads=2,
    iou_head_hidden_dim=32,
)


@pytest.fixture(scope="package")
def synthref_root(tmp_path_factory) -> Path:
    from datamodules.synthetic import SynthConfig, generate_synthref

    root = tmp_path_factory.mktemp("synthref_data")
    generate_synthref(SynthConfig(root=str(root), seed=0, **TINY_SYNTH), progress=False)
    return root


@pytest.fixture(scope="package")
def tiny_sam_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised small SAM in SAM's own checkpoint format (+ its sidecar config)."""
    from common.sam import build_sam, save_sam

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    save_sam(build_sam(TINY_SAM), TINY_SAM, path)
    return path


def tiny_run_overrides(root: Path, sam: Path, runs: Path, projector: str = "mlp") -> list[str]:
    """Config overrides for a seconds-long `svp train` on the tiny fixtures."""
    return [
        f"projector={projector}",
        f"data.root={root}",
        f"runs_root={runs}",
        f"cache.root={runs / 'cache'}",
        f"train_sam.out={sam}",
        "train_sam.sam.img_size=64",
        "data.batch_size=4",
        "data.eval_batch_size=8",
        "data.label_size=32",
        "llm.hidden_size=32",
        "llm.intermediate_size=64",
        "llm.num_attention_heads=2",
        "llm.num_key_value_heads=2",
        "mask_decoder.seg_mlp_hidden=32",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
    ]


def run_svp(*argv: str) -> subprocess.CompletedProcess:
    """`svp <argv>` in a fresh process from the repository root (output captured)."""
    return subprocess.run(
        [sys.executable, "-m", "lightning_modules.cli", *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=600,
    )
