"""The language model and its tokenizer: a tiny LLaMA trained from scratch, or local real weights.

Both tokenizers carry the two tokens the RIS model needs: ``<image>`` (where the visual tokens are
spliced into ``inputs_embeds``) and ``[SEG]`` (whose hidden state becomes SAM's prompt).
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, TaskType, get_peft_model
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from datamodules.errors import ConfigError

IMAGE_TOKEN = "<image>"
SEG_TOKEN = "[SEG]"
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
PROMPT_TEMPLATE = "<image> What is {expression} in this image? Please output segmentation mask."
ANSWER = "Sure, [SEG]."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": "auto"}


@dataclass
class LoraSettings:
    """LoRA as LISA uses it: rank 8, alpha 16, on the attention query and value projections."""

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class LLMConfig:
    """A local HF folder (``path``) or, when None, a tiny random-init LLaMA of the sizes below.

    Training mode: ``lora.enabled`` (LoRA adapters + embeddings/lm_head), ``full_finetune`` (every
    weight), or neither (only embeddings/lm_head train, so the new tokens still learn).
    """

    path: str | None = None
    tokenizer_path: str | None = None
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 512
    # tiny LLM only: std of the random word embeddings (None = HF's initializer_range, 0.02); a
    # larger value keeps the words audible beside visual tokens of a much larger norm
    embed_init_std: float | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)
    full_finetune: bool = True
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    # how the visual tokens attend to each other: `causal` (LLaVA/LISA: each sees the ones before
    # it) or `bidirectional` (each sees every visual token of its image, as Gemma 3's and
    # PaliGemma's image tokens do; the text stays causal) — a patch then sees the rest of its
    # object, not only the patches above and to its left
    visual_attention: str = "causal"


VISUAL_ATTENTION = ("causal", "bidirectional")


def prefix_attention_mask(
    attn: torch.Tensor, image_pos: torch.Tensor, num_vis: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Additive B×1×L×L mask (0 = attend, dtype's min = not): causal over the valid positions of
    `attn` (B×L, right padding), plus every visual token of a sample attending to all of its
    visual tokens [image_pos, image_pos + num_vis). Padded rows keep position 0, so no row is
    empty."""
    length = attn.shape[1]
    p = torch.arange(length, device=attn.device)
    causal = p[None, :, None] >= p[None, None, :]  # 1×L(query)×L(key)
    keys = attn.bool()[:, None, :]
    vis = (p[None] >= image_pos[:, None]) & (p[None] < (image_pos + num_vis)[:, None])  # B×L
    block = vis[:, :, None] & vis[:, None, :]
    allowed = (causal & keys) | block
    mask = torch.zeros(allowed.shape, dtype=dtype, device=attn.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def build_tokenizer(
    texts: list[str], save_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """A lowercase word-level tokenizer over ``texts`` plus the prompt template and answer.

    Words and punctuation marks are tokens; ``<image>`` and ``[SEG]`` are single special tokens and
    every encoding starts with ``<s>``, as LLaMA's does. Saved with ``save_pretrained`` when
    ``save_dir`` is given.
    """
    specials = [PAD, BOS, EOS, UNK, IMAGE_TOKEN, SEG_TOKEN]
    backend = Tokenizer(models.WordLevel(unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    corpus = [*texts, PROMPT_TEMPLATE.format(expression=""), ANSWER]
    backend.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials))
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, backend.token_to_id(BOS))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )
    tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN, SEG_TOKEN]})
    if save_dir is not None:
        tokenizer.save_pretrained(save_dir)
    return tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A saved tokenizer, with ``<image>``/``[SEG]`` added if missing (real LLaVA lacks [SEG])."""
    if not Path(path).is_dir():
        raise ConfigError(
            f"llm.tokenizer_path (or llm.path)={str(path)!r} is not a tokenizer folder; point it "
            "at a save_pretrained folder, or leave llm.path null to train a tiny tokenizer"
        )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    missing = [t for t in (IMAGE_TOKEN, SEG_TOKEN) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens(
            {"extra_special_tokens": missing}, replace_extra_special_tokens=False
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ConfigError(
            f"the tokenizer has no {token} token; build it with build_tokenizer or load_tokenizer"
        )
    return token_id


def seg_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Id of ``[SEG]``."""
    return _token_id(tokenizer, SEG_TOKEN)


def image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Id of ``<image>``."""
    return _token_id(tokenizer, IMAGE_TOKEN)


def _dtype(cfg: LLMConfig):
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"llm.dtype={cfg.dtype!r} is unknown; use one of {', '.join(DTYPES)}")
    return DTYPES[cfg.dtype]


def _tiny_llama(cfg: LLMConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = AutoModelForCausalLM.from_config(config)
    if cfg.embed_init_std is not None:
        torch.nn.init.normal_(model.get_input_embeddings().weight, std=cfg.embed_init_std)
    dtype = _dtype(cfg)
    return model if dtype == "auto" else model.to(dtype)


def _pretrained(cfg: LLMConfig) -> PreTrainedModel:
    if not Path(cfg.path).is_dir():
        raise ConfigError(
            f"llm.path={cfg.path!r} is not a folder; point it at a local HF model folder "
            "(LLaVA/Vicuna/LLaMA weights) or set it to null for the tiny LLM"
        )
    return AutoModelForCausalLM.from_pretrained(cfg.path, local_files_only=True, dtype=_dtype(cfg))


def _train_embeddings(model: torch.nn.Module) -> None:
    """Unfreeze the input embeddings and lm_head, as LISA does, so ``[SEG]``'s rows learn."""
    model.get_input_embeddings().requires_grad_(True)
    model.get_output_embeddings().requires_grad_(True)


def build_llm(cfg: LLMConfig, tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
    """The causal LM, embeddings resized to ``tokenizer``, trainable as ``cfg`` says.

    With LoRA the result is a peft ``PeftModelForCausalLM``; it takes the same ``forward``
    arguments (``inputs_embeds``, ``attention_mask``, ``output_hidden_states``).
    """
    if cfg.lora.enabled and cfg.full_finetune:
        raise ConfigError(
            "llm.lora.enabled and llm.full_finetune are both true; set one of them to false"
        )
    if cfg.visual_attention not in VISUAL_ATTENTION:
        raise ConfigError(
            f"llm.visual_attention must be one of {', '.join(VISUAL_ATTENTION)}, "
            f"got {cfg.visual_attention!r}."
        )
    model = _pretrained(cfg) if cfg.path else _tiny_llama(cfg, tokenizer)
    if model.get_input_embeddings().num_embeddings != len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
    if cfg.full_finetune:
        return model
    model.requires_grad_(False)
    if cfg.lora.enabled:
        lora = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules),
        )
        try:
            model = get_peft_model(model, lora)
        except ValueError as e:
            raise ConfigError(
                f"llm.lora.target_modules={list(cfg.lora.target_modules)} do not fit the LLM "
                f"({e}); name its attention projections, e.g. q_proj and v_proj for LLaMA"
            ) from e
    _train_embeddings(model)
    return model
