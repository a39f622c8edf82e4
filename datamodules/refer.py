"""RefCOCO-family reader for the REFER layout used by LISA: every referring sentence is one sample.

Layout: `<root>/<dataset>/refs(<split_by>).p` (pickled list of refs), `<root>/<dataset>/
instances.json` (COCO images and annotations) and the images under `image_dir(root, dataset)`.
The refs pickle and `instances.json` are parsed once per process and file version, and shared by
every split.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from common.errors import DataError
from common.files import file_key

DATASETS: dict[str, tuple[str, ...]] = {
    "refcoco": ("unc", "google"),
    "refcoco+": ("unc",),
    "refcocog": ("umd", "google"),
    "synthref": ("unc",),
}
SPLIT_ORDER = ("train", "val", "test", "testA", "testB")
REF_KEYS = ("ref_id", "ann_id", "image_id", "category_id", "split", "sentences")
SENTENCE_KEYS = ("sent_id", "sent")
IMAGE_KEYS = ("id", "file_name", "height", "width")
ANNOTATION_KEYS = ("id", "image_id", "segmentation")
STATS_COLUMNS = (
    ("images", "images", "{:d}"),
    ("refs", "refs", "{:d}"),
    ("sentences", "sentences", "{:d}"),
    ("objects_per_image", "objects/image", "{:.2f}"),
    ("mask_area_fraction", "mask area", "{:.3f}"),
)

PathLike = str | os.PathLike


def image_dir(root: PathLike, dataset: str) -> Path:
    """Folder of a dataset's images: SynthRef keeps its own, the COCO-based sets share train2014."""
    if dataset == "synthref":
        return Path(root) / "images" / "synthref"
    return Path(root) / "images" / "mscoco" / "images" / "train2014"


def available_splits(root: PathLike, dataset: str, split_by: str) -> tuple[str, ...]:
    """Splits present in `refs(<split_by>).p`, ordered train, val, test, testA, testB, others."""
    return _ordered_splits(_load_refs(_refs_file(root, dataset, split_by)))


def stats_table(
    root: PathLike, dataset: str, split_by: str, splits: Sequence[str] | None = None
) -> str:
    """A plain aligned text table of `ReferDataset.stats()`, one row per split."""
    if splits is None:
        splits = available_splits(root, dataset, split_by)
    header = ["split", *(label for _, label, _ in STATS_COLUMNS)]
    rows = [header]
    for split in splits:
        stats = ReferDataset(root, dataset, split_by, split).stats()
        rows.append([split, *(fmt.format(stats[key]) for key, _, fmt in STATS_COLUMNS)])
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if c == 0 else cell.rjust(w)
            for c, (cell, w) in enumerate(zip(row, widths))
        )
        for row in rows
    )


