"""Research probes (`svp diagnose ...`): they drive the model's stages from outside it."""
