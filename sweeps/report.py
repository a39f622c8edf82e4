"""Sweep reports: every trial and the Pareto front as Markdown, CSV and a tokens-vs-cIoU plot."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from common.errors import ConfigError, DataError
from common.files import atomic_write, write_csv
from sweeps.space import override_value
from sweeps.study import SURPLUS, storage_url

COLUMNS = (
    "trial",
    "state",
    "projector",
    "token_budget",
    "tokens_mean",
    "tokens_p95",
    "val_ciou",
    "val_giou",
    "testA_ciou",
    "testA_giou",
    "testB_ciou",
    "testB_giou",
    "train_minutes",
    "run_dir",
)
_LABELS = {
    "token_budget": "token budget",
    "tokens_mean": "tokens mean",
    "tokens_p95": "tokens p95",
    "train_minutes": "train min",
    "run_dir": "run dir",
}


def load_study(
    name: str, storage: str | None = None, runs_root: str | Path = "runs"
) -> optuna.Study:
    """Open an existing study; the error lists the studies that do exist."""
    url = storage_url(name, storage, runs_root)
    if storage is None:
        path = Path(runs_root) / name / "study.db"
        if not path.is_file():
            known = sorted(p.parent.name for p in Path(runs_root).glob("*/study.db"))
            raise ConfigError(
                f"no study '{name}': {path} does not exist. Studies under {runs_root}/: "
                f"{', '.join(known) or '(none)'}. Run `svp sweep` first, or pass the storage URL "
                "the sweep used (sweep.storage=...)."
            )
    try:
        names = optuna.get_all_study_names(url)
    except (ValueError, ImportError, optuna.exceptions.StorageInternalError) as err:
        raise ConfigError(f"sweep.storage: cannot open '{url}' ({err}). Check the URL.") from err
    if name not in names:
        raise ConfigError(
            f"no study '{name}' in {url}. Studies there: {', '.join(sorted(names)) or '(none)'}."
        )
    return optuna.load_study(study_name=name, storage=url)


def trial_row(trial: FrozenTrial) -> dict[str, Any]:
    """One report row: the trial's number and state, then the metrics train_fn returned."""
    metrics = trial.user_attrs.get("metrics", {})
    row = {key: metrics.get(key) for key in COLUMNS}
    row.update(trial=trial.number, state=trial.state.name, run_dir=trial.user_attrs.get("run_dir"))
    if row["projector"] is None:
        row["projector"] = override_value(trial.user_attrs.get("overrides", []), "projector")
    return row


