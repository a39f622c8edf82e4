"""The RIS model, one module per stage in data-flow order:

`vision_tower` → `projectors` → `llm` → `grounding` → `mask_decoder` → `ris_model` (the
LightningModule that composes them), with `feature_cache` (frozen encoders run once per image),
`metrics`, `schedules` and `visualize` beside them. `cli/` is the `svp` command line and its
pipeline stages, `sam_pretraining/` trains the small SAM, `probes/` holds research probes.
"""