class ReferDataset:
    """One sample per referring sentence of a split, ordered by ref id, then sentence.

    Arguments:
      root: folder holding `<dataset>/` and `images/`.
      dataset: one of `DATASETS` (refcoco, refcoco+, refcocog, synthref).
      split_by: the split scheme, e.g. `unc`, `google`, `umd` (see `DATASETS`).
      split: e.g. train, val, test, testA, testB (see `available_splits`).
    """

    def __init__(self, root: PathLike, dataset: str, split_by: str, split: str) -> None:
        self.root, self.dataset, self.split_by, self.split = Path(root), dataset, split_by, split
        refs_file = _refs_file(root, dataset, split_by)
        all_refs = _load_refs(refs_file)
        self._instances = _load_instances(self.root / dataset / "instances.json")
        self._image_dir = image_dir(root, dataset)
        self.refs = tuple(
            sorted((r for r in all_refs if r["split"] == split), key=lambda r: r["ref_id"])
        )
        if not self.refs:
            raise DataError(
                f"{refs_file} has no split {split!r}. "
                f"Choose one of: {', '.join(_ordered_splits(all_refs))}."
            )
        for ref in self.refs:
            self._check_ref(ref, refs_file)
        self._samples = [
            (i, j) for i, ref in enumerate(self.refs) for j in range(len(ref["sentences"]))
        ]
        self._image_ids = tuple(sorted({r["image_id"] for r in self.refs}))

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ref_index, sent_index = self._samples[index]
        ref = self.refs[ref_index]
        sentence = ref["sentences"][sent_index]
        return {
            "image": self.load_image(ref["image_id"]),
            "mask": self.annotation_mask(ref["ann_id"]),
            "sentence": sentence["sent"],
            "image_id": ref["image_id"],
            "ref_id": ref["ref_id"],
            "ann_id": ref["ann_id"],
            "sent_id": sentence["sent_id"],
            "category_id": ref["category_id"],
        }

    @property
    def image_ids(self) -> tuple[int, ...]:
        """Sorted unique image ids of the split."""
        return self._image_ids

    @property
    def images_dir(self) -> Path:
        """The folder of the data set's images (`image_dir`): RefCOCO/+/g share COCO's."""
        return self._image_dir

    def image_path(self, image_id: int) -> Path:
        return self._image_dir / self._image_info(image_id)["file_name"]

    def load_image(self, image_id: int) -> np.ndarray:
        """The image as H×W×3 uint8 RGB."""
        info, path = self._image_info(image_id), self.image_path(image_id)
        try:
            with Image.open(path) as image:
                array = np.array(image.convert("RGB"))
        except FileNotFoundError as err:
            raise DataError(
                f"image file {path} (image_id {image_id}) is missing. Put the {self.dataset} "
                f"images under {self._image_dir}."
            ) from err
        except OSError as err:
            raise DataError(
                f"image file {path} (image_id {image_id}) is unreadable ({err}). "
                "Re-download or regenerate it."
            ) from err
        expected = (info["height"], info["width"])
        if array.shape[:2] != expected:
            raise DataError(
                f"image file {path} is {array.shape[0]}×{array.shape[1]} (H×W) but "
                f"{self._instances.path} says {expected[0]}×{expected[1]}. "
                "The image and instances.json do not match; re-download or regenerate them."
            )
        return array

    def annotation_mask(self, ann_id: int) -> np.ndarray:
        """The annotation's mask as H×W uint8 {0, 1}."""
        return np.ascontiguousarray(mask_utils.decode(self._rle(ann_id)), dtype=np.uint8)

    def instance_ann_ids(self, image_id: int) -> list[int]:
        """Ids of every annotation of the image in instances.json, sorted."""
        self._image_info(image_id)
        return list(self._instances.by_image.get(image_id, ()))

    def instance_labels(self, image_id: int, key: str) -> list:
        """The `key` label of every annotation of the image, in `instance_ann_ids` order.

        `category` is the annotation's `category_id`; any other key is read from its
        `attributes` (SynthRef: shape, color, size, texture).
        """
        out = []
        for ann_id in self.instance_ann_ids(image_id):
            ann = self._instances.annotations[ann_id]
            if key == "category":
                value = ann.get("category_id")
            else:
                value = ann.get("attributes", {}).get(key)
            if value is None:
                where = "category_id" if key == "category" else f"attributes.{key}"
                raise DataError(
                    f"{self._instances.path}: annotation {ann_id} has no {where}; use only "
                    "label keys that every annotation has (`category` for COCO-style data)."
                )
            out.append(value)
        return out

    def instance_masks(self, image_id: int) -> np.ndarray:
        """N×H×W uint8 masks of every annotation of the image, in `instance_ann_ids` order."""
        info = self._image_info(image_id)
        ann_ids = self.instance_ann_ids(image_id)
        masks = np.zeros((len(ann_ids), info["height"], info["width"]), dtype=np.uint8)
        for k, ann_id in enumerate(ann_ids):
            masks[k] = self.annotation_mask(ann_id)
        return masks

    def stats(self) -> dict[str, float]:
        """Counts of the split, mean annotations per image and mean ref-mask area fraction."""
        objects = [len(self._instances.by_image.get(i, ())) for i in self._image_ids]
        areas = []
        for ref in self.refs:
            info = self._image_info(ref["image_id"])
            area = float(mask_utils.area(self._rle(ref["ann_id"])))
            areas.append(area / (info["height"] * info["width"]))
        return {
            "images": len(self._image_ids),
            "refs": len(self.refs),
            "sentences": len(self),
            "objects_per_image": float(np.mean(objects)),
            "mask_area_fraction": float(np.mean(areas)),
        }

    def _check_ref(self, ref: dict, refs_file: Path) -> None:
        instances, ref_id = self._instances, ref["ref_id"]
        fix = f"{refs_file} and {instances.path} do not match; re-download both for {self.dataset}."
        if ref["image_id"] not in instances.images:
            raise DataError(
                f"ref {ref_id} points to image_id {ref['image_id']}, absent from "
                f"{instances.path}: {fix}"
            )
        ann = instances.annotations.get(ref["ann_id"])
        if ann is None:
            raise DataError(
                f"ref {ref_id} points to ann_id {ref['ann_id']}, absent from "
                f"{instances.path}: {fix}"
            )
        if ann["image_id"] != ref["image_id"]:
            raise DataError(
                f"ref {ref_id}: ann_id {ref['ann_id']} belongs to image {ann['image_id']}, "
                f"not to the ref's image_id {ref['image_id']}: {fix}"
            )
        for sentence in ref["sentences"]:
            if not isinstance(sentence.get("sent"), str):
                raise DataError(
                    f"ref {ref_id}, sent_id {sentence.get('sent_id')}: the sentence is "
                    f"{sentence.get('sent')!r}, not text, in {refs_file}; fix or re-download it."
                )

    def _image_info(self, image_id: int) -> dict:
        info = self._instances.images.get(image_id)
        if info is None:
            raise DataError(f"image_id {image_id} is not in {self._instances.path}.")
        return info

    def _rle(self, ann_id: int) -> dict:
        ann = self._instances.annotations.get(ann_id)
        if ann is None:
            raise DataError(f"ann_id {ann_id} is not in {self._instances.path}.")
        info = self._image_info(ann["image_id"])
        height, width = info["height"], info["width"]
        segmentation = ann["segmentation"]
        where = f"{self._instances.path}: annotation {ann_id}"
        if isinstance(segmentation, list):
            if not all(isinstance(p, list | tuple) for p in segmentation):
                raise DataError(f"{where} has a polygon segmentation that is not a list of lists.")
            # pycocotools reads a 4-number polygon as a box; polygons under 3 points have no area.
            polygons = [p for p in segmentation if len(p) >= 6]
            if not polygons:
                return mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
            return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        if isinstance(segmentation, dict) and {"counts", "size"} <= segmentation.keys():
            if list(segmentation["size"]) != [height, width]:
                raise DataError(
                    f"{where} has an RLE of size {list(segmentation['size'])} on an image of "
                    f"size {[height, width]} (H, W). Fix or regenerate instances.json."
                )
            if isinstance(segmentation["counts"], list):
                return mask_utils.frPyObjects(segmentation, height, width)
            return segmentation
        raise DataError(
            f"{where} has a segmentation that is neither a polygon list nor an RLE dict with "
            "'counts' and 'size'. Fix or regenerate instances.json."
        )


