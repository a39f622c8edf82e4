"""`svp eval --table`: one checkpoint on every RefCOCO/+/g split present, as papers report it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from common.errors import DataError
from common.files import atomic_write, write_csv

# the splits the RIS literature reports, per data set and its split convention
REFER_SPLITS = (
    ("refcoco", "unc", ("val", "testA", "testB")),
    ("refcoco+", "unc", ("val", "testA", "testB")),
    ("refcocog", "umd", ("val", "test")),
)
COLUMNS = ("dataset", "split_by", "split", "ciou", "giou", "tokens_mean", "sentences")


def refer_table(cfg: DictConfig, ckpt: str | None = None) -> list[dict[str, Any]]:
    """Evaluate `ckpt` (default: the run's best, else last) on each data set of `REFER_SPLITS`
    found under `data.root`, every sentence of each split; write `refer-table.md` and `.csv`
    into the run folder and return the rows."""
    from datamodules.refer import ReferDataset, available_splits
    from lightning_modules.cli.inputs import run_dir_for
    from lightning_modules.cli.train import evaluate

    root = Path(cfg.data.root)
    rows: list[dict[str, Any]] = []
    for dataset, split_by, splits in REFER_SPLITS:
        if not (root / dataset / f"refs({split_by}).p").is_file():
            continue
        present = [s for s in splits if s in available_splits(root, dataset, split_by)]
        if not present:
            continue
        sub = copy.deepcopy(cfg)
        with open_dict(sub):
            sub.data.dataset, sub.data.split_by = dataset, split_by
            sub.data.eval_splits = present
            sub.data.limit_test_sentences = None
        metrics = evaluate(sub, ckpt, tag=f"{dataset}-{split_by}")
        for split in present:
            rows.append(
                {
                    "dataset": dataset,
                    "split_by": split_by,
                    "split": split,
                    "ciou": metrics[f"{split}_ciou"],
                    "giou": metrics[f"{split}_giou"],
                    "tokens_mean": metrics.get(f"{split}_tokens_mean", float("nan")),
                    "sentences": len(ReferDataset(root, dataset, split_by, split)),
                }
            )
    if not rows:
        wanted = ", ".join(f"{d}/refs({s}).p" for d, s, _ in REFER_SPLITS)
        raise DataError(
            f"no RefCOCO/+/g data set under data.root={root} (looked for {wanted}). Put them "
            "there in the REFER layout, or set data.root."
        )
    out = run_dir_for(cfg)
    atomic_write(out / "refer-table.md", format_table(rows))
    write_csv(out / "refer-table.csv", rows, COLUMNS)
    print(format_table(rows))
    print(f"written to {out / 'refer-table.md'} and {out / 'refer-table.csv'}")
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """One column per data set and split (RefCOCO val, testA, testB, RefCOCO+ ..., RefCOCOg val,
    test), one row each for cIoU, gIoU and visual tokens per image."""
    names = {"refcoco": "RefCOCO", "refcoco+": "RefCOCO+", "refcocog": "RefCOCOg"}
    head = [f"{names[r['dataset']]} {r['split']}" for r in rows]
    lines = ["| | " + " | ".join(head) + " |", "|---" * (len(rows) + 1) + "|"]
    for key, label, fmt in (
        ("ciou", "cIoU", "{:.2f}"),
        ("giou", "gIoU", "{:.2f}"),
        ("tokens_mean", "visual tokens / image", "{:.1f}"),
    ):
        scale = 100 if key != "tokens_mean" else 1
        cells = [fmt.format(scale * r[key]) for r in rows]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
