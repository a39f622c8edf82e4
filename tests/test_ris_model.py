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
from conftest import run_svp, tiny_run_overrides

from datamodules.refer import ReferDataset
from datamodules.ris import PromptEncoder, RISCollate, resize_labels
from datamodules.superpixels import SOURCES
from lightning_modules.cli.config import load_config
from lightning_modules.llm import tokenizer_for
from lightning_modules.mask_decoder import dice_loss
from lightning_modules.projectors import PROJECTORS
from lightning_modules.ris_model import RISModel

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


# the tiny preset has the pointer on with the re-ranker (top 8, spread 0.1, 2 context layers);
# these pin each part down
LISA_ONLY = ("grounding.weight=0", "grounding.pointer=false")
POINTER = ("grounding.rerank=0",)
RERANK = ("grounding.rerank=6", "grounding.rerank_spread=0", "grounding.rerank_context=0")
# on the 5×5 sample (centroid spacing 0.2) a taken token's neighbours are skipped
RERANK_SPREAD = ("grounding.rerank=6", "grounding.rerank_spread=0.3", "grounding.rerank_context=0")
RERANK_CONTEXT = ("grounding.rerank=6", "grounding.rerank_spread=0", "grounding.rerank_context=2")


def _wake_context(model) -> None:
    """Fresh context layers are the identity (zero-initialised residual branches); give them
    trained-looking weights so the tests exercise the attention over candidates and words."""
    if model.grounding.pointer is not None:
        with torch.no_grad():
            for p in model.grounding.pointer.rerank_context.parameters():
                p.normal_(0, 0.1)


def _model_and_batch(root, sam, runs, extra, projector="semantic", k_values=(2, 5, 3)):
    cfg = _cfg(root, sam, runs, projector, extra)
    tok = tokenizer_for(cfg)
    model = RISModel(cfg, tok)
    collate = RISCollate(PromptEncoder(tok, cfg.data.prompt, cfg.data.answer), tok.pad_token_id)
    items = _items(root, list(k_values))
    return model, collate, items


@pytest.mark.parametrize(
    "extra",
    [LISA_ONLY, POINTER, RERANK, RERANK_SPREAD, RERANK_CONTEXT, ()],
    ids=["lisa", "pointer", "rerank", "rerank_spread", "rerank_context", "preset"],
)
def test_padding_invariance(extra, synthref_root, tiny_sam_checkpoint, tmp_path):
    torch.manual_seed(0)
    model, collate, items = _model_and_batch(synthref_root, tiny_sam_checkpoint, tmp_path, extra)
    model.eval()
    _wake_context(model)
    with torch.no_grad():
        alone = model(collate(items[:1]))
        batched = model(collate(items))
    assert batched["num_tokens"].tolist() == [4, 25, 9]
    assert alone["num_tokens"].tolist() == [4]
    torch.testing.assert_close(
        alone["mask_logits"][0], batched["mask_logits"][0], atol=1e-5, rtol=0
    )
    torch.testing.assert_close(alone["seg_hidden"][0], batched["seg_hidden"][0], atol=1e-5, rtol=0)
    if extra == LISA_ONLY:
        assert model.grounding.pointer is None and "ground_logits" not in batched
    else:
        torch.testing.assert_close(
            alone["ground_logits"][0], batched["ground_logits"][0, :4], atol=1e-5, rtol=0
        )
        assert torch.isinf(batched["ground_logits"][0, 4:]).all()
        assert alone["point_pick"][0] == batched["point_pick"][0]
        assert (batched["point_pick"] < batched["num_tokens"]).all()
    if "rerank_logits" in batched:
        # the re-ranker scores the same 4 candidate masks batched or alone
        assert torch.isinf(batched["rerank_logits"][0, 4:]).all()
        k = 4  # the first sample has 4 tokens: 4 real candidates, whatever K
        torch.testing.assert_close(
            alone["rerank_logits"][0], batched["rerank_logits"][0, :k], atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            alone["rerank_iou"][0], batched["rerank_iou"][0, :k], atol=1e-5, rtol=0
        )
    gt = torch.from_numpy(items[0]["mask"]).float()
    for fn in (F.binary_cross_entropy_with_logits, dice_loss):
        torch.testing.assert_close(
            fn(alone["mask_logits"][0], gt), fn(batched["mask_logits"][0], gt), atol=1e-5, rtol=0
        )


