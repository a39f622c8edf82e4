"""Superpixel source base class, the `SOURCES` registry and `build_source`."""

from collections.abc import Callable, Mapping
from dataclasses import asdict, fields, is_dataclass
from typing import Any, ClassVar

import numpy as np
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.errors import ConfigError, DataError

SOURCES: dict[str, type["SuperpixelSource"]] = {}


def register_source(name: str) -> Callable[[type], type]:
    """Class decorator: register a superpixel source under `name` (its `Config.name` default)."""

    def register(cls: type) -> type:
        if name in SOURCES:
            raise ValueError(f"superpixel source {name!r} is already registered")
        cls.name = name
        SOURCES[name] = cls
        return cls

    return register


class SuperpixelSource:
    """An image (and, for `oracle`, its instance masks) → int16 H×W partition, labels 0..K-1."""

    name: ClassVar[str]
    Config: ClassVar[type]
    needs_instances: ClassVar[bool] = False

    def __init__(self, cfg: Any = None) -> None:
        self.cfg = _to_config(type(self), cfg)

    def __call__(self, image: np.ndarray, instance_masks: np.ndarray | None = None) -> np.ndarray:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise DataError(
                f"superpixel source {self.name!r} needs an H×W×3 uint8 image, "
                f"got shape {image.shape} dtype {image.dtype}"
            )
        return self.partition(image, instance_masks)

    def partition(self, image: np.ndarray, instance_masks: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError


def build_source(cfg: Any, **kwargs: Any) -> SuperpixelSource:
    """Build the source named by `cfg.name` (a dataclass, DictConfig or mapping)."""
    return _source_class(cfg)(cfg, **kwargs)


def source_config(cfg: Any) -> Any:
    """The validated `Config` dataclass (defaults filled in) of the source named by `cfg.name`."""
    return _to_config(_source_class(cfg), cfg)


def check_range(cfg: Any, key: str, low: float | None = None, high: float | None = None) -> None:
    """Raise ConfigError naming `superpixels.<key>` unless low <= cfg.<key> <= high."""
    value = getattr(cfg, key)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ConfigError(f"superpixels.{key} must be {bounds}, got {value}")


def _source_class(cfg: Any) -> type[SuperpixelSource]:
    name = cfg.get("name") if isinstance(cfg, Mapping | DictConfig) else getattr(cfg, "name", None)
    if name not in SOURCES:
        raise ConfigError(
            f"unknown superpixels.name {name!r}; choose one of {', '.join(sorted(SOURCES))}"
        )
    return SOURCES[name]


def _to_config(cls: type[SuperpixelSource], cfg: Any) -> Any:
    """Validate `cfg` against `cls.Config` (types, unknown keys, name) and return a Config."""
    if cfg is None:
        return cls.Config()
    if isinstance(cfg, cls.Config):
        return cfg
    if is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = asdict(cfg)
    if not isinstance(cfg, Mapping | DictConfig):
        raise ConfigError(f"superpixels config must be a mapping or dataclass, got {type(cfg)}")
    name = cfg.get("name", cls.name)
    if name != cls.name:
        raise ConfigError(f"superpixels.name is {name!r} but source {cls.name!r} was built")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls.Config), cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        known = ", ".join(f.name for f in fields(cls.Config))
        raise ConfigError(
            f"superpixels{'.' + key if key else ''}: {str(err.msg).splitlines()[0]} "
            f"(source {cls.name!r} takes the keys {known})"
        ) from err
    return OmegaConf.to_object(merged)
