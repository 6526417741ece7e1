"""Training: AdamW on fp32 master weights, warm-up + cosine learning rate, gradient clipping and accumulation,
evaluation on fixed validation batches, hooks, and exactly resumable safetensors checkpoints.

The optimiser follows the report's pre-training recipe in kind (§4.2: AdamW, beta1 0.9, beta2 0.95, weight decay
0.1, gradient clip 1.0, warm-up then cosine decay), scaled to a CPU: the parameters stay fp32 (the report's master
weights are fp32 too; its AdamW moments are BF16, ours fp32); `precision="bf16"` runs the forward pass under
bfloat16 autocast and `"fp8"` swaps the report's FP8 layers for `FP8Linear` (`dsv3_ref.fp8.linear.convert_to_fp8`).
Weight decay applies to matrices only (every linear layer, the embedding, the output head and the router), not to
the RMSNorm gains, the common practice (GPT-2 / Megatron-LM: no decay on norms and biases; the report does not
say). The gate's correction bias is a buffer, so it is never in the optimiser: the balancing hook moves it.

Hooks (`TrainHook`) add loss terms after every micro-batch's forward, act after every optimiser step, and report
metrics into `Trainer.history`; the load-balancing, MTP and FP8 chapters plug in there.

A checkpoint folder holds `config.json` + `model.safetensors` (`dsv3_ref.save_pretrained`, the hub's format),
`train_state.safetensors` (optimiser moments, the step, the random-number generators' states, the history) and
`train_config.json`. Resuming from it continues exactly as if training had never stopped.
"""

from __future__ import annotations

import json
import os
import random
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..config import ModelConfig
from ..data import CorpusData, TextFileData, TokenData
from ..fp8.linear import convert_to_fp8
from ..io.atomic import write_folder
from ..io.checkpoint import from_pretrained, save_pretrained
from ..nn.model import Transformer
from ..objectives.lm import cross_entropy
from .config import TrainConfig, lr_at

TRAIN_STATE_NAME = "train_state.safetensors"
TRAIN_CONFIG_NAME = "train_config.json"
_STATE_FORMAT = "dsv3_ref.train_state.v1"


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: matrices (dim >= 2) with weight decay, vectors (RMSNorm gains) without. Buffers (the gates'
    correction biases) are not parameters, so they are in neither."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def load_data(spec: str, seed: int = 0) -> TokenData:
    """'corpus' -> the synthetic `CorpusData(seed)`; anything else is the path of a UTF-8 text file."""
    return CorpusData(seed=seed) if spec == "corpus" else TextFileData(spec, seed=seed)


