"""Sweep search spaces: `configs/sweep/<name>.yaml` → validated `SearchSpace` → trial overrides.

A space file holds the study-level keys and either `params` (sampled, with conditional params) or
`grid` (an explicit list of configs). The format is documented at the top of every file under
`configs/sweep/`; `compare_projectors.yaml` shows every feature.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from common.errors import ConfigError

if TYPE_CHECKING:
    import optuna

SWEEP_DIR = Path(__file__).resolve().parent.parent / "configs" / "sweep"
METRICS = (
    "val_ciou",
    "val_giou",
    "testA_ciou",
    "testA_giou",
    "testB_ciou",
    "testB_giou",
    "tokens_mean",
    "tokens_p95",
    "train_minutes",
)
SAMPLERS = ("tpe", "nsga2", "random", "grid")
GRID_PARAM = "config"
_STUDY_KEYS = {"directions", "metrics", "sampler", "n_trials", "pruning", "base_overrides"}
_PARAM_KEYS = {"choices", "int", "float", "log", "step", "when", "key"}
_PRUNING_KEYS = {"monitor", "n_startup_trials", "n_warmup_steps"}
Scalar = str | int | float | bool
_INACTIVE = object()


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as text; read it as a float, as YAML 1.2 and OmegaConf do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


@dataclass(frozen=True)
class ParamSpec:
    """One sampled parameter: Optuna name, the config key it overrides, its distribution."""

    name: str
    key: str
    kind: str
    choices: tuple[Scalar, ...] = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    when: dict[str, tuple[Scalar, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class PruningSpec:
    """Median pruning of a single-objective study on a metric logged during validation."""

    monitor: str = "val/ciou"
    n_startup_trials: int = 5
    n_warmup_steps: int = 1


@dataclass(frozen=True)
class SearchSpace:
    """A validated sweep space; `grid` holds the override lists of a grid space."""

    name: str
    path: Path
    directions: tuple[str, ...]
    metrics: tuple[str, ...]
    sampler: str
    n_trials: int
    base_overrides: tuple[str, ...] = ()
    params: tuple[ParamSpec, ...] = ()
    grid: tuple[tuple[str, ...], ...] = ()
    pruning: PruningSpec | None = None


def available_spaces(sweep_dir: Path = SWEEP_DIR) -> list[str]:
    return sorted(p.stem for p in sweep_dir.glob("*.yaml"))


def load_space(name_or_path: str | Path, sweep_dir: Path = SWEEP_DIR) -> SearchSpace:
    """Read and validate `configs/sweep/<name>.yaml`, or a YAML file given by path."""
    text = str(name_or_path)
    path = Path(text) if text.endswith((".yaml", ".yml")) or "/" in text else None
    if path is None:
        path = sweep_dir / f"{text}.yaml"
        if not path.is_file():
            names = ", ".join(available_spaces(sweep_dir)) or "(none)"
            raise ConfigError(
                f"unknown sweep space '{text}' (no {path}). Choose one of: {names}, "
                "or give the path of a space YAML file."
            )
    elif not path.is_file():
        raise ConfigError(f"sweep space file {path} does not exist. Check the path.")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err}). Fix the file.") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of study keys at the top level.")
    return _parse_space(data, path)


def suggest(trial: optuna.Trial, space: SearchSpace) -> list[str]:
    """Sample one trial's config: the space's base overrides followed by the sampled ones."""
    overrides = list(space.base_overrides)
    if space.grid:
        index = trial.suggest_categorical(GRID_PARAM, list(range(len(space.grid))))
        return overrides + list(space.grid[index])
    values: dict[str, Scalar] = {}
    for p in space.params:
        if not all(values.get(dep, _INACTIVE) in allowed for dep, allowed in p.when.items()):
            continue
        if p.kind == "choices":
            value = trial.suggest_categorical(p.name, list(p.choices))
        elif p.kind == "int":
            value = trial.suggest_int(
                p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log
            )
        else:
            value = trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)
        values[p.name] = value
        overrides.append(f"{p.key}={format_value(value)}")
    return overrides


def trial_overrides(space: SearchSpace) -> list[list[str]]:
    """Override lists that between them set every value a trial of `space` can set: each grid
    config, or each parameter's choices and bounds (a conditional one with the first choice it
    depends on) over the base overrides. Composing them checks a space before it trains."""
    base = list(space.base_overrides)
    if space.grid:
        return [[*base, *entry] for entry in space.grid]
    keys = {p.name: p.key for p in space.params}
    out = []
    for p in space.params:
        values = p.choices or (p.low, p.high)
        if p.kind == "int":
            values = tuple(int(v) for v in values)
        when = [f"{keys[k]}={format_value(v[0])}" for k, v in p.when.items()]
        out += [[*base, *when, f"{p.key}={format_value(v)}"] for v in values]
    return out or [base]


def format_value(value: Scalar) -> str:
    """A value as the config override parser reads it back (`true`, `0.001`, `1e-05`, `pool`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def override_value(overrides: list[str] | tuple[str, ...], key: str) -> str | None:
    """The value the last `key=value` in `overrides` sets, or None."""
    found = None
    for item in overrides:
        k, _, v = item.partition("=")
        if k.strip() == key:
            found = v.strip()
    return found


def _parse_space(data: dict, path: Path) -> SearchSpace:
    where = str(path)
    has_params, has_grid = "params" in data, "grid" in data
    _check_keys(data, _STUDY_KEYS | {"params", "grid"}, where, "")
    if has_params == has_grid:
        raise ConfigError(f"{where}: give exactly one of `params` (sampled) or `grid` (listed).")
    directions = _str_list(data.get("directions", ["maximize", "minimize"]), where, "directions")
    for d in directions:
        if d not in ("maximize", "minimize"):
            raise ConfigError(f"{where}: directions: '{d}' must be 'maximize' or 'minimize'.")
    metrics = _str_list(data.get("metrics", ["val_ciou", "tokens_mean"]), where, "metrics")
    if len(metrics) != len(directions):
        raise ConfigError(
            f"{where}: metrics has {len(metrics)} names but directions has {len(directions)}; "
            "give one metric per direction."
        )
    for m in metrics:
        if m not in METRICS:
            raise ConfigError(
                f"{where}: metrics: unknown '{m}'. Choose from: {', '.join(METRICS)}."
            )
    base = _str_list(data.get("base_overrides", []), where, "base_overrides")
    for item in base:
        if "=" not in item:
            raise ConfigError(f"{where}: base_overrides: '{item}' is not of the form key=value.")
    sampler = data.get("sampler", "grid" if has_grid else "tpe")
    if sampler not in SAMPLERS:
        raise ConfigError(f"{where}: sampler: '{sampler}' is not one of {', '.join(SAMPLERS)}.")
    if (sampler == "grid") != has_grid:
        raise ConfigError(f"{where}: sampler: 'grid' goes with a `grid:` list, and only with it.")
    grid = _parse_grid(data["grid"], where) if has_grid else ()
    params = _parse_params(data["params"], where) if has_params else ()
    n_trials = data.get("n_trials", len(grid) if has_grid else None)
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise ConfigError(f"{where}: n_trials: give a positive integer (got {n_trials!r}).")
    if has_grid and n_trials > len(grid):
        raise ConfigError(
            f"{where}: n_trials: {n_trials} exceeds the {len(grid)} grid configs; "
            "omit n_trials to run each config once."
        )
    pruning = _parse_pruning(data.get("pruning", False), where)
    if pruning is not None and len(directions) > 1:
        raise ConfigError(
            f"{where}: pruning: multi-objective studies cannot prune; set `pruning: false` "
            "or use a single direction."
        )
    return SearchSpace(
        name=path.stem,
        path=path,
        directions=tuple(directions),
        metrics=tuple(metrics),
        sampler=sampler,
        n_trials=n_trials,
        base_overrides=tuple(base),
        params=params,
        grid=grid,
        pruning=pruning,
    )


def _parse_params(raw: Any, where: str) -> tuple[ParamSpec, ...]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: params: expected a non-empty mapping name -> spec.")
    specs: dict[str, ParamSpec] = {}
    for name, spec in raw.items():
        at = f"params.{name}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: {at}: expected a mapping (e.g. {{int: [2, 8]}}).")
        _check_keys(spec, _PARAM_KEYS, where, at)
        kinds = [k for k in ("choices", "int", "float") if k in spec]
        if len(kinds) != 1:
            raise ConfigError(f"{where}: {at}: give exactly one of `choices`, `int` or `float`.")
        kind = kinds[0]
        key = spec.get("key", name)
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}: {at}.key: expected a config key such as projector.k.")
        log, step = spec.get("log", False), spec.get("step")
        if not isinstance(log, bool):
            raise ConfigError(f"{where}: {at}.log: expected true or false.")
        if kind == "choices":
            choices = spec["choices"]
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{where}: {at}.choices: expected a non-empty list.")
            for c in choices:
                if not isinstance(c, Scalar):
                    raise ConfigError(f"{where}: {at}.choices: {c!r} is not a plain value.")
            if log or step is not None:
                raise ConfigError(f"{where}: {at}: `log` and `step` apply to int/float only.")
            param = ParamSpec(name, key, kind, choices=tuple(choices))
        else:
            low, high = _bounds(spec[kind], kind, where, f"{at}.{kind}")
            if log and low <= 0:
                raise ConfigError(f"{where}: {at}: a log range needs a positive lower bound.")
            bad_step = not _is_number(step) or step <= 0 or (kind == "int" and step != int(step))
            if step is not None and (log or bad_step):
                raise ConfigError(f"{where}: {at}.step: a positive {kind}, and not with log.")
            param = ParamSpec(name, key, kind, low=low, high=high, log=log, step=step)
        when = _parse_when(spec.get("when", {}), specs, where, at)
        specs[name] = replace(param, when=when)
    return tuple(specs.values())


