"""Training: the one Loop (`scaffold.py`: resume, schedule, stops, logging, eval and save; devices, DDP / FSDP2 /
expert parallelism, checkpoints, signals) and the jobs that supply its step: pretraining / SFT / distillation
(`trainer.py`) and GRPO (`grpo.py`)."""

from seekling.train.scaffold import Loop, lr_at
from seekling.train.trainer import Muon, TrainConfig, lm_loss, make_optimizers, train

__all__ = ["Loop", "Muon", "TrainConfig", "lm_loss", "lr_at", "make_optimizers", "train"]
