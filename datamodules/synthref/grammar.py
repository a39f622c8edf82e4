"""The SynthRef expression grammar: structured expressions, their text, parsing and vocabulary.

    expression := "the" NP [position | relation NP]
                | "the" superlative NP
                | "the" ordinal NP "from the" direction
    NP         := [size] [texture] [colour] (shape | "shape")

A size word needs a shape noun: sizes are only compared between shapes of the same kind.
"""

from __future__ import annotations

from dataclasses import dataclass

from datamodules.synthref.drawing import COLORS, SHAPES, TEXTURES

DIRECTIONS = ("left", "right", "top", "bottom")
RELATIONS = ("above", "below", "left", "right")
ANY_SHAPE = "shape"
SIZE_WORDS = {"small": "small", "medium": "medium-sized", "large": "large"}
ORDINAL_WORDS = {2: "second", 3: "third"}
SUPERLATIVE_WORDS = {"left": "leftmost", "right": "rightmost", "top": "highest", "bottom": "lowest"}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
RELATION_PHRASES = {
    "above": ("above",),
    "below": ("below", "under"),
    "left": ("to the left of",),
    "right": ("to the right of",),
}


@dataclass(frozen=True)
class Description:
    """A noun phrase: the attributes it names (None = not mentioned)."""

    shape: str | None = None
    color: str | None = None
    size: str | None = None
    texture: str | None = None

    def matches(self, obj) -> bool:
        return (
            (self.shape is None or self.shape == obj.shape)
            and (self.color is None or self.color == obj.color)
            and (self.size is None or self.size == obj.size)
            and (self.texture is None or self.texture == obj.texture)
        )

    def words(self) -> list[str]:
        out = [SIZE_WORDS[self.size]] if self.size else []
        out += [w for w in (self.texture, self.color) if w]
        return [*out, self.shape or ANY_SHAPE]


@dataclass(frozen=True)
class Position:
    """The extreme one towards `direction`; form 0 "the star on the left", 1 "the leftmost star"."""

    direction: str
    form: int = 0


@dataclass(frozen=True)
class Ordinal:
    """The `rank`-th one counted from `direction` ("the second star from the left")."""

    rank: int
    direction: str


@dataclass(frozen=True)
class Relation:
    """Lies `relation` of the object `anchor` names; `form` picks a synonym ("below" / "under")."""

    relation: str
    anchor: Description
    form: int = 0


@dataclass(frozen=True)
class Expression:
    head: Description
    locator: Position | Ordinal | Relation | None = None


def expression_text(expr: Expression) -> str:
    """The sentence for a structured expression (lower case, space separated)."""
    noun = " ".join(expr.head.words())
    loc = expr.locator
    if loc is None:
        return f"the {noun}"
    if isinstance(loc, Position):
        if loc.form == 1:
            return f"the {SUPERLATIVE_WORDS[loc.direction]} {noun}"
        return f"the {noun} {POSITION_PHRASES[loc.direction]}"
    if isinstance(loc, Ordinal):
        return f"the {ORDINAL_WORDS[loc.rank]} {noun} from the {loc.direction}"
    phrase = RELATION_PHRASES[loc.relation][loc.form]
    return f"the {noun} {phrase} the {' '.join(loc.anchor.words())}"


def _invert(table: dict) -> dict:
    return {v: k for k, v in table.items()}


def _parse_description(tokens: list[str], i: int, text: str) -> tuple[Description, int]:
    values: dict[str, str] = {}
    for name, table in (
        ("size", _invert(SIZE_WORDS)),
        ("texture", {t: t for t in TEXTURES}),
        ("color", {c: c for c in COLORS}),
    ):
        if i < len(tokens) and tokens[i] in table:
            values[name] = table[tokens[i]]
            i += 1
    if i >= len(tokens) or tokens[i] not in (*SHAPES, ANY_SHAPE):
        raise ValueError(f"not a SynthRef expression (expected a shape noun): {text!r}")
    if tokens[i] != ANY_SHAPE:
        values["shape"] = tokens[i]
    return Description(**values), i + 1


def parse_expression(text: str) -> Expression:
    """Inverse of `expression_text`; raises ValueError for sentences outside the grammar."""
    tokens = text.split()
    if len(tokens) < 2 or tokens[0] != "the":
        raise ValueError(f"not a SynthRef expression (must start with 'the'): {text!r}")
    ordinal = _invert(ORDINAL_WORDS).get(tokens[1])
    superlative = _invert(SUPERLATIVE_WORDS).get(tokens[1])
    head, i = _parse_description(tokens, 1 if ordinal is None and superlative is None else 2, text)
    rest = " ".join(tokens[i:])
    if ordinal is not None:
        for direction in DIRECTIONS:
            if rest == f"from the {direction}":
                return Expression(head, Ordinal(ordinal, direction))
    elif superlative is not None:
        if not rest:
            return Expression(head, Position(superlative, form=1))
    elif not rest:
        return Expression(head)
    else:
        for direction, phrase in POSITION_PHRASES.items():
            if rest == phrase:
                return Expression(head, Position(direction))
        for relation, phrases in RELATION_PHRASES.items():
            for form, phrase in enumerate(phrases):
                if rest.startswith(phrase + " the "):
                    words = rest[len(phrase) :].split()
                    anchor, j = _parse_description(words, 1, text)
                    if j == len(words):
                        return Expression(head, Relation(relation, anchor, form))
    raise ValueError(f"not a SynthRef expression: {text!r}")


EXPRESSION_KINDS = ("attribute", "position", "superlative", "ordinal", "relation")


def expression_kind(text: str) -> str:
    """Which of `EXPRESSION_KINDS` a SynthRef sentence is; "other" outside the grammar."""
    try:
        loc = parse_expression(text).locator
    except ValueError:
        return "other"
    if loc is None:
        return "attribute"
    if isinstance(loc, Position):
        return "superlative" if loc.form == 1 else "position"
    return "ordinal" if isinstance(loc, Ordinal) else "relation"


def synthref_vocabulary() -> list[str]:
    """Every word the grammar can emit, sorted."""
    phrases = [
        "the from",
        *SIZE_WORDS.values(),
        *TEXTURES,
        *COLORS,
        *SHAPES,
        ANY_SHAPE,
        *DIRECTIONS,
        *ORDINAL_WORDS.values(),
        *SUPERLATIVE_WORDS.values(),
        *POSITION_PHRASES.values(),
        *(p for group in RELATION_PHRASES.values() for p in group),
    ]
    return sorted({w for phrase in phrases for w in phrase.split()})
