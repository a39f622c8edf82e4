"""The tokenizer a run uses: a real model's own (llm.path / llm.tokenizer_path) or a tiny one
trained on the data set's words and saved inside the run folder."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def tokenizer_texts(cfg: DictConfig) -> list[str]:
    """Every sentence of the training split (and SynthRef's full grammar vocabulary)."""
    from datamodules.refer import ReferDataset

    refer = ReferDataset(cfg.data.root, cfg.data.dataset, cfg.data.split_by, cfg.data.train_split)
    texts = [s.get("sent", "") for ref in refer.refs for s in ref["sentences"]]
    if cfg.data.dataset == "synthref":
        from datamodules.synthetic import synthref_vocabulary

        texts.append(" ".join(synthref_vocabulary()))
    texts.append(cfg.data.prompt.replace("{sentence}", ""))
    texts.append(cfg.data.answer)
    return texts


def tokenizer_for(cfg: DictConfig, save_dir: str | Path | None = None):
    from lightning_modules.llm import build_tokenizer, load_tokenizer

    source = cfg.llm.tokenizer_path or cfg.llm.path
    if source:
        tok = load_tokenizer(source)
        if save_dir is not None:
            tok.save_pretrained(save_dir)
        return tok
    if save_dir is not None and (Path(save_dir) / "tokenizer.json").is_file():
        return load_tokenizer(save_dir)
    return build_tokenizer(tokenizer_texts(cfg), save_dir)
