"""Write SynthRef to disk in the REFER layout, atomically and byte-for-byte reproducibly."""

from __future__ import annotations

import itertools
import json
import pickle
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from common.errors import ConfigError, DataError
from common.files import left_by_dead_process, process_tag
from datamodules.synthref.conversations import CONVERSATIONS_FILE, synthref_conversations
from datamodules.synthref.drawing import SHAPES, paint
from datamodules.synthref.grammar import expression_text
from datamodules.synthref.resolver import referring_expressions
from datamodules.synthref.scene import Scene, sample_scene

DATASET = "synthref"
SPLIT_BY = "unc"
SYNTHREF_SPLITS = ("train", "val", "testA", "testB")
OBJECT_COUNTS = {"train": (1, 12), "val": (1, 12), "testA": (1, 4), "testB": (7, 12)}
SENTENCE_COUNT_PROBS = (0.25, 0.35, 0.4)  # 1, 2 or 3 sentences per ref
PICKLE_PROTOCOL = 4
FORMAT_VERSION = 1


@dataclass
class SynthConfig:
    """How much SynthRef to generate, where, and from which seed."""

    root: str = field(default="data", metadata={"help": "data root of the REFER layout"})
    train_images: int = field(default=600, metadata={"help": "images in the train split"})
    val_images: int = field(default=120, metadata={"help": "images in the val split"})
    testA_images: int = field(default=80, metadata={"help": "images in testA (1-4 objects)"})
    testB_images: int = field(default=80, metadata={"help": "images in testB (7-12 objects)"})
    image_size: int = field(default=128, metadata={"help": "side of the square images in pixels"})
    seed: int = field(default=0, metadata={"help": "same seed, same bytes"})

    def split_images(self) -> dict[str, int]:
        return {split: getattr(self, f"{split}_images") for split in SYNTHREF_SPLITS}


def _check(cfg: SynthConfig) -> None:
    for split, count in cfg.split_images().items():
        if count < 0:
            raise ConfigError(f"synth.{split}_images must be >= 0, got {count}")
    if sum(cfg.split_images().values()) == 0:
        raise ConfigError("synth.*_images are all 0; ask for at least one image")
    if not 64 <= cfg.image_size <= 1024:
        raise ConfigError(f"synth.image_size must be in 64..1024, got {cfg.image_size}")
    if cfg.seed < 0:
        raise ConfigError(f"synth.seed must be >= 0, got {cfg.seed}")


def synthref_paths(root: str | Path) -> dict[str, Path]:
    """Where REFER readers look: the annotation folder, its two files and the image folder."""
    root = Path(root)
    return {
        "annotations": root / DATASET,
        "refs": root / DATASET / f"refs({SPLIT_BY}).p",
        "instances": root / DATASET / "instances.json",
        "images": root / "images" / DATASET,
    }


def synthref_exists(root: str | Path) -> bool:
    """True when a complete SynthRef (both annotation files and the image folder) is under root."""
    paths = synthref_paths(root)
    return paths["refs"].is_file() and paths["instances"].is_file() and paths["images"].is_dir()


def synthref_mismatch(cfg: SynthConfig, root_keys: str = "data.root / synth.root") -> str | None:
    """None when the SynthRef under `cfg.root` was generated with `cfg`'s seed, image size and
    split sizes; otherwise a message that names what differs and how to regenerate (or which
    config keys, `root_keys`, point elsewhere)."""
    paths = synthref_paths(cfg.root)
    try:
        info = json.loads(paths["instances"].read_text(encoding="utf-8")).get("info", {})
    except (OSError, ValueError) as err:
        return f"cannot read {paths['instances']} ({err})"
    wanted = {"seed": cfg.seed, "image_size": cfg.image_size, **cfg.split_images()}
    found = {
        "seed": info.get("seed"),
        "image_size": info.get("image_size"),
        **info.get("images", {}),
    }
    differ = [f"{k} {found.get(k)} (config: {v})" for k, v in wanted.items() if found.get(k) != v]
    if not differ:
        return None
    flags = " ".join(
        f"--{k.replace('_', '-')}{'' if k in ('seed', 'image_size') else '-images'} {v}"
        for k, v in wanted.items()
    )
    return (
        f"SynthRef under {paths['annotations']} was generated with other settings: "
        f"{', '.join(differ)}. Regenerate it with `svp synth --root {cfg.root} --overwrite {flags}`"
        " (caches keyed on the old images are then recomputed), or set "
        f"{root_keys} to another folder."
    )


