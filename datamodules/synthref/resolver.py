"""Which objects an expression can refer to, and unambiguous expressions for a target.

Spatial words are judged with margins so that people would agree: each object is a clear match
(YES), clearly not a match (NO) or borderline (MAYBE). An expression is kept for a target only
when the target is a clear match and every other object is clearly not.
"""

from __future__ import annotations

import itertools

import numpy as np

from datamodules.synthref.grammar import (
    DIRECTIONS,
    ORDINAL_WORDS,
    RELATION_PHRASES,
    RELATIONS,
    Description,
    Expression,
    Ordinal,
    Position,
    Relation,
    parse_expression,
)
from datamodules.synthref.scene import Extent, Scene, SceneObject

NO, MAYBE, YES = 0, 1, 2
MARGIN = 0.08  # centroid gap, as a fraction of the image side, that makes an order clear
LONE_YES, LONE_NO = 0.4, 0.5  # a lone object is "on the left" if in the left 40%, not if past 50%
CONE_YES, CONE_NO = 0.7, 1.73  # |across| / along: within ~35 degrees clear, beyond 60 clearly not
ATTRIBUTES = ("size", "texture", "color", "shape")
TYPE_WEIGHTS = {"attribute": 1.0, "position": 1.0, "ordinal": 0.7, "relation": 1.2}


def _agree(values) -> int:
    """One verdict from several views: theirs if they agree, else borderline."""
    values = set(values)
    return values.pop() if len(values) == 1 else MAYBE


def _ahead_in(a: Extent, b: Extent, direction: str, margin: float) -> bool:
    """Centroids at least `margin` apart and both edges in the same order."""
    if direction == "left":
        return b.cx - a.cx >= margin and a.x0 <= b.x0 and a.x1 <= b.x1
    if direction == "right":
        return a.cx - b.cx >= margin and a.x0 >= b.x0 and a.x1 >= b.x1
    if direction == "top":
        return b.cy - a.cy >= margin and a.y0 <= b.y0 and a.y1 <= b.y1
    return a.cy - b.cy >= margin and a.y0 >= b.y0 and a.y1 >= b.y1


def _ahead(a: SceneObject, b: SceneObject, direction: str, margin: float) -> bool:
    """`a` is clearly further towards `direction` than `b`, seen and whole shapes alike."""
    return _ahead_in(a.seen, b.seen, direction, margin) and _ahead_in(
        a.whole, b.whole, direction, margin
    )


def _rank_truths(objs: list[SceneObject], rank: int, direction: str, margin: float) -> list[int]:
    """Truth of "the rank-th from direction" for each candidate, from its possible ranks."""
    out = []
    for o in objs:
        ahead = sum(_ahead(b, o, direction, margin) for b in objs if b is not o)
        behind = sum(_ahead(o, b, direction, margin) for b in objs if b is not o)
        lowest, highest = ahead + 1, len(objs) - behind
        if lowest == highest == rank:
            out.append(YES)
        else:
            out.append(MAYBE if lowest <= rank <= highest else NO)
    return out


def _lone_truth(obj: SceneObject, direction: str, scene: Scene) -> int:
    """A single candidate is "on the left" only if it actually lies on the left of the image."""
    verdicts = []
    for e in (obj.seen, obj.whole):
        frac = e.cx / scene.width if direction in ("left", "right") else e.cy / scene.height
        if direction in ("right", "bottom"):
            frac = 1 - frac
        verdicts.append(YES if frac <= LONE_YES else NO if frac >= LONE_NO else MAYBE)
    return _agree(verdicts)


def _relation_in(t: Extent, a: Extent, relation: str, margin: float) -> int:
    """Clear: ahead of the anchor within a narrow cone; clearly not: behind it or far off-axis."""
    dx, dy = t.cx - a.cx, t.cy - a.cy
    along, across = {
        "above": (-dy, abs(dx)),
        "below": (dy, abs(dx)),
        "left": (-dx, abs(dy)),
        "right": (dx, abs(dy)),
    }[relation]
    direction = {"above": "top", "below": "bottom"}.get(relation, relation)
    if _ahead_in(t, a, direction, margin) and across <= CONE_YES * along:
        return YES
    if along <= 0 or across >= CONE_NO * along:
        return NO
    return MAYBE


def relation_truth(target: SceneObject, anchor: SceneObject, relation: str, margin: float) -> int:
    """Truth of "target lies `relation` of anchor" (above, below, left, right)."""
    return _agree(
        _relation_in(t, a, relation, margin)
        for t, a in ((target.seen, anchor.seen), (target.whole, anchor.whole))
    )


