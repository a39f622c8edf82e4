"""Optuna pruning for `pytorch_lightning` trainers.

optuna-integration's callback imports `lightning.pytorch`, whose classes are not those of
`pytorch_lightning`; this one is written against `pytorch_lightning` directly.
"""

from __future__ import annotations

import optuna
import pytorch_lightning as pl

from common.errors import ConfigError


class OptunaPruningCallback(pl.Callback):
    """Report `monitor` to the trial after each validation; raise `optuna.TrialPruned` when told.

    Only global rank 0 talks to the trial (other DDP ranks may pass `trial=None`); its decision is
    broadcast, so every rank stops together and `trainer.fit` raises `TrialPruned` on each.
    """

    def __init__(self, trial: optuna.Trial | None, monitor: str = "val/ciou") -> None:
        super().__init__()
        self.trial = trial
        self.monitor = monitor

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            logged = ", ".join(sorted(trainer.callback_metrics)) or "none"
            raise ConfigError(
                f"pruning.monitor: '{self.monitor}' was not logged during validation (logged: "
                f"{logged}). Set `pruning.monitor` in the sweep space to one of those."
            )
        epoch = trainer.current_epoch
        prune = False
        if trainer.is_global_zero:
            self.trial.report(float(value), step=epoch)
            prune = self.trial.should_prune()
        if trainer.strategy.broadcast(prune, src=0):
            trainer.should_stop = True
            raise optuna.TrialPruned(f"pruned at epoch {epoch}: {self.monitor}={float(value):.4f}")
