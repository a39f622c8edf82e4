"""The language model, its tokenizer and its input sequence: a tiny LLaMA trained from scratch, or
local real weights.

Both tokenizers carry the two tokens the RIS model needs: ``<image>`` (where the visual tokens are
spliced into ``inputs_embeds``) and ``[SEG]`` (whose hidden state becomes SAM's prompt).
"""

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
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

from common import llava
from common.errors import ConfigError

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
    # the random LLM's vocabulary, which `svp bench` pads its tokenizer to with unused tokens, so
    # embeddings and lm_head take a real model's shape (LLaMA's 32000); null: the tokenizer's own
    vocab_size: int | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)
    full_finetune: bool = True
    dtype: str = "float32"
    gradient_checkpointing: bool = False


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
    if cfg.vocab_size is not None and cfg.vocab_size != len(tokenizer):
        raise ConfigError(
            f"llm.vocab_size={cfg.vocab_size} but the tokenizer has {len(tokenizer)} tokens: only "
            "`svp bench` pads the vocabulary to llm.vocab_size (to measure at a real model's "
            "shape); leave it null to train"
        )
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
    dtype = _dtype(cfg)
    return model if dtype == "auto" else model.to(dtype)


def _pretrained(cfg: LLMConfig) -> PreTrainedModel:
    if not Path(cfg.path).is_dir():
        raise ConfigError(
            f"llm.path={cfg.path!r} is not a folder; point it at a local HF model folder "
            "(LLaVA/Vicuna/LLaMA weights) or set it to null for the tiny LLM"
        )
    if llava.is_llava(cfg.path):
        return llava.language_model(cfg.path, _dtype(cfg))
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
    model = _pretrained(cfg) if cfg.path else _tiny_llama(cfg, tokenizer)
    if model.get_input_embeddings().num_embeddings != len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
    if not cfg.full_finetune:
        model = _train_adapters(model, cfg)
    for p in model.parameters():
        if p.requires_grad:  # float32 master weights (`llm_precision`)
            p.data = p.data.float()
    return model


def _train_adapters(model: torch.nn.Module, cfg: LLMConfig) -> torch.nn.Module:
    """Freeze the LLM; train LoRA adapters (if enabled) and the embeddings and lm_head."""
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


class Sequence(NamedTuple):
    """The LLM's input: embeddings B×L×D, attention mask B×L, text labels B×L (−100 where no
    loss: visual tokens, prompt, padding) and the position of [SEG] per sample."""

    embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    seg_pos: torch.Tensor


def build_sequence(
    llm,
    tokens: torch.Tensor,
    token_mask: torch.Tensor,
    batch: dict,
    image_id: int,
    seg_id: int | None,
) -> Sequence:
    """Splice each sample's own visual tokens (`tokens` B×N×D where `token_mask`) in place of its
    `<image>` token and pad on the right, so every sample keeps its own number of tokens. With
    `seg_id` None (alignment conversations) no [SEG] is looked for and `seg_pos` is all −1."""
    embed = llm.get_input_embeddings()
    ids, labels, lengths = batch["input_ids"], batch["text_labels"], batch["text_lengths"]
    seqs, labs, seg_pos = [], [], []
    for b in range(ids.shape[0]):
        row = ids[b, : int(lengths[b])]
        where = (row == image_id).nonzero()
        if len(where) != 1:
            raise ValueError(f"sample {b}: expected exactly one <image> token, found {len(where)}")
        k = int(where[0])
        vis = tokens[b][token_mask[b]]
        text = embed(row)
        seqs.append(torch.cat([text[:k], vis.to(text.dtype), text[k + 1 :]]))
        fill = torch.full((vis.shape[0],), -100, dtype=labels.dtype, device=labels.device)
        labs.append(torch.cat([labels[b, :k], fill, labels[b, k + 1 : len(row)]]))
        if seg_id is None:
            seg_pos.append(-1)
            continue
        seg = (torch.cat([row[:k], fill, row[k + 1 :]]) == seg_id).nonzero()
        if len(seg) == 0:
            raise ValueError(f"sample {b}: the answer has no [SEG] token")
        seg_pos.append(int(seg[0]))
    length = max(s.shape[0] for s in seqs)
    limit = getattr(getattr(llm, "config", None), "max_position_embeddings", None)
    if limit is not None and length > limit:
        warnings.warn(
            f"an LLM sequence of {length} tokens (visual tokens and prompt) is longer than the "
            f"LLM's {limit} positions (llm.max_position_embeddings): the positions past them "
            "are ones the LLM was never trained on",
            stacklevel=2,
        )
    emb = seqs[0].new_zeros((len(seqs), length, seqs[0].shape[-1]))
    attn = torch.zeros((len(seqs), length), dtype=torch.long, device=emb.device)
    lab_out = torch.full((len(seqs), length), -100, dtype=labels.dtype, device=labels.device)
    for b, (s, lb) in enumerate(zip(seqs, labs)):
        emb[b, : s.shape[0]] = s
        attn[b, : s.shape[0]] = 1
        lab_out[b, : lb.shape[0]] = lb
    return Sequence(emb, attn, lab_out, torch.tensor(seg_pos, device=emb.device))


