"""Training: the one loop for pretraining / SFT / distillation (`trainer.py`)."""

from seekling.train.trainer import Muon, TrainConfig, lm_loss, lr_at, make_optimizers, train

__all__ = ["Muon", "TrainConfig", "lm_loss", "lr_at", "make_optimizers", "train"]