def pareto_report(
    study: optuna.Study,
    out_dir: str | Path,
    echo: bool = True,
    baseline: tuple[str, float] | None = None,
    budget: list[str] | tuple[str, ...] = (),
) -> dict[str, Path]:
    """Write report.md, trials.csv, pareto.csv and pareto.png to `out_dir`; print the Markdown.

    `baseline` (a name and its val cIoU, e.g. the largest-object baseline) is drawn as a line and
    named, with the trials below it; `budget` lists the overrides every trial trained with."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SURPLUS)]
    rows = [trial_row(t) for t in trials]
    front = sorted(
        (trial_row(t) for t in study.best_trials),
        key=lambda r: (_number(r["tokens_mean"], float("inf")), r["trial"]),
    )
    paths = {
        "markdown": out / "report.md",
        "trials": out / "trials.csv",
        "pareto": out / "pareto.csv",
        "plot": out / "pareto.png",
    }
    write_csv(paths["trials"], rows, COLUMNS)
    write_csv(paths["pareto"], front, COLUMNS)
    _plot(paths["plot"], rows, study.study_name, baseline)
    markdown = _markdown(study, trials, rows, front, baseline, budget)
    atomic_write(paths["markdown"], markdown)
    if echo:
        print(markdown)
    return paths


def tokens_ciou_front(rows: list[dict[str, Any]], metric: str = "val_ciou") -> list[dict[str, Any]]:
    """Completed rows no other row beats on both fewer mean tokens and higher `metric`."""
    done = [r for r in rows if r["state"] == "COMPLETE" and _plottable(r, metric)]
    front: list[dict[str, Any]] = []
    for r in sorted(done, key=lambda r: (r["tokens_mean"], -r[metric])):
        if not front or r[metric] > front[-1][metric]:
            front.append(r)
    return front


def _context(rows, baseline: tuple[str, float] | None, budget) -> list[str]:
    lines = []
    if budget:
        lines.append(f"Every trial trains with: `{' '.join(budget)}`.")
    if baseline is not None:
        name, value = baseline
        done = [r for r in rows if r["state"] == "COMPLETE" and _plottable(r)]
        below = [str(r["trial"]) for r in done if r["val_ciou"] <= value]
        lines.append(
            f"Baseline: {name}, val cIoU {value:.4f}; "
            + (
                f"trials at or below it: {', '.join(below)}."
                if below
                else "every trial is above it."
            )
        )
    return lines


def _markdown(study: optuna.Study, trials, rows, front, baseline=None, budget=()) -> str:
    attrs = study.user_attrs
    objectives = ", ".join(
        f"{d.name.lower()} {m}"
        for d, m in zip(study.directions, attrs.get("metrics", ["value"] * len(study.directions)))
    )
    counts = {s: sum(t.state == s for t in trials) for s in TrialState}
    summary = ", ".join(f"{n} {s.name.lower()}" for s, n in counts.items() if n) or "none"
    lines = [
        f"# Sweep `{study.study_name}`",
        "",
        f"Space `{attrs.get('space', '?')}`; objectives: {objectives}.",
        f"Trials: {len(trials)} ({summary}).",
        *_context(rows, baseline, budget),
        "",
        f"## Pareto front ({len(front)} trials)",
        "",
        *_table(front),
        "",
        "## All trials",
        "",
        *_table(rows),
    ]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    if failed:
        lines += ["", "## Failed trials", ""]
        lines += [
            f"- trial {t.number}: {t.user_attrs.get('error', 'no error recorded')}" for t in failed
        ]
    lines += ["", "![visual tokens vs val cIoU](pareto.png)", ""]
    return "\n".join(lines)


def _table(rows: list[dict[str, Any]]) -> list[str]:
    header = [
        _LABELS.get(c, c.replace("_ciou", " cIoU").replace("_giou", " gIoU")) for c in COLUMNS
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |")
    return lines


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _plot(
    path: Path, rows: list[dict[str, Any]], title: str, baseline: tuple[str, float] | None = None
) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    done = [r for r in rows if r["state"] == "COMPLETE" and _plottable(r)]
    for projector in sorted({str(r["projector"]) for r in done}):
        mine = [r for r in done if str(r["projector"]) == projector]
        ax.scatter([r["tokens_mean"] for r in mine], [r["val_ciou"] for r in mine], label=projector)
    front = tokens_ciou_front(rows)
    if front:
        _draw_front(ax, front, "Pareto front")
        ax.set_xscale("log")
        plain = FuncFormatter(lambda x, _: f"{x:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="minor", labelsize="x-small")
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no completed trials", ha="center", va="center", transform=ax.transAxes)
    if baseline is not None:
        _draw_baseline(ax, baseline[1], baseline[0])
    ax.set_xlabel("visual tokens per image (mean)")
    ax.set_ylabel("val cIoU")
    ax.set_title(f"{title}: visual tokens vs val cIoU")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda file: fig.savefig(file, dpi=120, format="png"))


def _draw_front(ax, front: list[dict[str, Any]], label: str, metric: str = "val_ciou") -> None:
    """The tokens-vs-cIoU front as a black staircase."""
    ax.step(
        [r["tokens_mean"] for r in front],
        [r[metric] for r in front],
        where="post",
        color="black",
        linewidth=1,
        label=label,
    )


def _draw_baseline(ax, value: float, name: str) -> None:
    """A baseline's cIoU as a grey dashed line, named at its left end."""
    ax.axhline(value, color="grey", linestyle="--", linewidth=1)
    ax.annotate(
        f"{name} {value:.3f}",
        (0.01, value),
        xycoords=("axes fraction", "data"),
        textcoords="offset points",
        xytext=(0, 3),
        fontsize="x-small",
        color="grey",
    )


def _plottable(row: dict[str, Any], metric: str = "val_ciou") -> bool:
    return _number(row["tokens_mean"], 0) > 0 and _number(row.get(metric), None) is not None


def _number(value: Any, default: Any) -> Any:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else default


# ---------------------------------------------------------------- runs over seeds
SUMMARY_SPLITS = ("val", "testA", "testB")


def run_rows(folder: str | Path) -> list[dict[str, Any]]:
    """One row per finished run under `folder` (each `<run>/metrics.json`, with its config's
    seed): projector, token budget, seed, tokens per image, cIoU per split, train minutes."""
    from omegaconf import OmegaConf

    rows = []
    for path in sorted(Path(folder).glob("*/metrics.json")):
        try:
            metrics = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            msg = f"{path} is not valid JSON ({err}); rerun that run or move it away."
            raise DataError(msg) from None
        if not isinstance(metrics, dict):
            raise DataError(f"{path} holds no run's metrics (a JSON object); move that run away.")
        config = path.parent / "config.yaml"
        seed = OmegaConf.load(config).get("seed") if config.is_file() else None
        row = {
            "run": path.parent.name,
            "projector": metrics.get("projector"),
            "token_budget": metrics.get("token_budget"),
            "seed": seed,
            "tokens_mean": metrics.get("tokens_mean"),
            "train_minutes": metrics.get("train_minutes"),
        }
        row.update({f"{s}_ciou": metrics.get(f"{s}_ciou") for s in SUMMARY_SPLITS})
        rows.append(row)
    if not rows:
        raise ConfigError(
            f"no finished runs under {folder}: expected <run>/metrics.json folders (the runs of "
            "one name, e.g. runs/<name>)"
        )
    return rows


