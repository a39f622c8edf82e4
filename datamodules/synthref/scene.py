"""SynthRef scenes: placed objects, their visible masks after occlusion, and random sampling."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils

from datamodules.errors import DataError
from datamodules.synthref.drawing import (
    COLORS,
    SHAPES,
    SIZES,
    TEXTURES,
    UNIT_EXTENT,
    rasterize_polygon,
    shape_polygon,
    shape_radius,
)

MIN_VISIBLE_FRACTION = 0.5
SAME_COLOR_GAP = 2
PLACEMENT_TRIES = 60
TEXTURE_WEIGHTS = (0.4, 0.2, 0.2, 0.2)
REUSE_PROBABILITY = 0.35


@dataclass(frozen=True)
class Placement:
    """One object to draw: its attributes and the centre of its bounding box in pixels."""

    shape: str
    color: str
    size: str
    texture: str
    cx: float
    cy: float


@dataclass
class SceneObject:
    """An object as seen: attributes, visible mask and the geometry the resolver reasons with."""

    shape: str
    color: str
    size: str
    texture: str
    visible: np.ndarray
    polygon: list[float] | None = None
    full: np.ndarray | None = None
    area: int = field(init=False)
    cx: float = field(init=False)
    cy: float = field(init=False)
    bbox: tuple[int, int, int, int] = field(init=False)

    def __post_init__(self) -> None:
        ys, xs = np.nonzero(self.visible)
        if xs.size == 0:
            raise DataError(f"a SynthRef {self.color} {self.shape} has an empty mask")
        self.area = int(xs.size)
        self.cx, self.cy = float(xs.mean()) + 0.5, float(ys.mean()) + 0.5
        self.bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)

    @property
    def occluded(self) -> bool:
        return self.full is not None and not np.array_equal(self.full, self.visible)

    @property
    def attributes(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in ("shape", "color", "size", "texture")}


@dataclass
class Scene:
    """Objects in drawing order (later ones occlude earlier ones)."""

    height: int
    width: int
    objects: list[SceneObject]


def compose_scene(placements: list[Placement], image_size: int) -> Scene:
    """Rasterise placements bottom to top; each object's visible mask is what nothing covers."""
    polygons = [
        shape_polygon(p.shape, p.cx, p.cy, shape_radius(p.size, image_size)) for p in placements
    ]
    fulls = [rasterize_polygon(poly, image_size, image_size) for poly in polygons]
    covered = np.zeros((image_size, image_size), dtype=bool)
    visibles = []
    for full in reversed(fulls):
        visibles.append(full & ~covered)
        covered |= full
    objects = [
        SceneObject(p.shape, p.color, p.size, p.texture, vis, poly, full)
        for p, poly, full, vis in zip(placements, polygons, fulls, reversed(visibles))
    ]
    return Scene(image_size, image_size, objects)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    padded = np.pad(mask, radius)
    out = np.zeros_like(mask)
    h, w = mask.shape
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def _random_placement(
    rng: np.random.Generator, image_size: int, placed: list[Placement]
) -> Placement:
    """Independent attributes, except that shapes and colours are often reused (distractors)."""
    shape = str(rng.choice(SHAPES))
    color = str(rng.choice(list(COLORS)))
    if placed and rng.random() < REUSE_PROBABILITY:
        shape = placed[int(rng.integers(len(placed)))].shape
    if placed and rng.random() < REUSE_PROBABILITY:
        color = placed[int(rng.integers(len(placed)))].color
    size = str(rng.choice(SIZES))
    texture = str(rng.choice(TEXTURES, p=TEXTURE_WEIGHTS))
    reach = shape_radius(size, image_size) * UNIT_EXTENT + 1
    cx, cy = rng.uniform(reach, image_size - reach, size=2)
    return Placement(shape, color, size, texture, float(cx), float(cy))


def _try_scene(rng: np.random.Generator, count: int, image_size: int) -> list[Placement] | None:
    min_pixels = (0.05 * image_size) ** 2
    placed: list[Placement] = []
    fulls: list[np.ndarray] = []
    visibles: list[np.ndarray] = []
    for _ in range(count):
        for _ in range(PLACEMENT_TRIES):
            p = _random_placement(rng, image_size, placed)
            polygon = shape_polygon(p.shape, p.cx, p.cy, shape_radius(p.size, image_size))
            full = rasterize_polygon(polygon, image_size, image_size)
            same = [i for i, q in enumerate(placed) if q.color == p.color]
            if same:
                halo = _dilate(full, SAME_COLOR_GAP)
                if any((halo & fulls[i]).any() for i in same):
                    continue
            remaining = [vis & ~full for vis in visibles]
            if all(
                r.sum() >= max(MIN_VISIBLE_FRACTION * f.sum(), min_pixels)
                for r, f in zip(remaining, fulls)
            ):
                placed.append(p)
                fulls.append(full)
                visibles = [*remaining, full]
                break
        else:
            return None
    return placed


def sample_scene(rng: np.random.Generator, count: int, image_size: int) -> Scene:
    """A random scene of `count` clearly visible objects (at least half of each object shows)."""
    for _ in range(100):
        placements = _try_scene(rng, count, image_size)
        if placements is not None:
            return compose_scene(placements, image_size)
    raise DataError(
        f"could not fit {count} objects into a {image_size}x{image_size} SynthRef image; "
        "use a larger image_size"
    )


def decode_segmentation(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """Boolean H×W mask of a COCO segmentation (polygons, uncompressed or compressed RLE)."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}
    return mask_utils.decode(rle).astype(bool)


def scene_from_annotations(annotations: list[dict], height: int, width: int) -> Scene:
    """Rebuild a scene from one image's SynthRef annotations (their `attributes` and masks)."""
    objects = []
    for ann in sorted(annotations, key=lambda a: a["id"]):
        if "attributes" not in ann:
            raise DataError(
                f"annotation {ann['id']} has no 'attributes'; only SynthRef annotations describe "
                "scenes (regenerate with `svp synth --overwrite`)"
            )
        seg = ann["segmentation"]
        polygon = seg[0] if isinstance(seg, list) else None
        objects.append(
            SceneObject(
                **ann["attributes"],
                visible=decode_segmentation(seg, height, width),
                polygon=polygon,
            )
        )
    return Scene(height, width, objects)
