"""SynthRef's image–text conversations in LLaVA's JSON format, for the alignment stage.

Per training image, single-turn conversations (as LLaVA's stage-1 captions: each one sees the
image afresh, so no answer can be read off an earlier one):

* a description: every object, top to bottom, with its attributes and place;
* per referring sentence of the image's train refs, where the object is (a place phrase and its
  centre on a 10×10 grid) and what it is (its attributes).

Only the train split's images and sentences are used; evaluation images never appear.
"""

from __future__ import annotations

import json
from pathlib import Path

from datamodules.synthref.grammar import SIZE_WORDS

CONVERSATIONS_FILE = "conversations.json"
GRID = 10  # the answer's centre coordinates: tenths of the image side, 0..9


def place_phrase(x: float, y: float) -> str:
    """Where a point (x, y in [0, 1] of the image) lies on a 3×3 grid: "at the top left",
    "on the right", "in the center", ..."""
    col = ("left", None, "right")[min(int(x * 3), 2)]
    row = ("top", None, "bottom")[min(int(y * 3), 2)]
    if row and col:
        return f"at the {row} {col}"
    if row:
        return f"at the {row}"
    if col:
        return f"on the {col}"
    return "in the center"


def grid_point(x: float, y: float) -> str:
    """The point's cell on a GRID×GRID grid, as text: "( 3 , 7 )"."""
    cell = [min(int(v * GRID), GRID - 1) for v in (x, y)]
    return f"( {cell[0]} , {cell[1]} )"


def object_phrase(attributes: dict) -> str:
    """ "a large striped red star" (a plain texture is not named)."""
    texture = attributes["texture"]
    words = [SIZE_WORDS[attributes["size"]], *([texture] if texture != "plain" else [])]
    return " ".join(["a", *words, attributes["color"], attributes["shape"]])


def _centre(ann: dict, width: int, height: int) -> tuple[float, float]:
    x, y, w, h = ann["bbox"]
    return (x + w / 2) / width, (y + h / 2) / height


def _turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]


def synthref_conversations(
    images: list[dict], annotations: list[dict], refs: list[dict], split: str = "train"
) -> list[dict]:
    """LLaVA-format conversations (`id`, `image` file name, `conversations`) about the images of
    `split`'s refs, from SynthRef's `instances.json` images and annotations and its refs."""
    by_id = {im["id"]: im for im in images}
    anns = {a["id"]: a for a in annotations}
    objects: dict[int, list[dict]] = {}
    for a in annotations:
        objects.setdefault(a["image_id"], []).append(a)
    split_refs = sorted((r for r in refs if r["split"] == split), key=lambda r: r["ref_id"])
    out: list[dict] = []
    for image_id in sorted({r["image_id"] for r in split_refs}):
        im = by_id[image_id]
        w, h = im["width"], im["height"]
        placed = sorted(objects[image_id], key=lambda a: (_centre(a, w, h)[::-1], a["id"]))
        parts = [
            f"{object_phrase(a['attributes'])} {place_phrase(*_centre(a, w, h))}" for a in placed
        ]
        count = "one shape" if len(parts) == 1 else f"{len(parts)} shapes"
        caption = f"{count} : {' , '.join(parts)} ."
        out.append(
            {
                "id": f"{image_id}-caption",
                "image": im["file_name"],
                "conversations": _turns("describe the image .", caption),
            }
        )
        for ref in (r for r in split_refs if r["image_id"] == image_id):
            ann = anns[ref["ann_id"]]
            x, y = _centre(ann, w, h)
            for s in ref["sentences"]:
                sent = s["sent"]
                out.append(
                    {
                        "id": f"{image_id}-{s['sent_id']}-where",
                        "image": im["file_name"],
                        "conversations": _turns(
                            f"where is {sent} ?", f"{place_phrase(x, y)} , {grid_point(x, y)} ."
                        ),
                    }
                )
                out.append(
                    {
                        "id": f"{image_id}-{s['sent_id']}-what",
                        "image": im["file_name"],
                        "conversations": _turns(
                            f"what is {sent} ?", f"{object_phrase(ann['attributes'])} ."
                        ),
                    }
                )
    return out


def write_synthref_conversations(annotation_dir: str | Path) -> Path:
    """Write `conversations.json` beside a SynthRef's `instances.json` and refs (atomically);
    returns its path."""
    import pickle

    from common.files import write_json

    folder = Path(annotation_dir)
    instances = json.loads((folder / "instances.json").read_text(encoding="utf-8"))
    refs = pickle.loads((folder / "refs(unc).p").read_bytes())
    conversations = synthref_conversations(instances["images"], instances["annotations"], refs)
    path = folder / CONVERSATIONS_FILE
    write_json(path, conversations)
    return path