def test_visual_tokens_replace_image_token(synthref_root, tiny_sam_checkpoint, tmp_path):
    model, collate, items = _model_and_batch(
        synthref_root, tiny_sam_checkpoint, tmp_path, (), k_values=(2, 4)
    )
    batch = collate(items)
    with torch.no_grad():
        out = model.eval()(batch)
    text = batch["text_lengths"]
    # each sample's LLM sequence = its text minus the <image> token plus its own visual tokens
    assert out["seq_len"].tolist() == (text - 1 + out["num_tokens"]).tolist()
    assert [m.shape for m in out["mask_logits"]] == [m.shape for m in batch["masks"]]


@pytest.mark.parametrize(
    "extra",
    [
        ("grounding.rerank=0",),
        ("grounding.rerank=3", "grounding.rerank_spread=0", "grounding.rerank_context=0"),
        ("grounding.rerank=3", "grounding.rerank_spread=0.3", "grounding.rerank_context=0"),
        ("grounding.rerank=3", "grounding.rerank_context=1"),
    ],
    ids=["pointer", "rerank", "rerank_spread", "rerank_context"],
)
def test_grounding_trains_and_points(extra, synthref_root, tiny_sam_checkpoint, tmp_path):
    """The pointer's losses are in the total, every grounding parameter gets a gradient, and at
    evaluation the pointer changes the prompt: the masks depend on the scores."""
    torch.manual_seed(0)
    model, collate, items = _model_and_batch(synthref_root, tiny_sam_checkpoint, tmp_path, extra)
    _wake_context(model)
    batch = collate(items)
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
    # evaluation points at the top-scored token (or candidate): moving the scores moves the masks
    model.eval()
    with torch.no_grad():
        before = model(batch)
        query = model.grounding.pointer.query
        query.bias.add_(torch.randn_like(query.bias) * 5)
        moved = model(batch)
    assert any(
        not torch.allclose(a, b) for a, b in zip(moved["mask_logits"], before["mask_logits"])
    )


def test_teacher_forcing_points_at_the_target(synthref_root, tiny_sam_checkpoint, tmp_path):
    """In training the prompt points at a target token drawn by its weight, not at the scores."""
    model, collate, items = _model_and_batch(
        synthref_root, tiny_sam_checkpoint, tmp_path, ("grounding.rerank=0",)
    )
    batch = collate(items)
    query = model.grounding.pointer.query
    with torch.no_grad():
        torch.manual_seed(1)  # the same target draws for both passes
        before = model.train()(batch)
        query.bias.add_(torch.randn_like(query.bias) * 5)
        torch.manual_seed(1)
        after = model(batch)
        assert not torch.allclose(before["ground_logits"], after["ground_logits"])
        for a, b in zip(before["mask_logits"], after["mask_logits"]):
            torch.testing.assert_close(a, b)
        model.eval()  # evaluation points at the top-scored token: a sharper score changes nothing
        sharp = model(batch)
        query.weight.mul_(3.0)
        query.bias.mul_(3.0)
        sharper = model(batch)
    for a, b in zip(sharp["mask_logits"], sharper["mask_logits"]):
        torch.testing.assert_close(a, b)


def test_rerank_vote_weight_learns(synthref_root, tiny_sam_checkpoint, tmp_path):
    """The weight of the vote's log mass in the re-ranker's scores starts at 1 and gets a
    gradient from the re-ranking loss."""
    torch.manual_seed(0)
    model, collate, items = _model_and_batch(
        synthref_root, tiny_sam_checkpoint, tmp_path, ("grounding.rerank=3",)
    )
    batch = collate(items)
    vote = model.grounding.pointer.rerank_vote
    assert float(vote.detach()) == 1.0
    out = model.train()(batch)
    out["rerank_iou"] = torch.tensor([[0.0, 0.9, 0.1]]).expand(3, 3)
    model.losses(out, batch)["rerank"].backward()
    assert vote.grad is not None and vote.grad != 0


