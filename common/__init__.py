"""What the data layer and the model layer both use, owned by neither: user-facing errors,
atomic file writes and file identities, CPU thread pinning, and SAM checkpoints."""