def _parse_when(raw: Any, earlier: dict[str, ParamSpec], where: str, at: str) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {at}.when: expected a mapping such as {{projector: pool}}.")
    when = {}
    for dep, allowed in raw.items():
        parent = earlier.get(dep)
        if parent is None or parent.kind != "choices":
            raise ConfigError(
                f"{where}: {at}.when: '{dep}' must name a `choices` param listed above this one."
            )
        values = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        for v in values:
            if v not in parent.choices:
                raise ConfigError(
                    f"{where}: {at}.when: {v!r} is not among params.{dep}.choices "
                    f"{list(parent.choices)}."
                )
        when[dep] = values
    return when


def _parse_grid(raw: Any, where: str) -> tuple[tuple[str, ...], ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: grid: expected a non-empty list of {{key: value}} configs.")
    configs: list[tuple[str, ...]] = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or not entry:
            raise ConfigError(
                f"{where}: grid[{i}]: expected a mapping such as {{projector: pool}}."
            )
        for key, value in entry.items():
            if not isinstance(value, Scalar):
                raise ConfigError(f"{where}: grid[{i}].{key}: {value!r} is not a plain value.")
        overrides = tuple(f"{k}={format_value(v)}" for k, v in entry.items())
        if overrides in configs:
            raise ConfigError(
                f"{where}: grid[{i}] repeats grid[{configs.index(overrides)}]; remove one."
            )
        configs.append(overrides)
    return tuple(configs)


def _parse_pruning(raw: Any, where: str) -> PruningSpec | None:
    if raw is False or raw is None:
        return None
    if raw is True:
        return PruningSpec()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: pruning: expected true, false or a mapping.")
    _check_keys(raw, _PRUNING_KEYS, where, "pruning")
    spec = PruningSpec(**raw)
    if not isinstance(spec.monitor, str):
        raise ConfigError(f"{where}: pruning.monitor: expected a logged metric name (val/ciou).")
    for key in ("n_startup_trials", "n_warmup_steps"):
        value = getattr(spec, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{where}: pruning.{key}: expected a non-negative integer.")
    return spec


def _check_keys(data: dict, allowed: set[str], where: str, at: str) -> None:
    for key in data:
        if key not in allowed:
            path = f"{at}.{key}" if at else str(key)
            raise ConfigError(
                f"{where}: unknown key '{path}'. Allowed here: {', '.join(sorted(allowed))}."
            )


def _str_list(raw: Any, where: str, key: str) -> list[str]:
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise ConfigError(f"{where}: {key}: expected a list of strings.")
    if key != "base_overrides" and not raw:
        raise ConfigError(f"{where}: {key}: expected at least one entry.")
    return raw


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _bounds(raw: Any, kind: str, where: str, at: str) -> tuple[float, float]:
    ok = isinstance(raw, list) and len(raw) == 2 and all(_is_number(x) for x in raw)
    if ok and kind == "int":
        ok = all(isinstance(x, int) for x in raw)
    if not ok or raw[0] >= raw[1]:
        example = "[2, 8]" if kind == "int" else "[1.0e-4, 1.0e-2]"
        raise ConfigError(f"{where}: {at}: expected [low, high] with low < high, e.g. {example}.")
    return raw[0], raw[1]
