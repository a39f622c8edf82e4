"""Image–text conversations in LLaVA's JSON format, for the alignment stage (`svp align`).

The file is a list of ``{"id", "image", "conversations": [{"from": "human", "value":
"<image>\\n…"}, {"from": "gpt", "value": "…"}, …]}``, as LLaVA's `blip_laion_cc_sbu_558k.json`;
`image` is a path under the image folder. A conversation becomes one sequence::

    <s> <image> {human 1} {gpt 1} </s> {human 2} {gpt 2} </s> …

with the loss on the answers (and their `</s>`) only. The `<image>` slot holds the projector's
visual tokens, as in RIS training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from common.errors import DataError
from datamodules.ris import TextEncoding, pad_encodings, pad_id, resize_labels, world_of

IMAGE = "<image>"


def read_conversations(path: str | Path, limit: int | None = None) -> list[dict]:
    """The checked entries of a LLaVA conversation file (the first `limit` when given)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"align.data={str(path)!r} is not a file; point it at a LLaVA-format conversation "
            "JSON (SynthRef writes <data.root>/synthref/conversations.json with `svp synth`)"
        )
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not JSON ({e}); expected LLaVA's conversation list") from e
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path} holds no list of conversations; expected LLaVA's format")
    entries = entries[:limit] if limit is not None else entries
    for i, entry in enumerate(entries):
        _check_entry(entry, f"{path}, entry {i}")
    return entries


def _check_entry(entry: Any, where: str) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
        raise DataError(f"{where}: needs an 'image' file name (a text-only entry cannot align)")
    turns = entry.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2 or len(turns) % 2:
        raise DataError(f"{where}: 'conversations' must be human/gpt pairs")
    for k, turn in enumerate(turns):
        role = "human" if k % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != role:
            raise DataError(f"{where}: turn {k} must come from {role!r}")
        if not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: turn {k} has no text 'value'")
    images = sum(t["value"].count(IMAGE) for t in turns)
    if images != 1 or IMAGE not in turns[0]["value"]:
        raise DataError(f"{where}: the first human turn, and no other, must hold one {IMAGE}")


class ConversationEncoder:
    """A conversation's turns → ids and answer-only labels (see the module docstring)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, turns: list[dict]) -> TextEncoding:
        tok = self.tokenizer
        ids = [tok.bos_token_id] if tok.bos_token_id is not None else []
        labels = [-100] * len(ids)
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        for k in range(0, len(turns), 2):
            question = " ".join(turns[k]["value"].replace(IMAGE, " ").split())
            question = f"{IMAGE} {question}" if k == 0 else question
            asked = self._ids(question if k == 0 else " " + question)
            answer = self._ids(" " + " ".join(turns[k + 1]["value"].split())) + eos
            ids += asked + answer
            labels += [-100] * len(asked) + answer
        return TextEncoding(ids, labels)


@dataclass
class ImageIndex:
    """Where a conversation file's images live and the id each gets: the data set's own image ids
    when every image is one of its images (the feature and superpixel caches are then shared with
    RIS training), else their order of first appearance in the file."""

    folder: Path
    ids: dict[str, int]
    shared: bool


def image_index(entries: list[dict], folder: Path, dataset_images: dict[str, int]) -> ImageIndex:
    names = list(dict.fromkeys(e["image"] for e in entries))
    if all(n in dataset_images for n in names):
        return ImageIndex(folder, {n: dataset_images[n] for n in names}, True)
    return ImageIndex(folder, {n: i + 1 for i, n in enumerate(names)}, False)


class ConversationDataset(Dataset):
    def __init__(self, entries: list[dict], index: ImageIndex, store=None, label_size: int = 64):
        self.entries, self.index, self.store, self.label_size = entries, index, store, label_size

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        entry = self.entries[i]
        path = self.index.folder / entry["image"]
        try:
            with Image.open(path) as im:
                image = np.array(im.convert("RGB"))
        except OSError as e:
            raise DataError(f"conversation {entry.get('id', i)}: cannot read {path} ({e})") from e
        image_id = self.index.ids[entry["image"]]
        item = {"image": image, "image_id": image_id, "turns": entry["conversations"]}
        if self.store is not None:
            item["superpixels"] = self.store.get(image_id)
            item["labels"] = resize_labels(item["superpixels"], self.label_size)
        return item


class ConversationCollate:
    def __init__(self, encoder: ConversationEncoder, pad_id: int) -> None:
        self.encode, self.pad_id = encoder, pad_id

    def __call__(self, items: list[dict]) -> dict[str, Any]:
        enc = [self.encode(it["turns"]) for it in items]
        batch: dict[str, Any] = {
            "images": [torch.from_numpy(np.ascontiguousarray(it["image"])) for it in items],
            "image_ids": torch.tensor([int(it["image_id"]) for it in items]),
            **pad_encodings(enc, self.pad_id),
        }
        if "labels" in items[0]:
            batch["labels"] = torch.from_numpy(np.stack([it["labels"] for it in items]))
            batch["superpixels"] = [torch.from_numpy(it["superpixels"]) for it in items]
        return batch


class ConversationDataModule(pl.LightningDataModule):
    """The conversation file, its last `align.val_conversations` entries held out for a text-loss
    check; superpixels from the RIS data set's caches when the projector reads them."""

    def __init__(self, cfg, tokenizer, entries: list[dict], index: ImageIndex, store=None):
        super().__init__()
        self.cfg, self.tokenizer, self.store = cfg, tokenizer, store
        held = min(int(cfg.align.val_conversations), len(entries) // 2)
        self.train_set = ConversationDataset(
            entries[: len(entries) - held], index, store, cfg.data.label_size
        )
        self.val_set = ConversationDataset(
            entries[len(entries) - held :], index, store, cfg.data.label_size
        )

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        world, rank = world_of(self)
        sampler = DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=self.cfg.seed
        )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.cfg.data.num_workers,
            collate_fn=ConversationCollate(
                ConversationEncoder(self.tokenizer), pad_id(self.tokenizer)
            ),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.cfg.align.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.cfg.data.eval_batch_size, shuffle=False)
