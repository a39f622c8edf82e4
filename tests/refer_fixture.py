"""REFER-layout fixtures: a small hand-made one (5 images of 32×40, polygon and RLE masks, 7 refs
in 4 splits; masks are unions of axis-aligned rectangles, plus one striped mask, so their areas are
known by hand), and the tiny SynthRef copied as RefCOCO, RefCOCO+ and RefCOCOg over one images
folder.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

HEIGHT, WIDTH = 32, 40


def rect_mask(*boxes: tuple[int, int, int, int]) -> np.ndarray:
    """Union of boxes (x0, y0, x1, y1), covering pixels x0..x1-1, y0..y1-1."""
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = 1
    return mask


def rect_polygon(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    return [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: column-major run lengths, starting with a run of zeros."""
    flat = mask.flatten(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"size": [HEIGHT, WIDTH], "counts": [0, *counts] if flat[0] else counts}


STRIPES = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
STRIPES[10:20, (np.arange(WIDTH) % 4) < 2] = 1

# ann_id: (image_id, category_id, kind, drawn mask, segmentation as stored)
ANNOTATIONS = {
    10: (1, 1, "polygon", rect_mask((4, 6, 20, 18)), [rect_polygon(4, 6, 20, 18)]),
    11: (
        1,
        2,
        "multipolygon",
        rect_mask((22, 2, 30, 10), (26, 20, 38, 30)),
        [rect_polygon(22, 2, 30, 10), rect_polygon(26, 20, 38, 30)],
    ),
    12: (2, 1, "rle", rect_mask((18, 12, 22, 20), (10, 14, 30, 18)), None),
    13: (3, 3, "rle_uncompressed", rect_mask((30, 4, 34, 28), (14, 24, 34, 28)), None),
    14: (3, 1, "polygon", rect_mask((0, 0, 10, 8)), [rect_polygon(0, 0, 10, 8)]),
    15: (4, 2, "polygon", rect_mask((5, 5, 35, 27)), [rect_polygon(5, 5, 35, 27)]),
    16: (4, 2, "rle", STRIPES, None),
    17: (5, 3, "polygon", rect_mask((10, 10, 30, 20)), [rect_polygon(10, 10, 30, 20)]),
    18: (5, 1, "rle_uncompressed", rect_mask((0, 28, 40, 32)), None),
}

# ref_id: (ann_id, split, sentences); written out of ref_id order on purpose.
REFS = {
    101: (11, "train", ["two boxes on the right", "right pair"]),
    100: (10, "train", ["the left box", "box on the left", "big square"]),
    102: (12, "train", ["the plus sign", "cross in the middle"]),
    103: (13, "val", ["the l shape", "corner piece"]),
    105: (16, "testA", ["striped thing"]),
    104: (15, "testA", ["large rectangle", "the wide box"]),
    106: (17, "testB", ["middle bar", "the flat box", "horizontal block"]),
}

GRAY_IMAGE, JPEG_IMAGE = 4, 5


def image_folder(root: Path, dataset: str) -> Path:
    if dataset == "synthref":
        return root / "images" / "synthref"
    return root / "images" / "mscoco" / "images" / "train2014"


def _pixels(image_id: int) -> np.ndarray:
    rng = np.random.default_rng(image_id)
    if image_id == GRAY_IMAGE:
        return rng.integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)
    return rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


def _segmentation(kind: str, mask: np.ndarray, polygons: list | None):
    if kind == "rle":
        return compressed_rle(mask)
    if kind == "rle_uncompressed":
        return uncompressed_rle(mask)
    return polygons


