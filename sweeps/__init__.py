"""Optuna sweeps over visual projectors: search spaces, workers, pruning and Pareto reports.

`sweeps.pruning` is imported on demand: it pulls in `pytorch_lightning`.
"""

from sweeps.report import load_study, pareto_report
from sweeps.space import SearchSpace, load_space, suggest
from sweeps.study import SweepConfig, run_sweep

__all__ = [
    "SearchSpace",
    "SweepConfig",
    "load_space",
    "load_study",
    "pareto_report",
    "run_sweep",
    "suggest",
]