@dataclass(frozen=True)
class _Instances:
    path: Path
    images: dict[int, dict]
    annotations: dict[int, dict]
    by_image: dict[int, tuple[int, ...]]


def _refs_file(root: PathLike, dataset: str, split_by: str) -> Path:
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}. Choose one of: {', '.join(DATASETS)}.")
    if split_by not in DATASETS[dataset]:
        raise DataError(
            f"dataset {dataset!r} has no split_by {split_by!r}. "
            f"Choose one of: {', '.join(DATASETS[dataset])}."
        )
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"data root {root} does not exist. Point it at the folder holding <dataset>/ and "
            "images/ (for SynthRef, write one with `svp synth`)."
        )
    folder = root / dataset
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("refs(*).p")))
        raise DataError(
            f"dataset folder {folder} does not exist; datasets under {root}: "
            f"{', '.join(found) or '(none)'}. Pick one of them or put {dataset}/ there."
        )
    path = folder / f"refs({split_by}).p"
    if not path.is_file():
        found = sorted(p.name for p in folder.glob("refs(*).p"))
        raise DataError(
            f"refs file {path} does not exist (found: {', '.join(found) or 'none'}). "
            f"Put the REFER annotations of {dataset} ({split_by}) there."
        )
    return path


def _ordered_splits(refs: Iterable[dict]) -> tuple[str, ...]:
    present = {r["split"] for r in refs}
    known = [s for s in SPLIT_ORDER if s in present]
    return (*known, *sorted(present - set(SPLIT_ORDER)))


