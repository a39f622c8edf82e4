"""RIS model on tiny fixtures: padding invariance, every projector trains, DDP eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_run_overrides

from datamodules.refer import ReferDataset
from datamodules.ris import PromptEncoder, RISCollate, resize_labels
from datamodules.superpixels import SOURCES
from lightning_modules.config import load_config
from lightning_modules.grounding import word_query
from lightning_modules.mask_decoding import dice_loss
from lightning_modules.projectors import PROJECTORS
from lightning_modules.ris_model import RISModel
from lightning_modules.tokenizer_setup import tokenizer_for

REPO = Path(__file__).resolve().parent.parent


def _cfg(root, sam, runs, projector="semantic", extra=()):
    return load_config([*tiny_run_overrides(root, sam, runs, projector), *extra])


def _items(root, k_values):
    ds = ReferDataset(str(root), "synthref", "unc", "val")
    items = []
    for i, k in enumerate(k_values):
        item = dict(ds[i * 3])
        grid = SOURCES["grid"]({"name": "grid", "k": k})
        labels = grid(item["image"])
        item["superpixels"] = labels
        item["labels"] = resize_labels(labels, 32)
        items.append(item)
    return items


# the tiny preset has the grounding head on with teacher forcing and the `patch_rerank` recipe;
# these pin each variant down, from the model's own grounding node (`grounding=default`)
LISA_ONLY = ("grounding=default", "grounding.weight=0", "grounding.pointer=false")
GROUNDING_ON = (
    "grounding=default",
    "grounding.weight=1.0",
    "grounding.pointer=true",
    "grounding.teacher_forcing=false",
    "grounding.pointer_eval=soft",
)
FUSION_ON = (*GROUNDING_ON, "grounding.fusion_layers=2")
GEOMETRY_ON = (*GROUNDING_ON, "grounding.key_geometry=true")
BIDIRECTIONAL = (*GROUNDING_ON, "llm.visual_attention=bidirectional")
SMOOTH_ON = (*GROUNDING_ON, "grounding.pointer_eval=argmax", "grounding.pointer_smooth=0.3")
VOTE_ON = (*SMOOTH_ON, "grounding.pointer_vote=6")  # > the first sample's 4 tokens
RERANK_ON = (*SMOOTH_ON, "grounding.rerank=6")
RERANK_FEATURES = (
    *RERANK_ON,
    "grounding.rerank_from=features",
    "grounding.rerank_vote=true",
    "grounding.rerank_shape=3",
    "grounding.rerank_query=words",
)
# on the 5×5 sample (centroid spacing 0.2) a taken token's neighbours are skipped
RERANK_SPREAD = (*RERANK_FEATURES, "grounding.rerank_spread=0.3")
RERANK_CONTEXT = (*RERANK_FEATURES, "grounding.rerank_context=2")


def _wake_fusion(model) -> None:
    """Fresh fusion layers are the identity (zero-initialised residual branches); give them
    trained-looking weights so the tests exercise the attention over the sentence (and, for
    `rerank_context`, over the candidates and the words)."""
    if model.grounding is not None:
        with torch.no_grad():
            for layers in (model.grounding.fusion, model.grounding.rerank_context):
                for p in layers.parameters():
                    p.normal_(0, 0.1)


@pytest.mark.parametrize(
    "extra",
    [
        LISA_ONLY,
        GROUNDING_ON,
        FUSION_ON,
        GEOMETRY_ON,
        SMOOTH_ON,
        VOTE_ON,
        RERANK_ON,
        RERANK_FEATURES,
        RERANK_SPREAD,
        RERANK_CONTEXT,
        BIDIRECTIONAL,
    ],
    ids=[
        "lisa",
        "grounding",
        "fusion",
        "geometry",
        "smooth",
        "vote",
        "rerank",
        "rerank_features",
        "rerank_spread",
        "rerank_context",
        "bidirectional",
    ],
)
def test_padding_invariance(extra, synthref_root, tiny_sam_checkpoint, tmp_path):
    torch.manual_seed(0)
    cfg = _cfg(synthref_root, tiny_sam_checkpoint, tmp_path, extra=extra)
    tok = tokenizer_for(cfg)
    model = RISModel(cfg, tok).eval()
    _wake_fusion(model)
    collate = RISCollate(PromptEncoder(tok, cfg.data.prompt, cfg.data.answer), tok.pad_token_id)
    items = _items(synthref_root, [2, 5, 3])
    with torch.no_grad():
        alone = model(collate(items[:1]))
        batched = model(collate(items))
    assert batched["num_tokens"].tolist() == [4, 25, 9]
    assert alone["num_tokens"].tolist() == [4]
    torch.testing.assert_close(
        alone["mask_logits"][0], batched["mask_logits"][0], atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        alone["ce_per_sample"][0], batched["ce_per_sample"][0], atol=1e-5, rtol=0
    )
    if extra == LISA_ONLY:
        assert model.grounding is None and "ground_logits" not in batched
    else:
        torch.testing.assert_close(
            alone["ground_logits"][0], batched["ground_logits"][0, :4], atol=1e-5, rtol=0
        )
        assert torch.isinf(batched["ground_logits"][0, 4:]).all()
    if extra == VOTE_ON:  # the vote picks among real tokens and the same one batched or alone
        assert alone["point_pick"][0] == batched["point_pick"][0]
        assert (batched["point_pick"] < batched["num_tokens"]).all()
        # batched, it gets 6 candidates: its 4 tokens, then 2 padding slots that never win
        assert torch.isinf(batched["point_votes"][0, 4:]).all()
        torch.testing.assert_close(
            alone["point_votes"][0], batched["point_votes"][0, :4], atol=1e-5, rtol=0
        )
    if extra in (RERANK_ON, RERANK_FEATURES, RERANK_SPREAD, RERANK_CONTEXT):
        # the re-ranker scores the same 4 candidate masks batched or alone
        assert alone["point_pick"][0] == batched["point_pick"][0]
        assert torch.isinf(batched["rerank_logits"][0, 4:]).all()
        torch.testing.assert_close(
            alone["rerank_logits"][0], batched["rerank_logits"][0, :4], atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            alone["rerank_iou"][0], batched["rerank_iou"][0, :4], atol=1e-5, rtol=0
        )
    if extra in (SMOOTH_ON, VOTE_ON, RERANK_ON, RERANK_FEATURES, RERANK_SPREAD, RERANK_CONTEXT):
        # the smoothed pointer scores ignore padding
        torch.testing.assert_close(
            alone["point_scores"][0], batched["point_scores"][0, :4], atol=1e-5, rtol=0
        )
        assert torch.isinf(batched["point_scores"][0, 4:]).all()
    gt = torch.from_numpy(items[0]["mask"]).float()
    for fn in (F.binary_cross_entropy_with_logits, dice_loss):
        torch.testing.assert_close(
            fn(alone["mask_logits"][0], gt), fn(batched["mask_logits"][0], gt), atol=1e-5, rtol=0
        )


def test_visual_tokens_replace_image_token(synthref_root, tiny_sam_checkpoint, tmp_path):
    cfg = _cfg(synthref_root, tiny_sam_checkpoint, tmp_path)
    tok = tokenizer_for(cfg)
    model = RISModel(cfg, tok).eval()
    collate = RISCollate(PromptEncoder(tok, cfg.data.prompt, cfg.data.answer), tok.pad_token_id)
    batch = collate(_items(synthref_root, [2, 4]))
    with torch.no_grad():
        out = model(batch)
    text = batch["text_lengths"]
    # each sample's LLM sequence = its text minus the <image> token plus its own visual tokens
    assert out["seq_len"].tolist() == (text - 1 + out["num_tokens"]).tolist()
    assert [m.shape for m in out["mask_logits"]] == [m.shape for m in batch["masks"]]


@pytest.mark.parametrize(
    "extra",
    [
        GROUNDING_ON,
        FUSION_ON,
        GEOMETRY_ON,
        (*GROUNDING_ON, "grounding.rerank=3"),
        (*GROUNDING_ON, "grounding.rerank=3", "grounding.rerank_from=features"),
        (*GROUNDING_ON, "grounding.rerank=3", "grounding.rerank_shape=4"),
        (*GROUNDING_ON, "grounding.rerank=3", "grounding.rerank_query=words"),
        (*GROUNDING_ON, "grounding.rerank=3", "grounding.rerank_spread=0.3"),
        (
            *GROUNDING_ON,
            "grounding.rerank=3",
            "grounding.rerank_query=words",
            "grounding.rerank_context=1",
        ),
        (*GROUNDING_ON, "grounding.query_words=true"),
    ],
    ids=[
        "grounding",
        "fusion",
        "geometry",
        "rerank",
        "rerank_features",
        "rerank_shape",
        "rerank_words",
        "rerank_spread",
        "rerank_context",
        "query_words",
    ],
)
def test_grounding_head_trains_and_points(extra, synthref_root, tiny_sam_checkpoint, tmp_path):
    """The grounding loss is in the total, every head parameter gets a gradient, and the pointer
    changes the prompt: with it, the mask depends on the grounding scores."""
    torch.manual_seed(0)
    cfg = _cfg(synthref_root, tiny_sam_checkpoint, tmp_path, extra=extra)
    tok = tokenizer_for(cfg)
    model = RISModel(cfg, tok)
    _wake_fusion(model)
    collate = RISCollate(PromptEncoder(tok, cfg.data.prompt, cfg.data.answer), tok.pad_token_id)
    batch = collate(_items(synthref_root, [2, 5, 3]))
    out = model(batch)
    if "rerank_iou" in out:  # an untrained pointer's candidates rarely reach the target: make
        # the second one the target's for every sample, so the re-ranking loss has a signal
        assert out["rerank_iou"].shape == (3, 3) and (out["rerank_iou"] >= 0).all()
        out["rerank_iou"] = torch.tensor([[0.0, 0.9, 0.1]]).expand(3, 3)
    losses = model.losses(out, batch)
    assert losses["grounding"] > 0 and 0 <= losses["point_acc"] <= 1
    plain = losses["ce"] + 2.0 * losses["bce"] + 0.5 * losses["dice"] + losses["grounding"]
    if "rerank" in losses:  # the re-ranking loss joins the total with weight 1
        assert out["rerank_logits"].shape == (3, 3) and 0 <= losses["rerank_acc"] <= 1
        plain = plain + losses["rerank"]
    torch.testing.assert_close(losses["loss"], plain)
    losses["loss"].backward()
    for name, p in model.grounding.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the top-scored token's footprint centroid is what the pointer encodes: moving the scores
    # moves the prompt and so the mask
    with torch.no_grad():
        model.grounding.query.bias.add_(torch.randn_like(model.grounding.query.bias) * 5)
        moved = model(batch)
    assert not torch.allclose(moved["mask_logits"][0], out["mask_logits"][0].detach())


def test_rerank_trains_and_the_vote_picks(synthref_root, tiny_sam_checkpoint, tmp_path):
    """With grounding.rerank and grounding.pointer_vote both on, training scores the candidate
    masks (the re-ranking loss) and evaluation points by the vote, without the re-ranker."""
    extra = (*SMOOTH_ON, "grounding.rerank=3", "grounding.pointer_vote=3")
    cfg = _cfg(synthref_root, tiny_sam_checkpoint, tmp_path, extra=extra)
    tok = tokenizer_for(cfg)
    model = RISModel(cfg, tok)
    collate = RISCollate(PromptEncoder(tok, cfg.data.prompt, cfg.data.answer), tok.pad_token_id)
    batch = collate(_items(synthref_root, [2, 5, 3]))
    with torch.no_grad():
        trained = model.train()(batch)
        evaluated = model.eval()(batch)
    assert trained["rerank_logits"].shape == trained["rerank_iou"].shape == (3, 3)
    assert "rerank" in model.losses(trained, batch)
    assert "rerank_logits" not in evaluated and "ground_cells" not in evaluated
    assert evaluated["point_votes"].shape == (3, 3)
    top = evaluated["point_scores"].topk(3, -1).indices
    best = top.gather(1, evaluated["point_votes"].argmax(-1, keepdim=True))[:, 0]
    assert (evaluated["point_pick"] == best).all()


@pytest.mark.parametrize("teacher", ["mixture", "sample"])
def test_teacher_forcing_points_at_the_target(
    teacher, synthref_root, tiny_sam_checkpoint, tmp_path
):
    """In training with teacher forcing the prompt uses the target's tokens, not the scores."""
    extra = (
        *GROUNDING_ON,
        "grounding.teacher_forcing=true",
        f"grounding.teacher_pointer={teacher}",
        "grounding.pointer_eval=argmax",
    )
    cfg = _cfg(synthref_root, tiny_sam_checkpoint, tmp_path, extra=extra)
    tok = tokenizer_for(cfg)
    torch.manual_seed(0)
    model = RISModel(cfg, tok).train()
    collate = RISCollate(PromptEncoder(tok, cfg.data.prompt, cfg.data.answer), tok.pad_token_id)
    batch = collate(_items(synthref_root, [2, 5, 3]))
    with torch.no_grad():
        torch.manual_seed(1)  # `sample` draws the target token: the same draws for both passes
        before = model(batch)
        model.grounding.query.bias.add_(torch.randn_like(model.grounding.query.bias) * 5)
        torch.manual_seed(1)
        after = model(batch)
        assert not torch.allclose(before["ground_logits"], after["ground_logits"])
        for a, b in zip(before["mask_logits"], after["mask_logits"]):
            torch.testing.assert_close(a, b)
        model.eval()  # evaluation points at the top-scored token: a sharper score changes nothing
        sharp = model(batch)
        model.grounding.query.weight.mul_(3.0)
        model.grounding.query.bias.mul_(3.0)
        sharper = model(batch)
    for a, b in zip(sharp["mask_logits"], sharper["mask_logits"]):
        torch.testing.assert_close(a, b)


