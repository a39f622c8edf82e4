"""Visual projectors (patch features → visual tokens), registered by name in `PROJECTORS`."""

from lightning_modules.projectors import (  # noqa: F401  (importing registers the projectors)
    c_abstractor,
    ldpv2,
    mlp,
    pool,
    resampler,
    semantic,
    tokenpacker,
)
from lightning_modules.projectors.base import (
    PROJECTORS,
    Projector,
    ProjectorOutput,
    build_projector,
    register_projector,
)

__all__ = ["PROJECTORS", "Projector", "ProjectorOutput", "build_projector", "register_projector"]
