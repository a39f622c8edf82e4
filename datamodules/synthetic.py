"""SynthRef: an offline referring-segmentation data set generator in the REFER layout.

    <root>/synthref/refs(unc).p, <root>/synthref/instances.json, <root>/images/synthref/*.png

The package `datamodules.synthref` holds the parts; this module is the public entry point.
"""

from datamodules.synthref.drawing import COLORS, SHAPES, SIZES, TEXTURES
from datamodules.synthref.grammar import (
    EXPRESSION_KINDS,
    Description,
    Expression,
    Ordinal,
    Position,
    Relation,
    expression_kind,
    expression_text,
    parse_expression,
    synthref_vocabulary,
)
from datamodules.synthref.resolver import (
    describes_uniquely,
    expression_truths,
    referring_expressions,
    resolve_expression,
)
from datamodules.synthref.scene import (
    Placement,
    Scene,
    SceneObject,
    compose_scene,
    decode_segmentation,
    sample_scene,
    scene_from_annotations,
)
from datamodules.synthref.writer import (
    SYNTHREF_SPLITS,
    SynthConfig,
    ensure_synthref,
    generate_synthref,
    synthref_exists,
    synthref_mismatch,
    synthref_paths,
)

__all__ = [
    "COLORS",
    "EXPRESSION_KINDS",
    "SHAPES",
    "SIZES",
    "SYNTHREF_SPLITS",
    "TEXTURES",
    "Description",
    "Expression",
    "Ordinal",
    "Placement",
    "Position",
    "Relation",
    "Scene",
    "SceneObject",
    "SynthConfig",
    "compose_scene",
    "decode_segmentation",
    "describes_uniquely",
    "ensure_synthref",
    "expression_kind",
    "expression_text",
    "expression_truths",
    "generate_synthref",
    "parse_expression",
    "referring_expressions",
    "resolve_expression",
    "sample_scene",
    "scene_from_annotations",
    "synthref_exists",
    "synthref_mismatch",
    "synthref_paths",
    "synthref_vocabulary",
]
