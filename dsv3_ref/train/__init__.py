"""Training: `TrainConfig` and its presets, the `Trainer` with resumable checkpoints, and the `TrainHook`s that plug
the objectives into it (load balancing, MTP)."""

from .trainer import TRAIN_PRESETS, TrainConfig, Trainer, TrainHook, lr_at

__all__ = ["TRAIN_PRESETS", "TrainConfig", "TrainHook", "Trainer", "lr_at"]
