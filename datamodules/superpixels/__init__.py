"""Superpixel sources (`SOURCES`), the mask → partition rule, and the on-disk store."""

from .base import SOURCES, SuperpixelSource, build_source, register_source, source_config
from .felzenszwalb import FelzenszwalbSource
from .grid import GridSource
from .oracle import OracleSource
from .partition import partition_masks, refine_partition
from .sam import SamSource
from .slic import SlicSource
from .store import SuperpixelStore

__all__ = [
    "SOURCES",
    "FelzenszwalbSource",
    "GridSource",
    "OracleSource",
    "SamSource",
    "SlicSource",
    "SuperpixelSource",
    "SuperpixelStore",
    "build_source",
    "partition_masks",
    "refine_partition",
    "register_source",
    "source_config",
]
