"""What SynthRef objects look like: shapes as polygons, colours, sizes, textures, and painting.

Every shape is a polygon rasterised by pycocotools, so the pixels painted for an object are exactly
the mask that pycocotools decodes from its annotation.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross")
COLORS = {
    "red": (215, 45, 45),
    "orange": (245, 140, 30),
    "yellow": (235, 215, 50),
    "green": (50, 165, 70),
    "cyan": (45, 195, 205),
    "blue": (45, 85, 215),
    "purple": (140, 70, 195),
    "pink": (240, 130, 195),
}
# Texture ink: a darker or lighter shade chosen so a textured object's mean colour stays nearest
# to its own colour among COLORS.
PATTERN_COLORS = {
    "red": (150, 25, 25),
    "orange": (195, 100, 10),
    "yellow": (250, 240, 140),
    "green": (30, 110, 45),
    "cyan": (130, 225, 230),
    "blue": (30, 55, 145),
    "purple": (95, 45, 135),
    "pink": (250, 180, 220),
}
SIZES = ("small", "medium", "large")
TEXTURES = ("plain", "striped", "checkered", "dotted")
# Half-extent of a shape as a fraction of the image side; steps of ~1.5x so sizes are easy to tell.
SIZE_RADII = {"small": 0.06, "medium": 0.095, "large": 0.14}
CIRCLE_VERTICES = 48


def _regular(count: int, radius: float, phase: float) -> list[tuple[float, float]]:
    return [
        (
            radius * math.cos(phase + 2 * math.pi * k / count),
            radius * math.sin(phase + 2 * math.pi * k / count),
        )
        for k in range(count)
    ]


def _star() -> list[tuple[float, float]]:
    outer, inner = _regular(5, 1.12, -math.pi / 2), _regular(5, 0.46, -math.pi / 2 + math.pi / 5)
    return [p for pair in zip(outer, inner) for p in pair]


def _cross(arm: float = 0.34, reach: float = 0.95) -> list[tuple[float, float]]:
    a, r = arm, reach
    return [
        (-a, -r),
        (a, -r),
        (a, -a),
        (r, -a),
        (r, a),
        (a, a),
        (a, r),
        (-a, r),
        (-a, a),
        (-r, a),
        (-r, -a),
        (-a, -a),
    ]


def _centred(points: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Shift an outline so its bounding box is centred on the origin."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    dx, dy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    return tuple((x - dx, y - dy) for x, y in points)


UNIT_OUTLINES = {
    "circle": _centred(_regular(CIRCLE_VERTICES, 1.0, 0.0)),
    "square": _centred([(-0.88, -0.88), (0.88, -0.88), (0.88, 0.88), (-0.88, 0.88)]),
    "triangle": _centred(_regular(3, 1.15, -math.pi / 2)),
    "star": _centred(_star()),
    "hexagon": _centred(_regular(6, 1.0, -math.pi / 2)),
    "diamond": _centred([(0.0, -1.1), (0.85, 0.0), (0.0, 1.1), (-0.85, 0.0)]),
    "cross": _centred(_cross()),
}
UNIT_EXTENT = max(max(abs(v) for p in pts for v in p) for pts in UNIT_OUTLINES.values())


def shape_radius(size: str, image_size: int) -> float:
    """Pixel radius of an object of `size` in an image of side `image_size`."""
    return SIZE_RADII[size] * image_size


def shape_polygon(shape: str, cx: float, cy: float, radius: float) -> list[float]:
    """COCO polygon [x0, y0, x1, y1, ...] of `shape`, rounded to 0.01 px so JSON is stable."""
    return [
        round(c + radius * v, 2) for x, y in UNIT_OUTLINES[shape] for c, v in ((cx, x), (cy, y))
    ]


def rasterize_polygon(polygon: list[float], height: int, width: int) -> np.ndarray:
    """Boolean H×W mask of a polygon, exactly as pycocotools decodes it."""
    rle = mask_utils.frPyObjects([polygon], height, width)[0]
    return mask_utils.decode(rle).astype(bool)


def texture_unit(image_size: int) -> int:
    """Stripe width / checker cell in pixels."""
    return max(2, round(image_size / 42))


def pattern_mask(
    texture: str, origin: tuple[int, int], shape: tuple[int, int], unit: int, orientation: int
) -> np.ndarray | None:
    """Where a texture's ink goes (H×W bool), anchored at the object's top-left corner."""
    if texture == "plain":
        return None
    v, u = np.mgrid[0 : shape[0], 0 : shape[1]]
    u, v = u - origin[0], v - origin[1]
    if texture == "striped":
        t = (u, v, u + v)[orientation % 3]
        return (t // unit) % 2 == 1
    if texture == "checkered":
        return ((u // unit) + (v // unit)) % 2 == 1
    du = (u % (2 * unit)) - (unit - 0.5)
    dv = (v % (2 * unit)) - (unit - 0.5)
    return du**2 + dv**2 <= (0.7 * unit) ** 2


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A grey, gently shaded and blotchy canvas: never one of the saturated object colours."""
    base = rng.uniform(95, 165) + rng.uniform(-6, 6, size=3)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    angle = rng.uniform(0, 2 * math.pi)
    gradient = (math.cos(angle) * xx + math.sin(angle) * yy - 0.5) * rng.uniform(-24, 24)
    coarse = rng.normal(0, 1, size=(6, 6)).astype(np.float32)
    blotches = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))
    return base + (gradient + 6 * blotches)[..., None]


def paint(
    layers: list[tuple[np.ndarray, str, str]], rng: np.random.Generator, height: int, width: int
) -> np.ndarray:
    """Paint (full mask, colour, texture) layers bottom to top on a background; H×W×3 uint8."""
    image = _background(rng, height, width)
    unit = texture_unit(max(height, width))
    for full, color, texture in layers:
        image[full] = COLORS[color]
        ys, xs = np.nonzero(full)
        ink = pattern_mask(
            texture, (int(xs.min()), int(ys.min())), full.shape, unit, int(rng.integers(3))
        )
        if ink is not None:
            image[full & ink] = PATTERN_COLORS[color]
    image += rng.normal(0, 3, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