def ensure_synthref(
    cfg: SynthConfig, root_keys: str = "data.root / synth.root", progress: bool = True
) -> bool:
    """Generate SynthRef under `cfg.root` when it is missing (True); keep an existing one made
    with `cfg`'s settings (False); a DataError naming what differs (`synthref_mismatch`) if not."""
    if not synthref_exists(cfg.root):
        generate_synthref(cfg, progress=progress)
        return True
    problem = synthref_mismatch(cfg, root_keys)
    if problem:
        raise DataError(problem)
    return False


def mask_polygons(mask: np.ndarray) -> list[list[float]]:
    """`mask` as COCO polygons that pycocotools rasterises back to exactly its pixels: disjoint
    rectangles on pixel edges, one per run of rows that share a span of pixels."""
    spans: dict[tuple[int, int], int] = {}  # open rectangles: (x0, x1) → first row
    rects = []
    for y in range(mask.shape[0] + 1):
        row = np.zeros(mask.shape[1] + 2, dtype=np.int8)
        if y < mask.shape[0]:
            row[1:-1] = mask[y]
        edges = np.flatnonzero(np.diff(row))
        here = set(zip(edges[::2].tolist(), edges[1::2].tolist()))
        for span in [s for s in spans if s not in here]:
            rects.append((*span, spans.pop(span), y))
        for span in here:
            spans.setdefault(span, y)
    return [
        [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)] for x0, x1, y0, y1 in sorted(rects)
    ]


def _segmentation(obj) -> list:
    """Polygons, as COCO and RefCOCO keep them for `iscrowd: 0`: an unoccluded object's outline;
    for an occluded one, what shows (`mask_polygons`, exact to the pixel)."""
    return [obj.polygon] if not obj.occluded else mask_polygons(obj.visible)


def _annotation(obj, ann_id: int, image_id: int) -> dict:
    e = obj.seen
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": SHAPES.index(obj.shape) + 1,
        "segmentation": _segmentation(obj),
        "area": obj.area,
        "bbox": [e.x0, e.y0, e.x1 - e.x0, e.y1 - e.y0],
        "iscrowd": 0,
        "attributes": obj.attributes,
    }


def _image(cfg: SynthConfig, split: str, index: int) -> tuple[Scene, np.ndarray, list]:
    """One scene, its pixels and [(object index, sentences)] for the objects that get refs."""
    rng = np.random.default_rng([cfg.seed, SYNTHREF_SPLITS.index(split), index])
    low, high = OBJECT_COUNTS[split]
    scene = sample_scene(rng, int(rng.integers(low, high + 1)), cfg.image_size)
    layers = [(o.full, o.color, o.texture) for o in scene.objects]
    pixels = paint(layers, rng, scene.height, scene.width)
    count = len(scene.objects)
    chosen = rng.choice(count, size=max(1, round(count * rng.uniform(0.5, 1.0))), replace=False)
    counts = {int(t): int(rng.choice(3, p=SENTENCE_COUNT_PROBS)) + 1 for t in sorted(chosen)}
    exprs = referring_expressions(scene, counts, rng)
    refs = [(t, [expression_text(e) for e in found]) for t, found in exprs.items() if found]
    return scene, pixels, refs