def frozen_dtype(llm: torch.nn.Module) -> torch.dtype | None:
    """The half-precision dtype the LLM's frozen weights are kept in (None: all float32)."""
    low = (torch.bfloat16, torch.float16)
    return next((p.dtype for p in llm.parameters() if p.dtype in low), None)


def llm_precision(dtype: torch.dtype | None, device: torch.device):
    """Autocast to `dtype` (see `frozen_dtype`): half-precision frozen weights and float32
    trainable (master) weights compute together in it."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def text_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the answer tokens (labels ≠ −100), mean over the batch."""
    target = labels[:, 1:]
    token_ce = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), target, ignore_index=-100, reduction="none"
    )
    valid = (target != -100).float()
    return (token_ce * valid).sum() / valid.sum().clamp_min(1.0)


def seg_state(hidden: torch.Tensor, seg_pos: torch.Tensor) -> torch.Tensor:
    """B×D float: the last hidden state that predicts [SEG] (one position before it)."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), seg_pos - 1].float()


def tokenizer_texts(cfg: DictConfig) -> list[str]:
    """Every sentence of the training splits (`data.dataset`'s, or each `data.mix` data set's)
    and SynthRef's full grammar vocabulary."""
    from datamodules.mix import training_sets
    from datamodules.refer import ReferDataset

    d = cfg.data
    texts = []
    for source in training_sets(d):
        refer = ReferDataset(d.root, source.dataset, source.split_by, d.train_split)
        texts += [s.get("sent", "") for ref in refer.refs for s in ref["sentences"]]
    if d.dataset == "synthref":  # a mix draws on data.dataset's images folder: SynthRef alone
        from datamodules.synthetic import synthref_vocabulary

        texts.append(" ".join(synthref_vocabulary()))
    texts.append(d.prompt.replace("{sentence}", ""))
    texts.append(d.answer)
    return texts


def tokenizer_for(
    cfg: DictConfig,
    save_dir: str | Path | None = None,
    extra_texts: list[str] = (),
    aligned: str | Path | None = None,
):
    """A real model's own tokenizer (llm.path / llm.tokenizer_path), else the one saved in
    `save_dir`, else an `svp align` folder's (`aligned`), else a tiny one trained on the data
    set's words and `extra_texts`, saved in `save_dir`."""
    source = cfg.llm.tokenizer_path or cfg.llm.path
    if source:
        tok = load_tokenizer(source)
        if save_dir is not None:
            tok.save_pretrained(save_dir)
        return tok
    if save_dir is not None and (Path(save_dir) / "tokenizer.json").is_file():
        return load_tokenizer(save_dir)
    if aligned is not None:
        tok = load_tokenizer(Path(aligned) / "tokenizer")
        if save_dir is not None:
            tok.save_pretrained(save_dir)
        return tok
    return build_tokenizer([*tokenizer_texts(cfg), *extra_texts], save_dir)
