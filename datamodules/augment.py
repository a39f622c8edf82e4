"""Flip augmentation for referring segmentation: the image, its masks and the sentence together.

A horizontal flip turns "the star on the left" into a picture where the same star is on the
right, so the sentence's left/right words are swapped with the pixels (the usual RefCOCO
practice); a vertical flip swaps the top/bottom words. Words are swapped one for one, so the
flipped sentence stays inside the vocabulary.

A flipped sample carries its *view* (`VIEW_HFLIP`, `VIEW_VFLIP`, or both bits), which the model
uses to key cached frozen features, so a flipped image gets its own features, not the mirror
image of the original's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datamodules.errors import ConfigError

VIEW_HFLIP, VIEW_VFLIP = 1, 2

HFLIP_WORDS = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}
VFLIP_WORDS = {
    "top": "bottom",
    "bottom": "top",
    "highest": "lowest",
    "lowest": "highest",
    "above": "below",
    "below": "above",
    "under": "above",
    "upper": "lower",
    "lower": "upper",
    "topmost": "bottommost",
    "bottommost": "topmost",
}


def flip_sentence(sentence: str, view: int) -> str:
    """The sentence for the image flipped as `view` says (word-for-word swaps)."""
    words = sentence.split(" ")
    for bit, table in ((VIEW_HFLIP, HFLIP_WORDS), (VIEW_VFLIP, VFLIP_WORDS)):
        if view & bit:
            words = [table.get(w, w) for w in words]
    return " ".join(words)


def flip_array(array: np.ndarray, view: int) -> np.ndarray:
    """Flips the first two axes (H, W) of an image, mask or label map as `view` says."""
    if view & VIEW_HFLIP:
        array = array[:, ::-1]
    if view & VIEW_VFLIP:
        array = array[::-1]
    return np.ascontiguousarray(array)


@dataclass
class FlipConfig:
    """Probabilities of a horizontal and of a vertical flip for each training sample."""

    hflip: float = 0.0
    vflip: float = 0.0

    def __post_init__(self) -> None:
        for name in ("hflip", "vflip"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"data.augment.{name} is a probability in [0, 1]; got {p!r}.")

    @property
    def active(self) -> bool:
        return self.hflip > 0 or self.vflip > 0

    def draw(self, rng) -> int:
        """A view drawn with `rng` (a `numpy.random.Generator` or anything with `.random()`)."""
        view = VIEW_HFLIP if rng.random() < self.hflip else 0
        return view | (VIEW_VFLIP if rng.random() < self.vflip else 0)


def flip_item(item: dict, view: int) -> dict:
    """A copy of a dataset item (image, mask, sentence, superpixels) seen through `view`."""
    if not view:
        return item
    out = dict(item)
    for key in ("image", "mask", "superpixels"):
        if key in out:
            out[key] = flip_array(out[key], view)
    out["sentence"] = flip_sentence(out["sentence"], view)
    out["view"] = view
    return out
