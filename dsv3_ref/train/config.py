"""Training hyper-parameters (report §4.2's recipe in kind, scaled to a CPU): `TrainConfig`, the per-preset
defaults `TRAIN_PRESETS` and the warm-up + cosine learning-rate schedule `lr_at`."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

from ..config import from_fields, require

PRECISIONS = ("fp32", "bf16", "fp8")


@dataclass
class TrainConfig:
    """Hyper-parameters of a training run. `batch_size` is per micro-batch: one optimiser step sees
    batch_size * grad_accum windows of seq_len tokens. `steps` counts optimiser steps; the learning rate warms up
    linearly for `warmup_steps`, then follows a cosine from `lr` down to `min_lr` at `steps`. `eval_every` = 0
    evaluates only at the end. `data` is what `Trainer` trains on when given no data object: "corpus" (the
    synthetic corpus) or the path of a UTF-8 text file."""

    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum: int = 1
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 10
    save_every: int = 0
    seed: int = 0
    precision: str = "fp32"
    data: str = "corpus"

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.validate()

    def validate(self) -> None:
        """ValueError naming the field and its allowed values for every impossible setting."""
        need = functools.partial(require, owner="TrainConfig")
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_every"):
            need(is_int(getattr(self, name)) and getattr(self, name) >= 1,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            need(is_int(getattr(self, name)) and getattr(self, name) >= 0,
                 f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        need(isinstance(self.lr, (int, float)) and self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        need(isinstance(self.min_lr, (int, float)) and 0 <= self.min_lr <= self.lr,
             f"min_lr must be in [0, lr={self.lr}], got {self.min_lr!r}")
        for name in ("weight_decay", "grad_clip"):
            need(isinstance(getattr(self, name), (int, float)) and getattr(self, name) >= 0,
                 f"{name} must be >= 0 (grad_clip 0 = no clipping), got {getattr(self, name)!r}")
        need(isinstance(self.eps, (int, float)) and self.eps > 0, f"eps must be > 0, got {self.eps!r}")
        need(len(self.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas),
             f"betas must be two numbers in [0, 1), got {self.betas!r}")
        need(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        need(isinstance(self.data, str) and bool(self.data),
             f"data must be 'corpus' or the path of a text file, got {self.data!r}")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return from_fields(cls, d)

    @classmethod
    def for_preset(cls, name: str, **overrides: Any) -> TrainConfig:
        """The defaults tuned for a model preset ('tiny' or 'small'), with optional overrides."""
        key = str(name).lower()
        if key not in TRAIN_PRESETS:
            raise ValueError(f"no training defaults for preset {name!r}; allowed presets are {list(TRAIN_PRESETS)}")
        return cls(**{**TRAIN_PRESETS[key], **overrides})


# Tuned on 2 CPU threads. tiny: unit tests and quick demos. small: the loss falls visibly in about two minutes.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(steps=100, batch_size=8, seq_len=64, lr=3e-3, min_lr=3e-4, warmup_steps=10, eval_every=25),
    "small": dict(steps=500, batch_size=16, seq_len=128, lr=3e-3, min_lr=3e-4, warmup_steps=30, eval_every=50),
}


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimiser step `step` (0-based): linear warm-up over warmup_steps to lr, then a cosine from
    lr to min_lr reached at step = steps - 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - 1 - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
