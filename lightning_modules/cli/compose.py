"""Compose a run config: dataclass schema + YAML groups under `configs/` + `key=value` overrides.

A group selection (`projector=pool`) loads `configs/<group>/<choice>.yaml`. For polymorphic groups
the chosen component's own dataclass becomes the schema of that node, so `projector.k` is checked
against the pool projector's fields. Dotted overrides (`projector.k=4`) are merged last.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from common.errors import ConfigError
from common.files import atomic_write

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs"


@dataclasses.dataclass
class GroupSpec:
    """How a config group is selected and where its YAML lands.

    Arguments:
      name: the group folder under `configs/` and the override key (`projector=...`).
      default: the choice when neither the command line nor the preset picks one.
      target: the config node the YAML is merged into (None = the group's name, "" = the root).
      schemas: for polymorphic groups, a function choice -> dataclass schema of the node.
    """

    name: str
    default: str
    target: str | None = None
    schemas: Callable[[str], type] | None = None


def group_choices(group: str, config_root: Path = CONFIG_ROOT) -> list[str]:
    folder = config_root / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err}). Fix the file.") from err
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (UTF-8) file; give a YAML config.") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping at the top level, got {type(data).__name__}."
        )
    return data


def _group_yaml(group: str, choice: str, config_root: Path, required: bool) -> dict:
    path = config_root / group / f"{choice}.yaml"
    if path.is_file():
        return load_yaml(path)
    if required:
        choices = ", ".join(group_choices(group, config_root)) or "(none)"
        raise ConfigError(
            f"unknown {group} '{choice}': no file {path}. Choose one of: {choices} "
            f"(`{group}=<choice>`)."
        )
    return {}


def split_overrides(overrides: Sequence[str], groups: Sequence[str]) -> tuple[dict, list[str]]:
    """Split `key=value` strings into group selections and dotted value overrides."""
    choices: dict[str, str] = {}
    values: list[str] = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override '{item}' is not of the form key=value (e.g. `trainer.max_epochs=2`)."
            )
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key.")
        if key in groups:
            choices[key] = value.strip()
        else:
            values.append(f"{key}={value}")
    return choices, values


def _node_keys(cfg: DictConfig, dotted: str) -> list[str]:
    node: Any = cfg
    for part in [p for p in dotted.split(".") if p]:
        if not isinstance(node, DictConfig) or part not in node:
            return []
        node = node[part]
    return sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []


def _explain(err: OmegaConfBaseException, cfg: DictConfig, where: str) -> ConfigError:
    full_key = getattr(err, "full_key", None) or ""
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    leaf = full_key.rsplit(".", 1)[-1]
    if isinstance(err, ConfigKeyError) or "not in" in str(err):
        allowed = _node_keys(cfg, parent)
        close = difflib.get_close_matches(leaf, allowed, n=1)
        hint = f" Did you mean '{(parent + '.') if parent else ''}{close[0]}'?" if close else ""
        return ConfigError(
            f"unknown config key '{full_key}' ({where}). Allowed keys under "
            f"'{parent or '<root>'}': {', '.join(allowed)}.{hint}"
        )
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return ConfigError(f"bad value for config key '{full_key}' ({where}): {msg}")
    return ConfigError(f"config error at '{full_key}' ({where}): {str(err).splitlines()[0]}")


def check_not_a_node(cfg: DictConfig, values: Sequence[str]) -> None:
    """ConfigError for a `key=value` override whose key names a group of settings (`optim=3`):
    OmegaConf's merge error would not name the key."""
    for item in values:
        key, _, value = item.partition("=")
        key = key.strip().lstrip("+")
        node = OmegaConf.select(cfg, key, default=None)
        written = value.strip()
        if (
            isinstance(node, DictConfig)
            and not written.startswith(("{", "["))
            and written != "null"
        ):
            raise ConfigError(
                f"{key}={value}: '{key}' holds settings ({', '.join(_node_keys(cfg, key))}), not "
                f"a value; set one of them ({key}.<setting>=...)."
            )


def merge_into(cfg: DictConfig, data: Mapping | DictConfig, where: str) -> None:
    """Merge `data` into the root `cfg`, turning OmegaConf errors into ConfigError."""
    _merge(cfg, data, "", where)


def _merge(cfg: DictConfig, data: Mapping | DictConfig, target: str, where: str) -> None:
    node = OmegaConf.select(cfg, target) if target else cfg
    try:
        node.merge_with(data)
    except OmegaConfBaseException as err:
        raise _explain(err, cfg, where) from err


def _schema_node(schema: type, where: str) -> DictConfig:
    try:
        return OmegaConf.structured(schema)
    except OmegaConfBaseException as err:  # a schema bug, not a user error
        raise RuntimeError(f"schema {schema.__name__} for {where} is not a valid config") from err


def compose(
    schema: type,
    groups: Sequence[GroupSpec],
    overrides: Sequence[str] = (),
    config_root: Path = CONFIG_ROOT,
) -> DictConfig:
    """Build the resolved config for `overrides` (see the module docstring for the order)."""
    specs = {g.name: g for g in groups}
    choices, values = split_overrides(overrides, list(specs))
    cfg = _schema_node(schema, "<root>")
    OmegaConf.set_struct(cfg, True)

    preset_spec = specs.get("preset")
    preset_body: dict = {}
    preset_defaults: dict = {}
    if preset_spec is not None:
        preset = choices.get("preset", preset_spec.default)
        preset_body = _group_yaml("preset", preset, config_root, required=True)
        preset_defaults = preset_body.pop("defaults", {}) or {}
        unknown = sorted(set(preset_defaults) - set(specs))
        if unknown:
            raise ConfigError(
                f"{config_root / 'preset' / (preset + '.yaml')}: 'defaults' names unknown groups "
                f"{unknown}; groups are: {', '.join(sorted(specs))}."
            )
        choices.setdefault("preset", preset)

    for spec in groups:
        if spec.name == "preset":
            continue
        choice = str(choices.get(spec.name, preset_defaults.get(spec.name, spec.default)))
        choices[spec.name] = choice
        target = spec.name if spec.target is None else spec.target
        where = f"configs/{spec.name}/{choice}.yaml"
        if spec.schemas is not None:
            try:
                node_schema = spec.schemas(choice)
            except KeyError as err:
                known = ", ".join(group_choices(spec.name, config_root))
                raise ConfigError(
                    f"unknown {spec.name} '{choice}'. Choose one of: {known}."
                ) from err
            node = _schema_node(node_schema, spec.name)
            OmegaConf.set_struct(node, True)
            with open_dict(cfg):
                cfg[target] = node
            data = _group_yaml(spec.name, choice, config_root, required=False)
        else:
            data = _group_yaml(spec.name, choice, config_root, required=True)
        _merge(cfg, data, target, where)

    if preset_body:
        _merge(cfg, preset_body, "", f"configs/preset/{choices['preset']}.yaml")
    try:
        cli = OmegaConf.from_dotlist(list(values))
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot parse overrides {list(values)}: {err}") from err
    check_not_a_node(cfg, values)
    _merge(cfg, cli, "", "command line")
    if "groups" in cfg:
        with open_dict(cfg):
            cfg.groups = dict(sorted(choices.items()))
    return cfg


def save_config(cfg: DictConfig, path: Path) -> Path:
    """Write the fully resolved config as YAML (atomically)."""
    return atomic_write(path, OmegaConf.to_yaml(cfg, resolve=True))