def seed_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows grouped by (projector, token budget): the number of seeds, mean tokens per image,
    and per split the mean, min and max cIoU; ordered by mean tokens."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["projector"], r["token_budget"]), []).append(r)
    out = []
    for (projector, budget), runs in groups.items():
        row = {
            "projector": projector,
            "token_budget": budget,
            "seeds": len(runs),
            "tokens_mean": statistics.fmean(r["tokens_mean"] for r in runs),
            "train_minutes": statistics.fmean(r["train_minutes"] for r in runs),
            "state": "COMPLETE",
        }
        for split in SUMMARY_SPLITS:
            values = [r[f"{split}_ciou"] for r in runs]
            row[f"{split}_ciou"] = statistics.fmean(values)
            row[f"{split}_min"], row[f"{split}_max"] = min(values), max(values)
        out.append(row)
    return sorted(out, key=lambda r: (r["tokens_mean"], str(r["projector"])))


FRONT_SPLITS = ("val", "testB")  # testB: the complex scenes, where the paper's claim is made


def runs_report(
    folder: str | Path, out_dir: str | Path, baselines: dict[str, float] | None = None
) -> dict[str, Path]:
    """summary.md, summary.csv and summary.png for the runs under `folder`: per projector and
    budget the mean cIoU over seeds (min–max), and the fronts of the means on val and testB;
    `baselines` is the largest-object cIoU per split."""
    rows = run_rows(folder)
    summary = seed_summary(rows)
    baselines = baselines or {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out / "summary.md",
        "csv": out / "summary.csv",
        "plot": out / "summary.png",
    }
    columns = ["projector", "token_budget", "seeds", "tokens_mean", "train_minutes"]
    for split in SUMMARY_SPLITS:
        columns += [f"{split}_ciou", f"{split}_min", f"{split}_max"]
    write_csv(paths["csv"], [{c: r[c] for c in columns} for r in summary], columns)
    fronts = {split: tokens_ciou_front(summary, f"{split}_ciou") for split in FRONT_SPLITS}
    on_front = {
        split: {(r["projector"], r["token_budget"]) for r in front}
        for split, front in fronts.items()
    }
    named = ", ".join(f"{s} {v:.4f}" for s, v in baselines.items())
    lines = [
        f"# Runs under `{folder}`: mean over seeds (min–max)",
        "",
        *([f"Largest-object baseline: {named}.", ""] if baselines else []),
        "| projector | budget | seeds | tokens / image | "
        + " | ".join(f"{s} cIoU" for s in SUMMARY_SPLITS)
        + " | train min | on the front |",
        "|---|---|---|---|" + "---|" * len(SUMMARY_SPLITS) + "---|---|",
    ]
    for r in summary:
        cells = [
            f"{r[f'{s}_ciou']:.4f} ({r[f'{s}_min']:.4f}–{r[f'{s}_max']:.4f})"
            for s in SUMMARY_SPLITS
        ]
        on = [s for s in FRONT_SPLITS if (r["projector"], r["token_budget"]) in on_front[s]]
        lines.append(
            f"| {r['projector']} | {r['token_budget']} | {r['seeds']} | {r['tokens_mean']:.1f} | "
            + " | ".join(cells)
            + f" | {r['train_minutes']:.1f} | {', '.join(on)} |"
        )
    lines += ["", "![mean visual tokens vs mean cIoU, val and testB](summary.png)", ""]
    atomic_write(paths["markdown"], "\n".join(lines))
    _summary_plot(paths["plot"], summary, fronts, str(folder), baselines)
    return paths


def _summary_plot(
    path: Path, summary, fronts: dict[str, list], title: str, baselines: dict[str, float]
) -> None:
    """One panel per front split: each projector's budgets joined by a line, min–max bars over
    the seeds, the front of the means (`fronts`, per split), the baseline."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(FRONT_SPLITS), sharex=True)
    plain = FuncFormatter(lambda x, _: f"{x:g}")
    for ax, split in zip(axes, FRONT_SPLITS):
        for projector in sorted({str(r["projector"]) for r in summary}):
            mine = [r for r in summary if str(r["projector"]) == projector]
            y = [r[f"{split}_ciou"] for r in mine]
            low = [v - r[f"{split}_min"] for v, r in zip(y, mine)]
            high = [r[f"{split}_max"] - v for v, r in zip(y, mine)]
            ax.errorbar(
                [r["tokens_mean"] for r in mine],
                y,
                yerr=[low, high],
                fmt="o-",
                capsize=3,
                linewidth=1,
                label=projector,
            )
        _draw_front(ax, fronts[split], "front", f"{split}_ciou")
        if split in baselines:
            _draw_baseline(ax, baselines[split], "largest object")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(plain)
        ax.set_xlabel("visual tokens per image (mean)")
        ax.set_ylabel(f"{split} cIoU (mean over seeds, min–max)")
        ax.set_title(split)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize="x-small")
    fig.suptitle(f"{title}: visual tokens vs cIoU")
    fig.tight_layout()
    atomic_write(path, lambda file: fig.savefig(file, dpi=120, format="png"))
