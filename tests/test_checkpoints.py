"""`svp train`'s checkpoints: best.ckpt follows val cIoU, last.ckpt follows the newest epoch."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.cli.config import load_config
from lightning_modules.cli.train import _trainer


class FallingScore(pl.LightningModule):
    """Logs a val/ciou that falls every epoch, so the best epoch is the first."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, _):
        return self.layer(batch[0]).square().mean()

    def validation_step(self, batch, _):
        self.log("val/ciou", 1.0 / (self.current_epoch + 1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)


def test_last_ckpt_is_the_newest_epoch_even_when_it_is_not_the_best(tmp_path):
    cfg = load_config(["trainer.max_epochs=3", "trainer.enable_progress_bar=false"])
    trainer = _trainer(cfg, tmp_path, [], None, progress=False)
    trainer.fit(FallingScore(), _loader(), _loader())
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]
    best = torch.load(ckpts / "best.ckpt", weights_only=False)
    last = torch.load(ckpts / "last.ckpt", weights_only=False)
    assert best["epoch"] == 0  # the highest val/ciou
    assert last["epoch"] == 2 and last["global_step"] == 6  # resuming loses nothing
    assert trainer.checkpoint_callback.best_model_path.endswith("best.ckpt")

    # resuming from last continues at epoch 3 and keeps the best of the first run
    cfg = load_config(["trainer.max_epochs=4", "trainer.enable_progress_bar=false"])
    again = _trainer(cfg, tmp_path, [], None, progress=False)
    again.fit(FallingScore(), _loader(), _loader(), ckpt_path=str(ckpts / "last.ckpt"))
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["epoch"] == 3
    assert torch.load(ckpts / "best.ckpt", weights_only=False)["epoch"] == 0