def test_grounding_is_plain_lisa_for_footprintless_tokens(
    synthref_root, tiny_sam_checkpoint, tmp_path, monkeypatch
):
    """A projector whose tokens have no place in the image (none of the seven now)."""
    monkeypatch.setattr(PROJECTORS["resampler"], "has_regions", False)
    cfg = _cfg(synthref_root, tiny_sam_checkpoint, tmp_path, "resampler")
    with pytest.warns(UserWarning, match="grounding pointer"):
        model = RISModel(cfg, tokenizer_for(cfg))
    assert model.grounding.pointer is None


@pytest.mark.parametrize(
    "bad, key",
    [
        ("grounding.rerank=-2", "grounding.rerank"),
        ("grounding.rerank_context=-1", "grounding.rerank_context"),
        ("grounding.context_heads=3", "grounding.context_heads"),
        ("grounding.rerank_spread=-0.1", "grounding.rerank_spread"),
    ],
)
def test_bad_grounding_settings_are_config_errors(
    bad, key, synthref_root, tiny_sam_checkpoint, tmp_path
):
    from common.errors import ConfigError

    cfg = _cfg(synthref_root, tiny_sam_checkpoint, tmp_path, extra=bad.split())
    with pytest.raises(ConfigError, match=key):
        RISModel(cfg, tokenizer_for(cfg))


@pytest.mark.parametrize("projector", sorted(PROJECTORS))
def test_train_fast_dev_run_every_projector(
    projector, synthref_root, tiny_sam_checkpoint, tmp_path
):
    from lightning_modules.cli.train import train

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
    # TensorBoard's hparams view: the projector, its token budget and the final metrics
    hparams, metric_tags = _hparams(metrics["tensorboard"])
    assert hparams["projector.name"] == projector
    assert hparams["token_budget"] == metrics["token_budget"] != ""
    assert {"final/val_ciou", "final/testB_ciou", "final/tokens_mean"} <= metric_tags


@pytest.mark.parametrize("projector", sorted(PROJECTORS))
def test_every_projector_trains_under_bf16_autocast(
    projector, synthref_root, tiny_sam_checkpoint, tmp_path
):
    """`trainer=gpu` trains in bf16-mixed (autocast): each projector, with the re-ranker's
    spread and context paths on, gives finite masks and loss in bf16, finite float32 gradients
    wherever a gradient arrives, and one to every projector parameter. CPU autocast stands in
    for CUDA's here (same op lists for the dtype casts)."""
    torch.manual_seed(0)
    extra = (*RERANK_CONTEXT, "grounding.rerank_spread=0.3")
    model, collate, items = _model_and_batch(
        synthref_root, tiny_sam_checkpoint, tmp_path, extra, projector
    )
    _wake_context(model)
    batch = collate(items)
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