def _load_refs(path: Path) -> tuple[dict, ...]:
    return _read_refs(path, file_key(path))


def _load_instances(path: Path) -> _Instances:
    if not path.is_file():
        raise DataError(
            f"{path} does not exist. Put the COCO instances file of {path.parent.name} there."
        )
    return _read_instances(path, file_key(path))


@functools.lru_cache(maxsize=8)
def _read_refs(path: Path, stamp: str) -> tuple[dict, ...]:
    """Parse and check a refs pickle; `stamp` (mtime, size) keys the cache so edits are re-read."""
    try:
        with path.open("rb") as f:
            refs = pickle.load(f)
    except Exception as err:  # unpickling a damaged or foreign file can raise almost anything
        raise DataError(
            f"{path} is not a readable pickle ({type(err).__name__}: {err}). Re-download it."
        ) from err
    if not isinstance(refs, list):
        raise DataError(
            f"{path} holds a {type(refs).__name__}, not a list of refs. Re-download it."
        )
    for index, ref in enumerate(refs):
        missing = [k for k in REF_KEYS if k not in ref] if isinstance(ref, dict) else REF_KEYS
        if missing:
            raise DataError(
                f"{path}: ref #{index} is not a dict with the keys {', '.join(REF_KEYS)} "
                f"(missing: {', '.join(missing)}). Re-download it."
            )
        sentences = ref["sentences"]
        if not isinstance(sentences, list) or not all(
            isinstance(s, dict) and all(k in s for k in SENTENCE_KEYS) for s in sentences
        ):
            raise DataError(
                f"{path}: ref {ref['ref_id']} has sentences that are not a list of dicts with "
                f"the keys {', '.join(SENTENCE_KEYS)}. Re-download it."
            )
    return tuple(refs)


@functools.lru_cache(maxsize=4)
def _read_instances(path: Path, stamp: str) -> _Instances:
    """Parse, check and index instances.json; `stamp` keys the cache as in `_read_refs`."""
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as err:
        raise DataError(f"{path} is not valid JSON ({err}). Re-download or regenerate it.") from err
    for key in ("images", "annotations"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DataError(
                f"{path} has no list {key!r}; a COCO instances file needs 'images' and "
                "'annotations'. Re-download or regenerate it."
            )
    images = {im["id"]: im for im in _checked(data["images"], IMAGE_KEYS, path, "images")}
    annotations = {
        a["id"]: a for a in _checked(data["annotations"], ANNOTATION_KEYS, path, "annotations")
    }
    by_image: dict[int, list[int]] = defaultdict(list)
    for ann in annotations.values():
        by_image[ann["image_id"]].append(ann["id"])
    return _Instances(
        path, images, annotations, {i: tuple(sorted(ids)) for i, ids in by_image.items()}
    )


def _checked(entries: list, keys: Sequence[str], path: Path, name: str) -> Iterable[dict]:
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or any(k not in entry for k in keys):
            raise DataError(
                f"{path}: {name}[{index}] is not a dict with the keys {', '.join(keys)}. "
                "Re-download or regenerate it."
            )
        yield entry
