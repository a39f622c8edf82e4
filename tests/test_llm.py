import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from common.errors import ConfigError
from lightning_modules.llm import (
    ANSWER,
    PROMPT_TEMPLATE,
    LLMConfig,
    LoraSettings,
    build_llm,
    build_tokenizer,
    image_token_id,
    load_tokenizer,
    seg_token_id,
)

TEXTS = ["the big red circle", "the small blue square left of the circle", "second triangle"]
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TEXTS)


def sample_ids(tokenizer):
    text = PROMPT_TEMPLATE.format(expression="the big red circle") + " " + ANSWER
    return torch.tensor([tokenizer(text).input_ids])


def test_tokenizer_special_tokens_and_round_trip(tokenizer, tmp_path):
    seg, image = seg_token_id(tokenizer), image_token_id(tokenizer)
    ids = sample_ids(tokenizer)[0].tolist()
    assert ids[0] == tokenizer.bos_token_id and ids[1] == image
    assert ids.count(seg) == 1 and ids.count(tokenizer.unk_token_id) == 0
    assert tokenizer.tokenize("Sure, [SEG].") == ["sure", ",", "[SEG]", "."]
    sentence = "What is the small blue square left of the circle?"
    encoded = tokenizer(sentence).input_ids
    decoded = tokenizer.decode(encoded, skip_special_tokens=True)
    assert decoded == "what is the small blue square left of the circle ?"
    assert tokenizer(decoded).input_ids == encoded
    assert tokenizer.pad_token == "<pad>"

    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded(sentence).input_ids == encoded and len(loaded) == len(tokenizer)
    assert seg_token_id(loaded) == seg


def test_load_tokenizer_adds_missing_tokens_and_pad(tmp_path):
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "hello": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>"
    ).save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.tokenize("hello [SEG] <image>") == ["hello", "[SEG]", "<image>"]
    assert {seg_token_id(loaded), image_token_id(loaded)} == {3, 4}
    assert loaded.pad_token == "<unk>"
    with pytest.raises(ConfigError, match="llm.tokenizer_path"):
        load_tokenizer(tmp_path / "missing")


def test_tiny_llm_forward_with_inputs_embeds(tokenizer):
    model = build_llm(LLMConfig(**TINY), tokenizer)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert all(p.requires_grad for p in model.parameters())
    ids = sample_ids(tokenizer)
    embeds = torch.cat([torch.randn(1, 5, 32), model.get_input_embeddings()(ids)], dim=1)
    out = model(
        inputs_embeds=embeds,
        attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
        output_hidden_states=True,
    )
    assert out.logits.shape == (1, embeds.shape[1], len(tokenizer))
    assert out.hidden_states[-1].shape == embeds.shape


def test_saved_llm_loads_through_build_llm_with_identical_logits(tokenizer, tmp_path):
    tiny = build_llm(LLMConfig(**TINY), tokenizer).eval()
    tiny.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = build_llm(LLMConfig(path=str(tmp_path)), load_tokenizer(tmp_path)).eval()
    ids = sample_ids(tokenizer)
    with torch.no_grad():
        assert torch.allclose(tiny(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-5)

    lora = LLMConfig(path=str(tmp_path), full_finetune=False, lora=LoraSettings(enabled=True))
    adapted = build_llm(lora, tokenizer).eval()
    with torch.no_grad():
        assert torch.allclose(tiny(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5)


def test_lora_targets_q_and_v_only_and_freezes_base(tokenizer):
    cfg = LLMConfig(
        **TINY, full_finetune=False, lora=LoraSettings(enabled=True), gradient_checkpointing=True
    )
    model = build_llm(cfg, tokenizer)
    lora_parents = {
        name.rsplit(".", 1)[0]
        for name, _ in model.named_modules()
        if name.endswith((".lora_A", ".lora_B"))
    }
    assert lora_parents and {p.rsplit(".", 1)[1] for p in lora_parents} == {"q_proj", "v_proj"}
    assert len(lora_parents) == 2 * TINY["num_hidden_layers"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "embed_tokens" in n or "lm_head" in n for n in trainable)
    assert any("embed_tokens" in n for n in trainable) and any("lm_head" in n for n in trainable)
    assert not any("base_layer" in n for n in trainable)

    model.train()
    ids = sample_ids(tokenizer)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None for g in grads)


def test_config_errors(tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="llm.path"):
        build_llm(LLMConfig(path=str(tmp_path / "missing")), tokenizer)
    with pytest.raises(ConfigError, match="llm.lora.enabled and llm.full_finetune"):
        build_llm(LLMConfig(**TINY, lora=LoraSettings(enabled=True)), tokenizer)
    with pytest.raises(ConfigError, match="llm.dtype"):
        build_llm(LLMConfig(**TINY, dtype="float8"), tokenizer)
    bad = LoraSettings(enabled=True, target_modules=["query"])
    with pytest.raises(ConfigError, match="llm.lora.target_modules"):
        build_llm(LLMConfig(**TINY, full_finetune=False, lora=bad), tokenizer)


def test_visual_tokens_attend_causally_and_padding_is_ignored(tokenizer):
    """As in LLaVA, a visual token sees only the tokens before it, and the padding slot at the
    end changes nothing."""
    torch.manual_seed(0)
    model = build_llm(LLMConfig(**TINY), tokenizer).eval()
    start, n, length = 2, 4, 9  # text, 4 visual tokens, text; one pad slot at the end
    attn = torch.ones(1, length, dtype=torch.long)
    attn[0, -1] = 0

    def hidden(embeds):
        out = model(inputs_embeds=embeds, attention_mask=attn, output_hidden_states=True)
        return out.hidden_states[-1][0]

    embeds = torch.randn(1, length, 32)
    base = hidden(embeds)
    last_vis = embeds.clone()
    last_vis[0, start + n - 1] += 1.0
    moved = hidden(last_vis)
    torch.testing.assert_close(moved[:start], base[:start])  # the text before: causal
    torch.testing.assert_close(moved[start], base[start])  # the first visual token too
    padded = embeds.clone()
    padded[0, -1] += 5.0  # the pad slot is never attended to
    torch.testing.assert_close(hidden(padded)[:-1], base[:-1])