def write_refer_fixture(root: Path, dataset: str = "refcoco", split_by: str = "unc") -> dict:
    """Write the fixture under `root` in the REFER layout; return the values tests expect.

    Returns a dict with `root`, `images_dir`, `pixels` {image_id: H×W×3 uint8, or None for the
    JPEG}, `image_paths`, `masks` {ann_id: drawn mask}, `kinds` {ann_id: polygon | multipolygon |
    rle | rle_uncompressed}, `ann_ids` {image_id: sorted ann ids}, `ref_ids`, `image_ids` and
    `samples` {split: [(ref_id, sent_id, sentence, ann_id, image_id, category_id), ...]}.
    """
    root = Path(root)
    folder = image_folder(root, dataset)
    folder.mkdir(parents=True, exist_ok=True)
    (root / dataset).mkdir(parents=True, exist_ok=True)

    images, pixels, image_paths = [], {}, {}
    for image_id in range(1, 6):
        suffix = "jpg" if image_id == JPEG_IMAGE else "png"
        file_name = f"COCO_train2014_{image_id:012d}.{suffix}"
        array = _pixels(image_id)
        Image.fromarray(array).save(folder / file_name)
        rgb = np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array
        pixels[image_id] = None if image_id == JPEG_IMAGE else rgb
        image_paths[image_id] = folder / file_name
        images.append({"id": image_id, "file_name": file_name, "height": HEIGHT, "width": WIDTH})

    annotations, ann_ids = [], {}
    for ann_id, (image_id, category_id, kind, mask, polygons) in ANNOTATIONS.items():
        ys, xs = np.nonzero(mask)
        annotations.append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": category_id,
                "segmentation": _segmentation(kind, mask, polygons),
                "area": float(mask.sum()),
                "bbox": [
                    float(xs.min()),
                    float(ys.min()),
                    float(np.ptp(xs) + 1),
                    float(np.ptp(ys) + 1),
                ],
                "iscrowd": int(ann_id == 18),
            }
        )
        ann_ids.setdefault(image_id, []).append(ann_id)
    categories = [{"id": i, "name": name} for i, name in enumerate(("box", "cross", "ell"), 1)]
    instances = {"images": images, "annotations": annotations, "categories": categories}
    (root / dataset / "instances.json").write_text(json.dumps(instances))

    refs, samples, ref_ids, image_ids = [], {}, {}, {}
    for ref_id, (ann_id, split, sentences) in REFS.items():
        image_id, category_id = ANNOTATIONS[ann_id][:2]
        sent_ids = [ref_id * 10 + k for k in range(len(sentences))]
        refs.append(
            {
                "ref_id": ref_id,
                "ann_id": ann_id,
                "image_id": image_id,
                "category_id": category_id,
                "split": split,
                "sentences": [
                    {"sent_id": s, "sent": text, "raw": text.capitalize(), "tokens": text.split()}
                    for s, text in zip(sent_ids, sentences)
                ],
                "sent_ids": sent_ids,
                "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
            }
        )
    for ref_id in sorted(REFS):
        ann_id, split, sentences = REFS[ref_id]
        image_id, category_id = ANNOTATIONS[ann_id][:2]
        ref_ids.setdefault(split, []).append(ref_id)
        image_ids.setdefault(split, set()).add(image_id)
        samples.setdefault(split, []).extend(
            (ref_id, ref_id * 10 + k, text, ann_id, image_id, category_id)
            for k, text in enumerate(sentences)
        )
    with (root / dataset / f"refs({split_by}).p").open("wb") as f:
        pickle.dump(refs, f)

    return {
        "root": root,
        "images_dir": folder,
        "pixels": pixels,
        "image_paths": image_paths,
        "masks": {ann_id: spec[3] for ann_id, spec in ANNOTATIONS.items()},
        "kinds": {ann_id: spec[2] for ann_id, spec in ANNOTATIONS.items()},
        "ann_ids": {i: sorted(ids) for i, ids in ann_ids.items()},
        "ref_ids": ref_ids,
        "image_ids": {split: sorted(ids) for split, ids in image_ids.items()},
        "samples": samples,
    }


def write_synthref_as_refcoco(synthref: Path, root: Path) -> Path:
    """RefCOCO, RefCOCO+ (unc: train, val, testA, testB) and RefCOCOg (umd: train, val, test) in
    the REFER layout, made of the tiny SynthRef's files under `root`: every data set its own copy
    of the refs and instances.json, the images once, where COCO's live (shared, as train2014)."""
    images = image_folder(root, "refcoco")
    images.parent.mkdir(parents=True)
    shutil.copytree(synthref / "images" / "synthref", images)
    refs = pickle.loads((synthref / "synthref" / "refs(unc).p").read_bytes())
    for dataset, split_by, rename in (
        ("refcoco", "unc", {}),
        ("refcoco+", "unc", {}),
        ("refcocog", "umd", {"testA": "test", "testB": None}),
    ):
        folder = root / dataset
        folder.mkdir()
        shutil.copy(synthref / "synthref" / "instances.json", folder / "instances.json")
        kept = []
        for ref in refs:
            split = rename.get(ref["split"], ref["split"])
            if split is not None:
                kept.append({**ref, "split": split})
        (folder / f"refs({split_by}).p").write_bytes(pickle.dumps(kept))
    return root