def _hparams(log_dir: str) -> tuple[dict, set[str]]:
    """The hparams (name → value) and metric tags a run's TensorBoard event files hold."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    values = {}
    for name, value in start.session_start_info.hparams.items():
        values[name] = getattr(value, value.WhichOneof("kind"))
    return values, set(acc.Tags()["scalars"])


@pytest.mark.slow
def test_train_resume_eval_and_tensorboard(synthref_root, tiny_sam_checkpoint, tmp_path):
    """Two epochs with TensorBoard curves, resume from last, then 1-process vs 2-process eval."""
    from lightning_modules.cli.train import train

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
        # the grounding pointer's exact pointing accuracy and the hit / miss cIoU split, also
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
    from lightning_modules import feature_cache

    cfg = _cfg(synthref_root, tiny_sam_checkpoint, tmp_path, "mlp")
    tok = tokenizer_for(cfg)
    model = RISModel(cfg, tok).eval()
    collate = RISCollate(PromptEncoder(tok, cfg.data.prompt, cfg.data.answer), tok.pad_token_id)
    batch = collate(_items(synthref_root, [2, 3]))
    feature_cache.MEMORY.clear()
    with torch.no_grad():
        first = model(batch)
    files = sorted((tmp_path / "cache" / "features").rglob("*.npy"))
    # one file per image for the tower and one for SAM's image embedding, keyed by config hash
    assert len(files) == 2 * len(set(batch["image_ids"].tolist()))
    feature_cache.MEMORY.clear()

    def recompute(images):
        raise AssertionError("features were recomputed instead of read from disk")

    model.tower_features.preprocess = recompute
    model.mask_decoder.image_features.preprocess = recompute
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
    assert first.mask_decoder.image_features.key == again.mask_decoder.image_features.key
    assert moved.tower_features.key != first.tower_features.key
    assert moved.mask_decoder.image_features.key != first.mask_decoder.image_features.key


def _ddp_train(root, sam, runs, projector: str) -> list[str]:
    overrides = tiny_run_overrides(root, sam, runs, projector)
    if projector == "mlp":
        overrides += ["superpixels=grid", "superpixels.k=4"]
    train = ["train", *overrides, "trainer=ddp_cpu", "trainer.max_steps=3"]
    return [*train, "trainer.limit_val_batches=1", "data.limit_test_sentences=8"]


def test_several_processes_without_a_superpixel_cache_refuse_to_start(
    synthref_root, tiny_sam_checkpoint, tmp_path
):
    """One rank would build the cache while the others wait (hours with ViT-H): refuse, and
    name the command that builds it with every process."""
    refused = run_svp(*_ddp_train(synthref_root, tiny_sam_checkpoint, tmp_path, "semantic"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "\nerror: " in "\n" + refused.stderr and "svp precompute trainer=ddp" in refused.stderr
    assert not (tmp_path / "tiny").exists()


@pytest.mark.parametrize("projector", ["mlp", pytest.param("semantic", marks=pytest.mark.slow)])
def test_two_process_ddp_training(projector, synthref_root, tiny_sam_checkpoint, tmp_path):
    """`svp train trainer=ddp_cpu` (two gloo processes) trains the tiny preset: every trainable
    parameter takes part in the loss (DDP refuses otherwise) and the run is saved once."""
    if projector == "semantic":  # its superpixel cache first, as the refusal above asks
        overrides = tiny_run_overrides(synthref_root, tiny_sam_checkpoint, tmp_path, projector)
        assert run_svp("precompute", *overrides).returncode == 0
    proc = run_svp(*_ddp_train(synthref_root, tiny_sam_checkpoint, tmp_path, projector))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "tiny" / f"{projector}-seed0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["val_ciou"] <= 1.0
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 3


@pytest.mark.parametrize("projector", sorted(PROJECTORS))
def test_every_trainable_parameter_gets_a_gradient(
    projector, synthref_root, tiny_sam_checkpoint, tmp_path
):
    """A training step of the tiny preset reaches every trainable parameter: what takes no part
    in the loss is frozen, as DDP (without its slow unused-parameter search) requires."""
    torch.manual_seed(0)
    model, collate, items = _model_and_batch(
        synthref_root, tiny_sam_checkpoint, tmp_path, (), projector
    )
    batch = collate(items)
    model.train()
    model.losses(model(batch), batch)["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_feature_memory_is_bounded_in_bytes():
    """The RAM in front of the feature cache drops the least recently used entries once it holds
    more than its budget: memory stays flat however many images a run sees."""
    from lightning_modules.feature_cache import FeatureMemory

    memory = FeatureMemory(limit_bytes=3 * 4 * 100)  # three 100-float entries
    for i in range(10):
        memory.put(("tower", str(i)), torch.full((100,), float(i)))
        assert memory.bytes <= memory.limit_bytes
    assert len(memory) == 3 and memory.get(("tower", "0")) is None
    assert memory.get(("tower", "7")) is not None  # now the most recently used
    memory.put(("tower", "10"), torch.zeros(100))
    assert memory.get(("tower", "7")) is not None and memory.get(("tower", "8")) is None
    memory.put(("tower", "huge"), torch.zeros(1000))  # larger than the budget: not kept
    assert memory.get(("tower", "huge")) is None and memory.bytes == 3 * 400


def test_a_run_that_builds_its_superpixel_cache_equals_one_that_finds_it(
    synthref_root, tiny_sam_checkpoint, tmp_path
):
    """Building the cache inside `svp train` draws no random numbers the training would see."""
    from lightning_modules.cli.train import train

    extra = ["superpixels=grid", "superpixels.k=4", "trainer.max_steps=4", "trainer.threads=1"]
    extra += ["trainer.limit_val_batches=1", "data.limit_test_sentences=8"]
    built = train(
        _cfg(synthref_root, tiny_sam_checkpoint, tmp_path, "semantic", [*extra, "name=a"])
    )
    found = train(
        _cfg(synthref_root, tiny_sam_checkpoint, tmp_path, "semantic", [*extra, "name=b"])
    )
    for key in ("val_ciou", "testA_ciou", "testB_giou", "val_point_acc"):
        assert built[key] == found[key], key


def test_a_sequence_longer_than_the_llms_positions_warns(
    synthref_root, tiny_sam_checkpoint, tmp_path
):
    model, collate, items = _model_and_batch(
        synthref_root, tiny_sam_checkpoint, tmp_path, (), "mlp"
    )
    items[0]["sentence"] = " ".join(["circle"] * 600)
    with pytest.warns(UserWarning, match="longer than the LLM's 512 positions"):
        with torch.no_grad():
            model.eval()(collate(items[:1]))


def test_a_damaged_feature_file_is_recomputed(synthref_root, tiny_sam_checkpoint, tmp_path):
    from lightning_modules import feature_cache

    model, collate, items = _model_and_batch(
        synthref_root, tiny_sam_checkpoint, tmp_path, (), "mlp", k_values=(2, 3)
    )
    batch = collate(items)
    feature_cache.MEMORY.clear()
    with torch.no_grad():
        first = model.eval()(batch)
    files = sorted((tmp_path / "cache" / "features").rglob("*.npy"))
    files[0].write_bytes(files[0].read_bytes()[:50])  # truncated
    files[1].write_bytes(b"")  # emptied
    feature_cache.MEMORY.clear()
    with torch.no_grad():
        second = model(batch)
    for a, b in zip(first["mask_logits"], second["mask_logits"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert all(f.stat().st_size > 100 for f in files)  # rewritten whole


def test_gradient_accumulation_steps_every_n_batches(synthref_root, tiny_sam_checkpoint, tmp_path):
    from lightning_modules.cli.train import train

    extra = ["superpixels=grid", "superpixels.k=4", "trainer.limit_train_batches=4"]
    extra += ["trainer.accumulate_grad_batches=2", "trainer.limit_val_batches=1"]
    extra += ["data.limit_test_sentences=4"]
    metrics = train(_cfg(synthref_root, tiny_sam_checkpoint, tmp_path, "mlp", extra))
    last = Path(metrics["run_dir"]) / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["global_step"] == 2  # 4 batches, an optimizer step every 2


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


def test_training_killed_then_resumed_equals_an_uninterrupted_run(
    synthref_root, tiny_sam_checkpoint, tmp_path
):
    """SIGKILL `svp train` once its first epoch is saved, rerun with `ckpt_path=last`: the final
    weights and metrics equal those of a run that never stopped (same seed, 1 thread)."""
    import signal
    import time

    overrides = tiny_run_overrides(synthref_root, tiny_sam_checkpoint, tmp_path, "semantic")
    overrides += ["superpixels=grid", "superpixels.k=4", "trainer.threads=1"]
    overrides += ["trainer.max_epochs=3", "trainer.limit_train_batches=3"]
    overrides += ["trainer.limit_val_batches=1", "data.limit_test_sentences=8"]
    whole = run_svp("train", *overrides, "name=whole")
    assert whole.returncode == 0, whole.stderr[-3000:]

    argv = [sys.executable, "-m", "lightning_modules.cli", "train", *overrides, "name=killed"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    run = tmp_path / "killed" / "semantic-seed0"
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # in the second epoch, with the first one saved
    assert proc.wait(60) == -signal.SIGKILL and not (run / "metrics.json").exists()
    resumed = run_svp("train", *overrides, "name=killed", "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    done = tmp_path / "whole" / "semantic-seed0"
    a, b = _tensors(done / "checkpoints" / "last.ckpt"), _tensors(last)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = [json.loads((r / "metrics.json").read_text()) for r in (done, run)]
    for key in ("val_ciou", "val_giou", "testA_ciou", "testB_ciou", "epochs"):
        assert metrics[0][key] == metrics[1][key], key