def _ref(ref_id: int, ann: dict, split: str, sent_ids: list[int], texts: list[str], file_name):
    return {
        "ref_id": ref_id,
        "ann_id": ann["id"],
        "image_id": ann["image_id"],
        "category_id": ann["category_id"],
        "split": split,
        "sentences": [
            {"sent_id": s, "sent": t, "raw": t, "tokens": t.split()}
            for s, t in zip(sent_ids, texts)
        ],
        "sent_ids": sent_ids,
        "file_name": file_name,
    }


def _write(cfg: SynthConfig, out: Path, progress: bool) -> None:
    paths = synthref_paths(out)
    paths["annotations"].mkdir(parents=True)
    paths["images"].mkdir(parents=True)
    images, annotations, refs = [], [], []
    ann_ids, ref_ids, sent_ids = itertools.count(1), itertools.count(1), itertools.count(1)
    total = sum(cfg.split_images().values())
    with tqdm(total=total, desc="SynthRef", unit="img", disable=not progress) as bar:
        for split, count in cfg.split_images().items():
            for index in range(count):
                scene, pixels, image_refs = _image(cfg, split, index)
                image_id = len(images) + 1
                file_name = f"{DATASET}_{image_id:06d}.png"
                path = paths["images"] / file_name
                Image.fromarray(pixels).save(path, format="PNG", compress_level=1)
                h, w = scene.height, scene.width
                images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
                anns = [_annotation(obj, next(ann_ids), image_id) for obj in scene.objects]
                annotations += anns
                for target, texts in image_refs:
                    ids = [next(sent_ids) for _ in texts]
                    refs.append(_ref(next(ref_ids), anns[target], split, ids, texts, file_name))
                bar.update()
    instances = {
        "info": {
            "description": "SynthRef: synthetic referring expressions over shape scenes",
            "version": FORMAT_VERSION,
            "seed": cfg.seed,
            "image_size": cfg.image_size,
            "images": cfg.split_images(),
        },
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES, 1)
        ],
    }
    text = json.dumps(instances, sort_keys=True, separators=(",", ":"))
    paths["instances"].write_text(text, encoding="utf-8")
    paths["refs"].write_bytes(pickle.dumps(refs, protocol=PICKLE_PROTOCOL))
    # image–text conversations about the train images, for the alignment stage (`svp align`)
    conversations = synthref_conversations(images, annotations, refs)
    text = json.dumps(conversations, separators=(",", ":"))
    (paths["annotations"] / CONVERSATIONS_FILE).write_text(text, encoding="utf-8")


def _remove_stale_staging(root: Path) -> None:
    """Remove the staging folders that runs on this machine left when they were killed (their
    process is gone); those of running processes and of other machines stay."""
    for folder in root.glob(f".{DATASET}.*"):
        if left_by_dead_process(folder.name):
            shutil.rmtree(folder, ignore_errors=True)


def generate_synthref(cfg: SynthConfig, progress: bool = True, overwrite: bool = False) -> Path:
    """Generate SynthRef under `cfg.root`; returns the annotation folder `<root>/synthref`.

    Everything is written to a hidden sibling folder first and moved into place at the end, so an
    interrupted run never leaves a partial data set behind.
    """
    _check(cfg)
    root = Path(cfg.root)
    final = synthref_paths(root)
    if synthref_exists(root) and not overwrite:
        raise DataError(
            f"SynthRef already exists under {final['annotations']}; pass --overwrite to replace it"
        )
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(root)
    # `.synthref.<host>-<pid>-…`: whose staging folder it is, in its name from the start
    tmp = Path(tempfile.mkdtemp(prefix=f".{DATASET}.{process_tag()}-", dir=root))
    try:
        _write(cfg, tmp, progress)
        staged = synthref_paths(tmp)
        # Annotations go last: without them a leftover image folder does not count as a data set.
        for key in ("annotations", "images"):
            if final[key].exists():
                shutil.rmtree(final[key])
        final["images"].parent.mkdir(parents=True, exist_ok=True)
        staged["images"].rename(final["images"])
        staged["annotations"].rename(final["annotations"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final["annotations"]