class TrainHook:
    """Base class of trainer plug-ins; every method is a no-op here.

    on_train_start(trainer): once at the start of each `fit`.
    loss_terms(trainer, tokens, targets, hidden, logits) -> {name: scalar tensor}: after each micro-batch's forward
        (tokens, targets (B, T); hidden (B, T, dim) the final-norm hidden states; logits (B, T, vocab)); the terms
        are added to the loss and their means logged under their names. MoE layers' `last_routing` is fresh here.
    after_step(trainer, step): after each optimiser step (not each micro-batch), under no_grad; step = steps done.
    metrics(trainer) -> {name: float}: merged into each `history` entry.
    """

    def on_train_start(self, trainer: Trainer) -> None:
        pass

    def loss_terms(self, trainer: Trainer, tokens: torch.Tensor, targets: torch.Tensor, hidden: torch.Tensor,
                   logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def after_step(self, trainer: Trainer, step: int) -> None:
        pass

    def metrics(self, trainer: Trainer) -> dict[str, float]:
        return {}


class Trainer:
    """Trains `model` with `cfg` on `data` (default: `load_data(cfg.data)`).

    `fit()` runs until `cfg.steps` optimiser steps are done and returns `history`: one dict per logged step
    (every `log_every` steps and at the end) with step, tokens, lr, train_loss (cross-entropy in nats per token,
    averaged over the steps since the last entry), grad_norm, each hook's loss terms, val_loss at evaluation steps,
    and each hook's metrics. `save(dir)` / `resume(dir)` write and read a complete checkpoint.
    """

    def __init__(self, model: Transformer, cfg: TrainConfig, data: TokenData | None = None,
                 hooks: list[TrainHook] | tuple[TrainHook, ...] = (), progress: bool = True):
        self.model, self.cfg, self.hooks, self.progress = model, cfg, list(hooks), progress
        self.data = load_data(cfg.data) if data is None else data
        mcfg = model.config
        if cfg.seq_len > mcfg.max_seq_len:
            raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's max_seq_len={mcfg.max_seq_len}")
        if self.data.vocab_size > mcfg.vocab_size:
            raise ValueError(f"the data has {self.data.vocab_size} token ids but the model's vocab_size is "
                             f"{mcfg.vocab_size}")
        if cfg.precision == "fp8":
            convert_to_fp8(model)
        self.device = next(model.parameters()).device
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                           eps=cfg.eps)
        self.generator = torch.Generator().manual_seed(cfg.seed)  # draws the training windows
        self.val = self.data.val_batches(cfg.eval_batches, cfg.batch_size, cfg.seq_len)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.tokens_per_s = 0.0  # measured by the last fit (not in the history: it is not reproducible)
        self._acc: dict[str, float] = {}  # sums over the steps since the last history entry (+ "_steps")

    # ------------------------------------------------------------------ one step
    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.cfg.seq_len

    def _autocast(self) -> AbstractContextManager:
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def train_step(self) -> dict[str, float]:
        """One optimiser step over grad_accum micro-batches; returns the step's mean losses and grad_norm."""
        cfg = self.cfg
        lr = lr_at(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # one draw for the whole step, so (accum a, batch b) sees the same windows as (accum 1, batch a * b)
        batch = self.data.train_batch(cfg.batch_size * cfg.grad_accum, cfg.seq_len, self.generator)
        out: dict[str, float] = {}
        for micro in batch.split(cfg.grad_accum):
            tokens, targets = micro.inputs.to(self.device), micro.targets.to(self.device)  # (B, T)
            with self._autocast():
                hidden = self.model.hidden_states(tokens)  # (B, T, dim)
                logits = self.model.head(hidden)  # (B, T, vocab)
                terms = {}
                for hook in self.hooks:
                    for name, value in hook.loss_terms(self, tokens, targets, hidden, logits).items():
                        if name in terms or name in ("train_loss", "grad_norm"):
                            raise ValueError(f"loss term name {name!r} is already taken")
                        if not (isinstance(value, torch.Tensor) and value.dim() == 0):
                            raise ValueError(f"loss term {name!r} must be a scalar tensor, got {value!r}")
                        terms[name] = value
            ce = cross_entropy(logits, targets)
            loss = ce + sum(t.float() for t in terms.values())
            (loss / cfg.grad_accum).backward()
            for name, value in {"train_loss": ce, **terms}.items():
                out[name] = out.get(name, 0.0) + value.item() / cfg.grad_accum
        if cfg.grad_clip > 0:
            out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        with torch.no_grad():
            for hook in self.hooks:
                hook.after_step(self, self.step)
        return out

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean cross-entropy (nats per token) over the fixed validation batches."""
        was_training = self.model.training
        self.model.eval()
        total = 0.0
        for batch in self.val:
            with self._autocast():
                logits = self.model(batch.inputs.to(self.device))  # (B, T, vocab)
            total += cross_entropy(logits, batch.targets.to(self.device)).item()
        self.model.train(was_training)
        return total / len(self.val)

    # ------------------------------------------------------------------ the loop
    def fit(self, stop_at: int | None = None, resume_from: str | os.PathLike | None = None,
            out: str | os.PathLike | None = None) -> list[dict[str, float]]:
        """Train until `stop_at` (default cfg.steps) optimiser steps are done, first resuming from a checkpoint
        folder if given; with `out`, save a checkpoint there every `save_every` steps and at the end."""
        if resume_from is not None:
            self.resume(resume_from)
        cfg = self.cfg
        stop = cfg.steps if stop_at is None else stop_at
        if not self.step <= stop <= cfg.steps:
            raise ValueError(f"stop_at must be in [{self.step} (steps done), steps={cfg.steps}], got {stop_at}")
        for hook in self.hooks:
            hook.on_train_start(self)
        self.model.train()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, desc="train", unit="step")
        start, first = time.perf_counter(), self.step
        while self.step < stop:
            for name, value in self.train_step().items():
                self._acc[name] = self._acc.get(name, 0.0) + value
            self._acc["_steps"] = self._acc.get("_steps", 0) + 1
            self.tokens_per_s = (self.step - first) * self.tokens_per_step / (time.perf_counter() - start)
            evaluate = self.step == cfg.steps or (cfg.eval_every > 0 and self.step % cfg.eval_every == 0)
            if evaluate or self.step % cfg.log_every == 0:
                entry = self._log(evaluate)
                bar.set_postfix(loss=f"{entry['train_loss']:.3f}", tok_s=f"{self.tokens_per_s:.0f}")
            if out is not None and cfg.save_every and self.step % cfg.save_every == 0:
                self.save(out)
            bar.update(1)
        bar.close()
        if out is not None:
            self.save(out)
        return self.history

    def _log(self, evaluate: bool) -> dict[str, float]:
        n = self._acc.pop("_steps")
        entry: dict[str, float] = {"step": self.step, "tokens": self.step * self.tokens_per_step,
                                   "lr": lr_at(self.cfg, self.step - 1)}
        entry.update({name: total / n for name, total in self._acc.items()})
        if evaluate:
            entry["val_loss"] = self.evaluate()
        for hook in self.hooks:
            entry.update(hook.metrics(self))
        self._acc = {}
        self.history.append(entry)
        return entry

    # ------------------------------------------------------------------ checkpoints
    def _param_names(self) -> list[str]:
        """Our parameter names in the optimiser's order (its state is keyed by position)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]

    def save(self, path: str | os.PathLike) -> None:
        """Write the checkpoint folder `path` atomically (`io.atomic.write_folder`): if anything fails, a checkpoint
        already at `path` is left as it was."""
        path = os.path.abspath(os.fspath(path))
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"{path} exists and is not a folder: a checkpoint is a folder")
        if os.path.isdir(path) and os.listdir(path) and not os.path.isfile(os.path.join(path, TRAIN_STATE_NAME)):
            raise ValueError(f"{path} exists and is not a training checkpoint: refusing to overwrite it")
        write_folder(path, self._write_checkpoint)

    def _write_checkpoint(self, folder: str) -> None:
        save_pretrained(self.model, folder)
        save_file(self._state_tensors(), os.path.join(folder, TRAIN_STATE_NAME), metadata=self._state_metadata())
        with open(os.path.join(folder, TRAIN_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(self.cfg.to_dict(), f, indent=2)
            f.write("\n")

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"step": torch.tensor(self.step, dtype=torch.int64),
                   "rng.torch": torch.get_rng_state(), "rng.data": self.generator.get_state()}
        state = self.optimizer.state_dict()["state"]
        for i, name in enumerate(self._param_names()):
            for key, value in state.get(i, {}).items():
                tensors[f"optimizer.{name}.{key}"] = value.detach().cpu().contiguous()
        return tensors

    def _state_metadata(self) -> dict[str, str]:
        version, internal, gauss = random.getstate()
        return {"format": _STATE_FORMAT, "model_config": json.dumps(self.model.config.to_dict()),
                "python_random": json.dumps([version, list(internal), gauss]),
                "history": json.dumps(self.history), "log_accumulator": json.dumps(self._acc)}

    def resume(self, path: str | os.PathLike) -> None:
        """Load a checkpoint folder written by `save`: weights, optimiser state, step, history and random states.
        Training then continues exactly as the uninterrupted run would. The model must have the checkpoint's
        config (ValueError naming the differing fields otherwise); a damaged checkpoint raises ValueError."""
        path = os.fspath(path)
        state_file = os.path.join(path, TRAIN_STATE_NAME)
        if not os.path.isfile(state_file):
            raise ValueError(f"{path}: not a training checkpoint (no {TRAIN_STATE_NAME})")
        try:
            with safe_open(state_file, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if meta.get("format") != _STATE_FORMAT:
                raise ValueError(f"format is {meta.get('format')!r}, expected {_STATE_FORMAT!r}")
            saved_cfg = json.loads(meta["model_config"])
            python_random = json.loads(meta["python_random"])
            history, acc = json.loads(meta["history"]), json.loads(meta["log_accumulator"])
            step = int(tensors.pop("step"))
            rng_torch, rng_data = tensors.pop("rng.torch"), tensors.pop("rng.data")
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise ValueError(f"{state_file}: damaged training state ({type(e).__name__}: {e})") from None
        ours = self.model.config.to_dict()
        differ = sorted(k for k in set(ours) | set(saved_cfg) if ours.get(k) != saved_cfg.get(k))
        if differ:
            detail = ", ".join(f"{k}: checkpoint {saved_cfg.get(k)!r}, model {ours.get(k)!r}" for k in differ)
            raise ValueError(f"{path}: the checkpoint was trained with a different model config ({detail})")
        loaded = from_pretrained(path, dtype=self.model.embed.weight.dtype)  # ValueError if damaged
        self.model.load_state_dict(loaded.state_dict())
        names = self._param_names()
        optim_state: dict[int, dict[str, torch.Tensor]] = {}
        for i, name in enumerate(names):
            keys = {k for k in tensors if k.startswith(f"optimizer.{name}.")}
            if keys:
                optim_state[i] = {k[len(f"optimizer.{name}."):]: tensors.pop(k) for k in keys}
        if tensors:
            raise ValueError(f"{state_file}: unexpected tensor(s) {sorted(tensors)[:5]} (a different model?)")
        sd = self.optimizer.state_dict()
        sd["state"] = optim_state
        self.optimizer.load_state_dict(sd)
        self.step, self.history, self._acc = step, history, acc
        torch.set_rng_state(rng_torch)
        self.generator.set_state(rng_data)
        random.setstate((python_random[0], tuple(python_random[1]), python_random[2]))


def read_train_config(path: str | os.PathLike) -> TrainConfig:
    """The `train_config.json` of a checkpoint folder."""
    file = os.path.join(os.fspath(path), TRAIN_CONFIG_NAME)
    try:
        with open(file, encoding="utf-8") as f:
            return TrainConfig.from_dict(json.load(f))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{file}: cannot read the training config ({type(e).__name__}: {e})") from None


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """The exact `ModelConfig` a checkpoint folder was trained with (kept in its training state)."""
    file = os.path.join(os.fspath(path), TRAIN_STATE_NAME)
    try:
        with safe_open(file, framework="pt") as f:
            return ModelConfig.from_dict(json.loads(f.metadata()["model_config"]))
    except Exception as e:
        raise ValueError(f"{file}: cannot read the model config ({type(e).__name__}: {e})") from None