def test_grounding_head_is_off_for_footprintless_tokens(
    synthref_root, tiny_sam_checkpoint, tmp_path
):
    cfg = _cfg(synthref_root, tiny_sam_checkpoint, tmp_path, "resampler", GROUNDING_ON)
    with pytest.warns(UserWarning, match="grounding head"):
        model = RISModel(cfg, tokenizer_for(cfg))
    assert model.grounding is None


@pytest.mark.parametrize(
    "bad, key",
    [
        ("grounding.fusion_layers=-1", "fusion"),
        ("grounding.fusion_heads=3", "fusion"),
        ("grounding.teacher_pointer=nearest", "grounding.teacher_pointer"),
        ("grounding.pointer_smooth=-0.1", "grounding.pointer_smooth"),
        ("grounding.loss=focal", "grounding.loss"),
        ("grounding.pointer_vote=-1", "grounding.pointer_vote"),
        ("grounding.rerank=-2", "grounding.rerank"),
        ("grounding.rerank=4 grounding.pointer=false", "grounding.rerank"),
        ("grounding.rerank=4 grounding.rerank_from=pixels", "grounding.rerank_from"),
        ("grounding.rerank=4 grounding.rerank_shape=-1", "grounding.rerank_shape"),
        ("grounding.rerank=4 grounding.rerank_query=text", "grounding.rerank_query"),
        ("llm.visual_attention=full", "llm.visual_attention"),
    ],
)
def test_bad_grounding_settings_are_config_errors(
    bad, key, synthref_root, tiny_sam_checkpoint, tmp_path
):
    from datamodules.errors import ConfigError

    cfg = _cfg(synthref_root, tiny_sam_checkpoint, tmp_path, extra=(*FUSION_ON, *bad.split()))
    with pytest.raises(ConfigError, match=key):
        RISModel(cfg, tokenizer_for(cfg))