def expression_truths(scene: Scene, expression: Expression | str) -> list[int]:
    """NO / MAYBE / YES for every object of the scene."""
    expr = parse_expression(expression) if isinstance(expression, str) else expression
    margin = MARGIN * max(scene.height, scene.width)
    objs = scene.objects
    truths = [NO] * len(objs)
    cands = [i for i, o in enumerate(objs) if expr.head.matches(o)]
    loc = expr.locator
    if loc is None:
        values = [YES] * len(cands)
    elif isinstance(loc, Position) and len(cands) == 1:
        values = [_lone_truth(objs[cands[0]], loc.direction, scene)]
    elif isinstance(loc, (Position, Ordinal)):
        rank = loc.rank if isinstance(loc, Ordinal) else 1
        values = _rank_truths([objs[i] for i in cands], rank, loc.direction, margin)
    else:
        anchors = [j for j, o in enumerate(objs) if loc.anchor.matches(o)]
        values = []
        for i in cands:
            value = max(
                (relation_truth(objs[i], objs[j], loc.relation, margin) for j in anchors if j != i),
                default=NO,
            )
            values.append(MAYBE if value == YES and len(anchors) > 1 else value)
    for i, value in zip(cands, values):
        truths[i] = value
    return truths


def resolve_expression(scene: Scene, expression: Expression | str) -> frozenset[int]:
    """Indices of the objects an expression could refer to (clear or borderline matches)."""
    return frozenset(i for i, t in enumerate(expression_truths(scene, expression)) if t != NO)


def describes_uniquely(scene: Scene, expression: Expression | str, target: int) -> bool:
    """True when `target` clearly matches and every other object clearly does not."""
    truths = expression_truths(scene, expression)
    return truths[target] == YES and sum(t != NO for t in truths) == 1


def _descriptions(obj: SceneObject) -> list[Description]:
    """Every noun phrase true of `obj`; a size word only comes with a shape noun."""
    out = []
    for k in range(1, len(ATTRIBUTES) + 1):
        for names in itertools.combinations(ATTRIBUTES, k):
            if "size" in names and "shape" not in names:
                continue
            out.append(Description(**{n: getattr(obj, n) for n in names}))
    return out


def _locator_heads(obj: SceneObject) -> list[Description]:
    return [
        Description(shape=obj.shape),
        Description(shape=obj.shape, color=obj.color),
        Description(color=obj.color),
        Description(),
    ]


def _names(scene: Scene) -> list[list[Description]]:
    """For each object, its shortest attribute-only phrases that name it alone (maybe none)."""
    out = []
    for j, obj in enumerate(scene.objects):
        unique = [d for d in _descriptions(obj) if describes_uniquely(scene, Expression(d), j)]
        shortest = min((len(d.words()) for d in unique), default=0)
        out.append([d for d in unique if len(d.words()) == shortest])
    return out


def _candidates(
    scene: Scene, target: int, names: list[list[Description]], rng: np.random.Generator
) -> dict[str, list[Expression]]:
    """Every expression kind's candidates for `target`, shuffled (most are ambiguous)."""
    obj = scene.objects[target]
    margin = MARGIN * max(scene.height, scene.width)
    heads = _locator_heads(obj)
    pools: dict[str, list[Expression]] = {
        "attribute": [Expression(d) for d in _descriptions(obj)],
        "position": [
            Expression(h, Position(d, form)) for h in heads for d in DIRECTIONS for form in (0, 1)
        ],
        "ordinal": [
            Expression(h, Ordinal(k, d)) for h in heads for d in DIRECTIONS for k in ORDINAL_WORDS
        ],
        "relation": [],
    }
    for j, anchor in enumerate(scene.objects):
        if j == target or not names[j]:
            continue
        for r in RELATIONS:
            if relation_truth(obj, anchor, r, margin) == YES:
                desc = names[j][int(rng.integers(len(names[j])))]
                form = int(rng.integers(len(RELATION_PHRASES[r])))
                pools["relation"] += [Expression(h, Relation(r, desc, form)) for h in heads]
    for pool in pools.values():
        rng.shuffle(pool)
    return pools


def _pick(
    scene: Scene,
    target: int,
    count: int,
    pools: dict[str, list[Expression]],
    rng: np.random.Generator,
) -> list[Expression]:
    """Up to `count` unambiguous expressions, preferring a different kind for each."""
    kinds = [k for k in TYPE_WEIGHTS if pools[k]]
    chosen: list[Expression] = []
    used: set[str] = set()
    while kinds and len(chosen) < count:
        options = [k for k in kinds if k not in used] or kinds
        weights = np.array([TYPE_WEIGHTS[k] for k in options])
        kind = options[int(rng.choice(len(options), p=weights / weights.sum()))]
        used.add(kind)
        pool = pools[kind]
        while pool:
            expr = pool.pop()
            if expr not in chosen and describes_uniquely(scene, expr, target):
                chosen.append(expr)
                break
        if not pool:
            kinds.remove(kind)
    return chosen


def referring_expressions(
    scene: Scene, counts: dict[int, int], rng: np.random.Generator
) -> dict[int, list[Expression]]:
    """Up to `counts[target]` distinct unambiguous expressions of varied kinds per target."""
    names = _names(scene)
    return {
        target: _pick(scene, target, count, _candidates(scene, target, names, rng), rng)
        for target, count in counts.items()
    }
