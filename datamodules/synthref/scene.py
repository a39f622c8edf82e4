"""SynthRef scenes: placed objects, their visible masks after occlusion, and random sampling."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils

from common.errors import DataError
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

MIN_VISIBLE_FRACTION = 0.6
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

    def outline(self, image_size: int) -> list[float]:
        return shape_polygon(self.shape, self.cx, self.cy, shape_radius(self.size, image_size))


@dataclass(frozen=True)
class Extent:
    """Centroid and bounding box (x1, y1 exclusive) of a non-empty mask, in pixels."""

    cx: float
    cy: float
    x0: int
    y0: int
    x1: int
    y1: int

    @classmethod
    def of(cls, mask: np.ndarray) -> Extent:
        ys, xs = np.nonzero(mask)
        return cls(
            float(xs.mean()) + 0.5,
            float(ys.mean()) + 0.5,
            int(xs.min()),
            int(ys.min()),
            int(xs.max()) + 1,
            int(ys.max()) + 1,
        )


@dataclass
class SceneObject:
    """An object: attributes, whole outline, visible mask, and the extents of both.

    Spatial words are judged on the visible part (`seen`) and on the whole shape a person
    completes behind occluders (`whole`); an order is clear only when both agree.
    """

    placement: Placement
    polygon: list[float]
    full: np.ndarray
    visible: np.ndarray
    area: int = field(init=False)
    seen: Extent = field(init=False)
    whole: Extent = field(init=False)

    def __post_init__(self) -> None:
        self.area = int(self.visible.sum())
        if self.area == 0:
            raise DataError(f"a SynthRef {self.color} {self.shape} has an empty mask")
        self.seen, self.whole = Extent.of(self.visible), Extent.of(self.full)

    shape = property(lambda self: self.placement.shape)
    color = property(lambda self: self.placement.color)
    size = property(lambda self: self.placement.size)
    texture = property(lambda self: self.placement.texture)

    @property
    def occluded(self) -> bool:
        return not np.array_equal(self.full, self.visible)

    @property
    def attributes(self) -> dict:
        """What `instances.json` keeps per annotation to rebuild the object."""
        p = self.placement
        return {
            "shape": p.shape,
            "color": p.color,
            "size": p.size,
            "texture": p.texture,
            "center": [p.cx, p.cy],
        }


@dataclass
class Scene:
    """Objects in drawing order (later ones occlude earlier ones)."""

    height: int
    width: int
    objects: list[SceneObject]


def compose_scene(placements: list[Placement], image_size: int) -> Scene:
    """Rasterise placements bottom to top; each object's visible mask is what nothing covers."""
    polygons = [p.outline(image_size) for p in placements]
    fulls = [rasterize_polygon(poly, image_size, image_size) for poly in polygons]
    covered = np.zeros((image_size, image_size), dtype=bool)
    visibles = []
    for full in reversed(fulls):
        visibles.append(full & ~covered)
        covered |= full
    objects = [
        SceneObject(p, poly, full, vis)
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
    # Centres rounded to 0.01 px so the outline rebuilt from instances.json is the same polygon.
    cx, cy = np.round(rng.uniform(reach, image_size - reach, size=2), 2)
    return Placement(shape, color, size, texture, float(cx), float(cy))


def _try_scene(rng: np.random.Generator, count: int, image_size: int) -> list[Placement] | None:
    min_pixels = (0.05 * image_size) ** 2
    placed: list[Placement] = []
    fulls: list[np.ndarray] = []
    visibles: list[np.ndarray] = []
    for _ in range(count):
        for _ in range(PLACEMENT_TRIES):
            p = _random_placement(rng, image_size, placed)
            full = rasterize_polygon(p.outline(image_size), image_size, image_size)
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
    """A random scene of `count` clearly visible objects (at least 60% of each one shows)."""
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
    """Rebuild a scene from one image's SynthRef annotations (`attributes` and masks)."""
    if height != width:
        raise DataError(f"SynthRef images are square; got {height}x{width}")
    objects = []
    for ann in sorted(annotations, key=lambda a: a["id"]):
        if "attributes" not in ann:
            raise DataError(
                f"annotation {ann['id']} has no 'attributes'; only SynthRef annotations describe "
                "scenes (regenerate with `svp synth --overwrite`)"
            )
        attrs = ann["attributes"]
        placement = Placement(
            attrs["shape"], attrs["color"], attrs["size"], attrs["texture"], *attrs["center"]
        )
        polygon = placement.outline(width)
        full = rasterize_polygon(polygon, height, width)
        visible = decode_segmentation(ann["segmentation"], height, width)
        objects.append(SceneObject(placement, polygon, full, visible))
    return Scene(height, width, objects)
