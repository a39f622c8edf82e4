"""`preset=llava7b` on tiny local checkpoints the test saves itself: the real-weights code path
(local CLIP, a LLaMA + tokenizer without [SEG], LoRA on q_proj/v_proj, bf16 LLM, SAM checkpoint)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from datamodules.refer import ReferDataset
from datamodules.ris import PromptEncoder, RISCollate
from lightning_modules.cli.config import load_config
from lightning_modules.llm import tokenizer_for
from lightning_modules.ris_model import RISModel


def _plain_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A tokenizer like a real LLaMA one: no [SEG], no <image>."""
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *sorted(set(words))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def test_llava7b_preset_on_tiny_local_checkpoints(synthref_root, tiny_sam_checkpoint, tmp_path):
    torch.manual_seed(0)
    clip_dir, llm_dir = tmp_path / "clip", tmp_path / "llm"
    CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
        )
    ).save_pretrained(clip_dir)
    refer = ReferDataset(str(synthref_root), "synthref", "unc", "train")
    words = [w.lower() for r in refer.refs for s in r["sentences"] for w in s["sent"].split()]
    words += "a chat between curious user and an artificial intelligence assistant".split()
    words += ". user : what is in this image ? please output segmentation mask sure ,".split()
    tok = _plain_tokenizer(words)
    tok.save_pretrained(llm_dir)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    ).save_pretrained(llm_dir)

    cfg = load_config(
        [
            "preset=llava7b",
            "data=synthref",
            f"data.root={synthref_root}",
            f"runs_root={tmp_path / 'runs'}",
            "projector=mlp",
            "trainer=cpu",
            f"vision.path={clip_dir}",
            "vision.image_size=64",
            f"llm.path={llm_dir}",
            f"mask_decoder.checkpoint={tiny_sam_checkpoint}",
            "mask_decoder.model_type=custom",
            "mask_decoder.seg_mlp_hidden=32",
        ]
    )
    assert cfg.llm.dtype == "bfloat16" and cfg.llm.lora.enabled
    tokenizer = tokenizer_for(cfg)
    assert "[SEG]" in tokenizer.get_vocab() and "<image>" in tokenizer.get_vocab()
    model = RISModel(cfg, tokenizer)

    trainable = {n for n, p in model.llm.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if "lora_" in n}
    assert lora and all(("q_proj" in n or "v_proj" in n) for n in lora)
    assert not any("k_proj" in n or "o_proj" in n or "mlp" in n for n in lora)
    base_attn = [n for n in trainable if "base_layer" in n]
    assert not base_attn  # the original 7B weights stay frozen
    assert not any(p.requires_grad for p in model.tower.parameters())
    assert not any(p.requires_grad for p in model.mask_decoder.sam.image_encoder.parameters())

    items = [refer[i] for i in range(3)]
    collate = RISCollate(PromptEncoder(tokenizer, cfg.data.prompt, cfg.data.answer), 0)
    batch = collate(items)
    out = model(batch)
    assert out["num_tokens"].tolist() == [16, 16, 16]  # 64 px / patch 16 → 4×4 patch tokens
    loss = model.losses(out, batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    lora_grads = [p.grad for n, p in model.llm.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert all(p.grad is not None for p in model.projector.parameters())
