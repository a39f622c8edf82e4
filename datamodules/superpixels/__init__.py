"""Superpixel sources (`SOURCES`), the mask → partition rule, and the on-disk store."""

from .base import SOURCES, SuperpixelSource, build_source, register_source
from .felzenszwalb import FelzenszwalbSource
from .grid import GridSource
from .oracle import OracleSource
from .partition import partition_masks, refine_partition
from .sam import SamSource
from .slic import SlicSource

__all__ = [
    "SOURCES",
    "FelzenszwalbSource",
    "GridSource",
    "OracleSource",
    "SamSource",
    "SlicSource",
    "SuperpixelSource",
    "build_source",
    "partition_masks",
    "refine_partition",
    "register_source",
]
