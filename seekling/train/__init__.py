"""Training: the one loop for pretraining / SFT / distillation (`trainer.py`), GRPO (`grpo.py`), and the
scaffold both stand on (`scaffold.py`: devices, DDP / FSDP2 / expert parallelism, checkpoints, signals)."""

from seekling.train.trainer import Muon, TrainConfig, lm_loss, lr_at, make_optimizers, train

__all__ = ["Muon", "TrainConfig", "lm_loss", "lr_at", "make_optimizers", "train"]
