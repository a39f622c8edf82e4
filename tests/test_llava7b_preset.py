"""`preset=llava7b` on tiny checkpoints the tests save themselves in the real formats: a
LLaMA/Vicuna causal LM with a LLaMA tokenizer (byte-fallback BPE, no [SEG] or <image>), a LLaVA-1.5
model (`LlavaForConditionalGeneration`: LLM, CLIP tower and projector in one folder) with its
tokenizer, CLIP at patch 14 / 336 px, and SAM in its official state-dict layout."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_svp
from refer_fixture import write_synthref_as_refcoco
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from datamodules.refer import ReferDataset
from datamodules.ris import PromptEncoder, RISCollate, resize_labels
from datamodules.superpixels import SOURCES
from lightning_modules.cli.config import load_config
from lightning_modules.llm import tokenizer_for
from lightning_modules.projectors import PROJECTORS
from lightning_modules.ris_model import RISModel

TINY_CLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=336,
    patch_size=14,
    projection_dim=16,
)
TINY_LLAMA = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
)


def _llama_tokenizer(texts: list[str]) -> LlamaTokenizer:
    """A LLaMA tokenizer as Vicuna ships it: byte-fallback BPE over "▁"-prefixed words, <s> first,
    and neither [SEG] nor <image>."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    corpus = " ".join(texts)
    for c in sorted(set(corpus.replace(" ", "▁").replace("\n", "")) | {"▁"}):
        vocab.setdefault(c, len(vocab))
    merges = []
    for word in sorted(set(corpus.split())):
        piece = "▁"
        for c in word:
            if piece + c not in vocab:
                vocab[piece + c] = len(vocab)
                merges.append((piece, c))
            piece += c
    return LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def _texts(root: Path) -> list[str]:
    cfg = load_config(["preset=llava7b"])
    sents = [
        s["sent"]
        for r in ReferDataset(str(root), "synthref", "unc", "train").refs
        for s in r["sentences"]
    ]
    return [*sents, cfg.data.prompt, cfg.data.answer]


@pytest.fixture(scope="module")
def vicuna_dir(synthref_root, tmp_path_factory) -> Path:
    """A tiny LLaMA (Vicuna's class and format) with its tokenizer."""
    path = tmp_path_factory.mktemp("vicuna")
    tok = _llama_tokenizer(_texts(synthref_root))
    tok.save_pretrained(path)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), **TINY_LLAMA)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llava_dir(synthref_root, tmp_path_factory) -> Path:
    """A tiny LLaVA-1.5 in the transformers format, its tokenizer with <image> added as LLaVA's."""
    path = tmp_path_factory.mktemp("llava")
    tok = _llama_tokenizer(_texts(synthref_root))
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.save_pretrained(path)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**TINY_CLIP),
        text_config=LlamaConfig(vocab_size=len(tok), **TINY_LLAMA),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def refer_root(synthref_root, tmp_path_factory) -> Path:
    """RefCOCO/+/g in the REFER layout, made of the tiny SynthRef's files."""
    return write_synthref_as_refcoco(synthref_root, tmp_path_factory.mktemp("refer"))


def _preset(root, sam, runs, llm: Path, vision: Path, projector: str = "mlp") -> list[str]:
    """`preset=llava7b` (RefCOCO) with only the paths, the data root and the widths set."""
    return [
        "preset=llava7b",
        f"data.root={root}",
        f"runs_root={runs}",
        f"projector={projector}",
        f"vision.path={vision}",
        f"llm.path={llm}",
        f"mask_decoder.checkpoint={sam}",
        "mask_decoder.model_type=custom",
        "mask_decoder.seg_mlp_hidden=32",
    ]