@pytest.mark.parametrize("projector", sorted(PROJECTORS))
def test_train_fast_dev_run_every_projector(
    projector, synthref_root, tiny_sam_checkpoint, tmp_path
):
    from lightning_modules.train import train

    cfg = _cfg(
        synthref_root,
        tiny_sam_checkpoint,
        tmp_path,
        projector,
        ["trainer.fast_dev_run=true", "superpixels=grid", "superpixels.k=4"],
    )
    metrics = train(cfg)
    run = Path(metrics["run_dir"])
    assert (run / "config.yaml").is_file() and (run / "metrics.json").is_file()
    for split in ("val", "testA", "testB"):
        assert 0.0 <= metrics[f"{split}_ciou"] <= 1.0
        assert 0.0 <= metrics[f"{split}_giou"] <= 1.0
    assert metrics["tokens_mean"] > 0
    if projector == "semantic":
        assert metrics["tokens_mean"] <= 16


@pytest.mark.parametrize("projector", sorted(PROJECTORS))
def test_every_projector_trains_under_bf16_autocast(
    projector, synthref_root, tiny_sam_checkpoint, tmp_path
):
    """`trainer=gpu` trains in bf16-mixed (autocast): each projector, with the re-ranker's
    feature, shape, word, spread and context paths on, gives finite masks and loss in bf16,
    finite float32 gradients wherever a gradient arrives, and one to every projector
    parameter. CPU autocast stands in for CUDA's here (same op lists for the dtype casts); the
    run on an H100 is in docs/BENCHMARKS.md."""
    torch.manual_seed(0)
    extra = (*RERANK_CONTEXT, "grounding.rerank_spread=0.3")
    cfg = _cfg(synthref_root, tiny_sam_checkpoint, tmp_path, projector, extra)
    tok = tokenizer_for(cfg)
    model = RISModel(cfg, tok)
    _wake_fusion(model)
    collate = RISCollate(PromptEncoder(tok, cfg.data.prompt, cfg.data.answer), tok.pad_token_id)
    batch = collate(_items(synthref_root, [2, 5, 3]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
        losses = model.losses(out, batch)
    assert all(torch.isfinite(m).all() for m in out["mask_logits"])
    assert torch.isfinite(losses["loss"]), {k: float(v) for k, v in losses.items()}
    losses["loss"].backward()
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
    projector_grads = [p.grad for p in model.projector.parameters() if p.requires_grad]
    assert projector_grads and all(g is not None for g in projector_grads)


def _event_tags(log_dir: str) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    return set(tags["scalars"]) | set(tags["images"])


def test_train_resume_eval_and_tensorboard(synthref_root, tiny_sam_checkpoint, tmp_path):
    """Two epochs with TensorBoard curves, resume from last, then 1-process vs 2-process eval."""
    from lightning_modules.train import train

    extra = [
        "trainer.limit_train_batches=2",
        "trainer.log_every_n_steps=1",
        "superpixels=grid",
        "superpixels.k=4",
    ]
    cfg = _cfg(synthref_root, tiny_sam_checkpoint, tmp_path, "semantic", extra)
    metrics = train(cfg)
    tags = _event_tags(metrics["tensorboard"])
    for tag in (
        "train/loss",
        "val/val/ciou",
        "val/testB/giou",
        "val/val/tokens_mean",
        "val/val/point_acc",
        "val/predictions",
    ):
        assert tag in tags, (tag, sorted(tags))
    hparams = Path(metrics["tensorboard"]).glob("events.*")
    assert any(hparams)

    resumed = train(
        _cfg(
            synthref_root,
            tiny_sam_checkpoint,
            tmp_path,
            "semantic",
            [*extra, "trainer.max_epochs=2", "ckpt_path=last"],
        )
    )
    assert metrics["start_epoch"] == 0 and resumed["start_epoch"] == 1  # continued, not restarted
    assert metrics["threads"] == torch.get_num_threads()  # recorded: results depend on it
    assert resumed["epochs"] == 2

    config = Path(metrics["run_dir"]) / "config.yaml"
    results = {}
    for trainer in ("cpu", "ddp_cpu"):
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "lightning_modules.cli",
                "eval",
                "--config",
                str(config),
                f"trainer={trainer}",
                "trainer.enable_progress_bar=false",
                # one sample per forward pass on both sides gives identical numerics, so this
                # checks the DDP reduction itself (disjoint shards, summed intersections/unions)
                "data.eval_batch_size=1",
                "data.limit_test_sentences=16",
                "--ckpt",
                str(Path(metrics["run_dir"]) / "checkpoints" / "last.ckpt"),
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[trainer] = json.loads((Path(metrics["run_dir"]) / "eval-last.json").read_text())
    for split in ("val", "testA", "testB"):
        assert results["cpu"][f"{split}_ciou"] == pytest.approx(
            results["ddp_cpu"][f"{split}_ciou"], abs=1e-6
        )
        assert results["cpu"][f"{split}_giou"] == pytest.approx(
            results["ddp_cpu"][f"{split}_giou"], abs=1e-6
        )
        assert np.isfinite(results["cpu"][f"{split}_tokens_mean"])
        # the grounding head's exact pointing accuracy and the hit / miss cIoU split, also
        # reduced across processes (16 sentences: a hit or a miss set may be empty, then absent)
        acc = results["cpu"][f"{split}_point_acc"]
        assert 0.0 <= acc <= 1.0
        assert acc == pytest.approx(results["ddp_cpu"][f"{split}_point_acc"], abs=1e-6)
        for part, present in (("ciou_hit", acc > 0), ("ciou_miss", acc < 1)):
            key = f"{split}_{part}"
            assert (key in results["cpu"]) == present, (key, results["cpu"])
            if present:
                assert results["cpu"][key] == pytest.approx(results["ddp_cpu"][key], abs=1e-6)


def test_frozen_features_cached_on_disk(synthref_root, tiny_sam_checkpoint, tmp_path):
    from lightning_modules import ris_model

    cfg = _cfg(synthref_root, tiny_sam_checkpoint, tmp_path, "mlp")
    tok = tokenizer_for(cfg)
    model = RISModel(cfg, tok).eval()
    collate = RISCollate(PromptEncoder(tok, cfg.data.prompt, cfg.data.answer), tok.pad_token_id)
    batch = collate(_items(synthref_root, [2, 3]))
    ris_model._FEATURE_MEMORY.clear()
    with torch.no_grad():
        first = model(batch)
    files = sorted((tmp_path / "cache" / "features").rglob("*.npy"))
    # one file per image for the tower and one for SAM's image embedding, keyed by config hash
    assert len(files) == 2 * len(set(batch["image_ids"].tolist()))
    ris_model._FEATURE_MEMORY.clear()

    def recompute(images):
        raise AssertionError("features were recomputed instead of read from disk")

    model.tower_features.preprocess = model.sam_features.preprocess = recompute
    with torch.no_grad():
        second = model(batch)
    for a, b in zip(first["mask_logits"], second["mask_logits"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_feature_cache_keys_name_the_data_set(synthref_root, tiny_sam_checkpoint, tmp_path):
    """Feature entries are stored per image id: a second data root with the same ids but other
    images (here: another seed) must not read the first one's features."""
    from conftest import TINY_SYNTH

    from datamodules.synthetic import SynthConfig, generate_synthref

    other = tmp_path / "other"
    generate_synthref(SynthConfig(root=str(other), seed=1, **TINY_SYNTH), progress=False)
    cfg = _cfg(synthref_root, tiny_sam_checkpoint, tmp_path, "mlp")
    tok = tokenizer_for(cfg)
    first = RISModel(cfg, tok)
    again = RISModel(cfg, tok)
    moved = RISModel(
        _cfg(synthref_root, tiny_sam_checkpoint, tmp_path, "mlp", [f"data.root={other}"]), tok
    )
    assert first.tower_features.key == again.tower_features.key
    assert first.sam_features.key == again.sam_features.key
    assert moved.tower_features.key != first.tower_features.key
    assert moved.sam_features.key != first.sam_features.key


def test_query_words_starts_as_the_pointer_and_moves_its_scores(
    synthref_root, tiny_sam_checkpoint, tmp_path
):
    """grounding.query_words adds a bag of the prompt's words to the pointer's query: zero at
    first (the scores are the plain pointer's); once trained (here: random) it moves the scores,
    and a sample scores the same alone and batched."""
    torch.manual_seed(0)
    extra = (*RERANK_FEATURES, "grounding.query_words=true")
    cfg = _cfg(synthref_root, tiny_sam_checkpoint, tmp_path, extra=extra)
    tok = tokenizer_for(cfg)
    model = RISModel(cfg, tok).eval()
    collate = RISCollate(PromptEncoder(tok, cfg.data.prompt, cfg.data.answer), tok.pad_token_id)
    items = _items(synthref_root, [2, 5, 3])
    batch = collate(items)
    table = model.grounding.query_words
    assert table.num_embeddings == len(tok) and not table.weight.any()
    with torch.no_grad():
        plain = model(batch, decode=False)
        words = word_query(table, *model._prompt_words(batch))
        torch.testing.assert_close(words, torch.zeros_like(words))
        table.weight.normal_(0, 1.0)
        worded = model(batch, decode=False)
        alone = model(collate(items[:1]), decode=False)
    assert not torch.allclose(plain["ground_logits"][0, :4], worded["ground_logits"][0, :4])
    torch.testing.assert_close(
        alone["ground_logits"][0], worded["ground_logits"][0, :4], atol=1e-5, rtol=0
    )


def test_rerank_vote_starts_as_the_vote(synthref_root, tiny_sam_checkpoint, tmp_path):
    """With grounding.rerank_vote, the re-ranker's scores are its own plus the weight (1 at
    first) × the log of the vote's mass in each candidate: with its own part at zero it picks
    what `pointer_vote` picks, and the weight gets a gradient from the re-ranking loss."""
    torch.manual_seed(0)
    extra = (
        *GROUNDING_ON,
        "grounding.pointer_eval=argmax",
        "grounding.rerank=3",
        "grounding.rerank_from=features",
        "grounding.rerank_vote=true",
    )
    cfg = _cfg(synthref_root, tiny_sam_checkpoint, tmp_path, extra=extra)
    tok = tokenizer_for(cfg)
    model = RISModel(cfg, tok)
    collate = RISCollate(PromptEncoder(tok, cfg.data.prompt, cfg.data.answer), tok.pad_token_id)
    batch = collate(_items(synthref_root, [2, 5, 3]))
    out = model.train()(batch, decode=False)
    out["rerank_iou"] = torch.tensor([[0.0, 0.9, 0.1]]).expand(3, 3)
    model.losses({**out, "mask_logits": [m.float() for m in batch["masks"]]}, batch)[
        "rerank"
    ].backward()
    assert model.grounding.rerank_vote.grad is not None and model.grounding.rerank_vote.grad != 0
    with torch.no_grad():
        last = model.grounding.rerank_key[-1]
        last.weight.zero_()
        last.bias.zero_()
        reranked = model.eval()(batch, decode=False)
        model.cfg.grounding.pointer_vote = 3
        voted = model(batch, decode=False)
    torch.testing.assert_close(
        reranked["rerank_logits"], voted["point_votes"].clamp(min=1e-6).log(), atol=1e-5, rtol=0
    )
    assert (reranked["point_pick"] == voted["point_pick"]).all()
