"""Training: `TrainConfig` and its presets (`config`), the `Trainer` with resumable checkpoints (`trainer`), and the
`TrainHook`s that plug the objectives into it (`hooks`: load balancing, MTP)."""

from .config import PRECISIONS, TRAIN_PRESETS, TrainConfig, lr_at
from .hooks import ExpertAuxLoss, LoadMonitor, LossFreeBalancing, MTPLoss, SequenceBalanceLoss
from .trainer import Trainer, TrainHook

__all__ = ["PRECISIONS", "TRAIN_PRESETS", "ExpertAuxLoss", "LoadMonitor", "LossFreeBalancing", "MTPLoss",
           "SequenceBalanceLoss", "TrainConfig", "TrainHook", "Trainer", "lr_at"]