def _model(root, sam, runs, llm, vision, projector="mlp"):
    cfg = load_config([*_preset(root, sam, runs, llm, vision, projector), "trainer=cpu"])
    tokenizer = tokenizer_for(cfg)
    model = RISModel(cfg, tokenizer)
    refer = ReferDataset(str(root), "refcoco", "unc", "train")
    grid = SOURCES["grid"]({"name": "grid", "k": 3})  # 9 superpixels for `semantic`
    items = []
    for i in range(3):
        item = dict(refer[i])
        item["superpixels"] = grid(item["image"])
        item["labels"] = resize_labels(item["superpixels"], cfg.data.label_size)
        items.append(item)
    collate = RISCollate(PromptEncoder(tokenizer, cfg.data.prompt, cfg.data.answer), 0)
    return model, collate(items)


def test_vicuna_with_lora_bf16_and_float32_master_weights(
    refer_root, tiny_sam_checkpoint, tmp_path, vicuna_dir, clip_dir
):
    model, batch = _model(refer_root, tiny_sam_checkpoint, tmp_path, vicuna_dir, clip_dir)
    assert "[SEG]" in model.tokenizer.get_vocab() and "<image>" in model.tokenizer.get_vocab()
    assert model.tower.grid_size == (24, 24)  # 336 px / patch 14, both from the checkpoint

    trainable = {n: p for n, p in model.llm.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if "lora_" in n}
    assert lora and all(("q_proj" in n or "v_proj" in n) for n in lora)
    assert not any("base_layer" in n for n in trainable)  # the original weights stay frozen
    assert any("embed_tokens" in n for n in trainable) and any("lm_head" in n for n in trainable)
    # bf16 frozen weights, float32 master copies of what trains; the LLM computes in bf16
    assert all(p.dtype == torch.float32 for p in trainable.values())
    frozen = [p for p in model.llm.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert model.llm_dtype == torch.bfloat16
    assert not any(p.requires_grad for p in model.tower.parameters())

    out = model(batch)
    assert out["num_tokens"].tolist() == [576] * 3
    loss = model.losses(out, batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable.values())


def test_llava_checkpoint_gives_llm_tower_and_mlp(
    refer_root, tiny_sam_checkpoint, tmp_path, llava_dir
):
    """One LLaVA folder: its LLM (with lm_head), its CLIP tower and its trained projector."""
    model, batch = _model(refer_root, tiny_sam_checkpoint, tmp_path, llava_dir, llava_dir)
    llava = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    proj = llava.model.multi_modal_projector
    assert torch.equal(model.projector.mlp[0].weight, proj.linear_1.weight)
    assert torch.equal(model.projector.mlp[2].bias, proj.linear_2.bias)
    tower = dict(model.tower.model.named_parameters())
    for name, p in llava.model.vision_tower.named_parameters():
        assert torch.equal(tower[name], p), name
    llm = model.llm.get_base_model()
    layer = llm.model.layers[1].mlp.down_proj.weight
    bf16 = llava.model.language_model.layers[1].mlp.down_proj.weight.bfloat16()  # llm.dtype
    assert torch.equal(layer, bf16)
    old_vocab = llava.lm_head.weight.shape[0]  # [SEG] is added after LLaVA's rows
    head = llava.lm_head.weight.bfloat16().float()  # trainable: a float32 master copy
    assert torch.equal(llm.lm_head.weight[:old_vocab], head)
    assert model.tokenizer.convert_tokens_to_ids("<image>") == llava.config.image_token_index
    out = model(batch)
    assert torch.isfinite(model.losses(out, batch)["loss"])


@pytest.mark.parametrize("projector", sorted(set(PROJECTORS) - {"mlp"}))
def test_every_projector_trains_on_a_llava_checkpoint(
    projector, refer_root, tiny_sam_checkpoint, tmp_path, llava_dir
):
    model, batch = _model(
        refer_root, tiny_sam_checkpoint, tmp_path, llava_dir, llava_dir, projector
    )
    model.losses(model(batch), batch)["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


SHORT = [
    "trainer.max_steps=2",
    "trainer.limit_val_batches=1",
    "data.limit_test_sentences=4",
    "trainer.enable_progress_bar=false",
]


@pytest.mark.parametrize("checkpoint", ["vicuna", "llava"])
def test_llava7b_preset_trains_validates_tests_and_resumes(
    checkpoint, refer_root, tiny_sam_checkpoint, tmp_path, vicuna_dir, clip_dir, llava_dir
):
    llm, vision = (vicuna_dir, clip_dir) if checkpoint == "vicuna" else (llava_dir, llava_dir)
    preset = _preset(refer_root, tiny_sam_checkpoint, tmp_path, llm, vision, "semantic")
    first = run_svp("train", *preset, "trainer=cpu", *SHORT)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "llava7b" / "semantic-seed0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"val_ciou", "testA_ciou", "testB_ciou"} <= set(metrics)
    resumed = run_svp(
        "train", *preset, "trainer=cpu", *SHORT, "trainer.max_steps=4", "ckpt_path=last"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 4
    assert state["hyper_parameters"]["cfg"]["vision"]["path"] == str(vision)


@pytest.mark.slow
def test_llava7b_preset_trains_with_two_processes(
    refer_root, tiny_sam_checkpoint, tmp_path, vicuna_dir, clip_dir
):
    """`trainer=ddp_cpu` (2 gloo processes) trains the real-format rehearsal, the ranks end with
    the same weights (checked at the end of fit), and its 2-process evaluation equals the
    1-process one."""
    preset = _preset(refer_root, tiny_sam_checkpoint, tmp_path, vicuna_dir, clip_dir)
    proc = run_svp("train", *preset, "trainer=ddp_cpu", *SHORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "llava7b" / "mlp-seed0"
    results = {}
    for trainer in ("cpu", "ddp_cpu"):
        ev = ["eval", "--config", str(run / "config.yaml"), f"trainer={trainer}"]
        ev += ["data.eval_batch_size=1", "data.limit_test_sentences=8"]
        ev += [
            "trainer.enable_progress_bar=false",
            "--ckpt",
            str(run / "checkpoints" / "last.ckpt"),
        ]
        proc = run_svp(*ev)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[trainer] = json.loads((run / "eval-last.json").read_text())
    for split in ("val", "testA", "testB"):
        for metric in ("ciou", "giou"):
            key = f"{split}_{metric}"
            assert results["cpu"][key] == pytest.approx(results["ddp_cpu"][key], abs=1e-6)


def test_ranks_that_diverged_are_an_error(
    refer_root, tiny_sam_checkpoint, tmp_path, vicuna_dir, clip_dir, monkeypatch
):
    """The end-of-fit check compares the trainable weights of every rank."""
    model, _ = _model(refer_root, tiny_sam_checkpoint, tmp_path, vicuna_dir, clip_dir)
    model._trainer = SimpleNamespace(world_size=2)
    same = []
    monkeypatch.setattr(model, "_gather", lambda values: same.extend(values) or values * 2)
    model.on_train_end()  # both ranks hold the same digest
    monkeypatch.setattr(model, "_gather", lambda values: [*values, "0" * 64])
    with pytest.raises(RuntimeError, match="different weights"):
        model.on_train_end()
    assert len(same) == 1 and len(same[0]) == 64


@pytest.mark.parametrize(
    ("model_type", "expected"), [("vit_h", (32, 0.88, 0.95)), ("custom", (16, 0.0, 0.5))]
)
def test_superpixel_thresholds_follow_the_sam_model(model_type, expected):
    """SAM's own automatic-mask defaults for the official models, the small SAM's own values
    for it; on the trainer's device (CUDA when there is one)."""
    from omegaconf import OmegaConf

    from datamodules.superpixels.precompute import resolve_source_config

    cfg = load_config(["preset=llava7b", f"mask_decoder.model_type={model_type}"])
    source = resolve_source_config(OmegaConf.to_container(cfg.superpixels, resolve=True))
    keys = ("points_per_side", "pred_iou_thresh", "stability_score_thresh")
    assert tuple(source[k] for k in keys) == expected
    assert source["device"] == "auto"
    explicit = {**source, "pred_iou_thresh": 0.5}  # a value set by hand is kept
    assert resolve_source_config(explicit)["pred_iou_thresh"] == 0.5
