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
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..config import ModelConfig
from ..data import CorpusData, TextFileData, TokenData
from ..fp8.linear import convert_to_fp8
from ..io.atomic import recover_folder, write_folder
from ..io.checkpoint import from_pretrained, write_pretrained
from ..nn.model import Transformer
from ..objectives.lm import cross_entropy
from .config import TrainConfig, lr_at
from .distributed import MicroStep, Parallel, check_layout

TRAIN_STATE_NAME = "train_state.safetensors"
TRAIN_CONFIG_NAME = "train_config.json"
_STATE_FORMAT = "dsv3_ref.train_state.v1"
PROGRESS_INTERVAL = 1.0  # seconds between two refreshes of the progress bar (see fit)


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

    With `parallel` (a torchrun job, `train.distributed.Parallel`), every rank trains on its share of the same global
    batch; the history, the checkpoints and the balancing biases are those of one process on that batch; only rank
    0 shows progress and writes checkpoints.
    """

    def __init__(self, model: Transformer, cfg: TrainConfig, data: TokenData | None = None,
                 hooks: list[TrainHook] | tuple[TrainHook, ...] = (), progress: bool = True,
                 parallel: Parallel | None = None):
        self.model, self.cfg, self.hooks, self.parallel = model, cfg, list(hooks), parallel
        self.progress = progress and (parallel is None or parallel.rank == 0)
        self.data = load_data(cfg.data) if data is None else data
        mcfg = model.config
        if cfg.seq_len > mcfg.max_seq_len:
            raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's max_seq_len={mcfg.max_seq_len}")
        if self.data.vocab_size > mcfg.vocab_size:
            raise ValueError(f"the data has {self.data.vocab_size} token ids but the model's vocab_size is "
                             f"{mcfg.vocab_size}")
        if parallel is not None:
            check_layout(mcfg, cfg.batch_size, parallel.world_size, parallel.expert_parallel)
            parallel.prepare(model)
        if cfg.precision == "fp8":
            convert_to_fp8(model, gemm=cfg.fp8_gemm)
        self.device = next(model.parameters()).device
        self._ddp = None if parallel is None else parallel.wrap(MicroStep(model, self._micro_forward), model)
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

    def _micro_forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """One micro-batch's forward: (loss to minimise, {"train_loss": cross-entropy, hook terms...})."""
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
        return ce + sum(t.float() for t in terms.values()), {"train_loss": ce, **terms}

    def train_step(self) -> dict[str, float]:
        """One optimiser step over grad_accum micro-batches; returns the step's mean losses and grad_norm."""
        cfg, par = self.cfg, self.parallel
        lr = lr_at(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # one draw for the whole step, so (accum a, batch b) sees the same windows as (accum 1, batch a * b)
        batch = self.data.train_batch(cfg.batch_size * cfg.grad_accum, cfg.seq_len, self.generator)
        out: dict[str, float] = {}
        for i, micro in enumerate(batch.split(cfg.grad_accum)):
            if par is not None:
                micro = par.shard(micro)  # this rank's rows
            tokens, targets = micro.inputs.to(self.device), micro.targets.to(self.device)  # (B, T)
            sync = nullcontext() if par is None else par.no_sync(self._ddp, last=i == cfg.grad_accum - 1)
            with sync:
                loss, logged = (self._micro_forward if par is None else self._ddp)(tokens, targets)
                if not torch.isfinite(loss):
                    raise ValueError(f"step {self.step + 1}: the loss is {loss.item()} (train_loss "
                                     f"{logged['train_loss'].item()}); training stopped, the last checkpoint saved is "
                                     "kept (is lr too large?)")
                (loss / cfg.grad_accum).backward()
            for name, value in logged.items():
                out[name] = out.get(name, 0.0) + value.item() / cfg.grad_accum
        if par is not None:
            par.finish_gradients(self.model)
            out = par.mean_over_ranks(out)
        if cfg.grad_clip > 0:
            params = self.model.parameters()
            norm = (torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if par is None
                    else par.clip_grad_norm_(self.model, cfg.grad_clip))
            out["grad_norm"] = float(norm)
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
            if self.parallel is not None:
                batch = self.parallel.shard(batch)
            with self._autocast():
                logits = self.model(batch.inputs.to(self.device))  # (B, T, vocab)
            total += cross_entropy(logits, batch.targets.to(self.device)).item()
        self.model.train(was_training)
        if self.parallel is not None:
            total = self.parallel.mean_over_ranks({"val": total})["val"]
        return total / len(self.val)

    def sum_over_ranks(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each tensor summed over the data-parallel ranks (unchanged in one process): hooks use it to see the
        global batch."""
        return tensors if self.parallel is None else self.parallel.sum_over_ranks(tensors)

    def mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Each float averaged over the data-parallel ranks (unchanged in one process)."""
        return values if self.parallel is None else self.parallel.mean_over_ranks(values)

    # ------------------------------------------------------------------ the loop
    def fit(self, stop_at: int | None = None, resume_from: str | os.PathLike | None = None,
            out: str | os.PathLike | None = None) -> list[dict[str, float]]:
        """Train until `stop_at` (default cfg.steps) optimiser steps are done, first resuming from a checkpoint
        folder if given; with `out`, save a checkpoint there every `save_every` steps and at the end."""
        if out is not None:
            check_out_folder(out)  # before the first step, so that no work is lost to a bad path
        if resume_from is not None:
            self.resume(resume_from)
        cfg = self.cfg
        stop = cfg.steps if stop_at is None else stop_at
        if not self.step <= stop <= cfg.steps:
            raise ValueError(f"stop_at must be in [{self.step} (steps done), steps={cfg.steps}], got {stop_at}")
        for hook in self.hooks:
            hook.on_train_start(self)
        self.model.train()
        # At most one refresh per PROGRESS_INTERVAL seconds: in Jupyter each refresh of the widget bar is three
        # messages to the front end, and a cell that sends thousands of them while its client is not reading (nbval
        # waits for the cell's reply first) overflows the message queue, which then drops the kernel's final
        # "idle" message: seen in CI as "Timeout of 5 seconds exceeded waiting for output".
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, desc="train", unit="step",
                   mininterval=PROGRESS_INTERVAL)
        start, first = time.perf_counter(), self.step
        while self.step < stop:
            for name, value in self.train_step().items():
                self._acc[name] = self._acc.get(name, 0.0) + value
            self._acc["_steps"] = self._acc.get("_steps", 0) + 1
            self.tokens_per_s = (self.step - first) * self.tokens_per_step / (time.perf_counter() - start)
            evaluate = self.step == cfg.steps or (cfg.eval_every > 0 and self.step % cfg.eval_every == 0)
            if evaluate or self.step % cfg.log_every == 0:
                entry = self._log(evaluate)
                bar.set_postfix(loss=f"{entry['train_loss']:.3f}", tok_s=f"{self.tokens_per_s:.0f}", refresh=False)
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
        """Write the checkpoint folder `path` crash-safely (`io.atomic.write_folder`): if anything fails, or the
        process is killed, a checkpoint already at `path` is left as it was, or the next load finds the new one.
        In a torchrun job every rank gathers (expert-parallel experts, their moments) and rank 0 writes."""
        bad = [name for name, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise ValueError(f"step {self.step}: non-finite weights in {bad[:5]}; not saved, the last checkpoint "
                             "saved is kept (is lr too large?)")
        model, state = self._full_model(), self._state_tensors()
        if self.parallel is None or self.parallel.rank == 0:
            write = lambda folder: self._write_checkpoint(folder, model, state)  # noqa: E731
            _recovered(write_folder(check_out_folder(path), write))
        if self.parallel is not None:
            self.parallel.barrier()

    def _write_checkpoint(self, folder: str, model: Transformer, state: dict[str, torch.Tensor]) -> None:
        write_pretrained(model, folder)
        save_file(state, os.path.join(folder, TRAIN_STATE_NAME), metadata=self._state_metadata())
        with open(os.path.join(folder, TRAIN_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(self.cfg.to_dict(), f, indent=2)
            f.write("\n")

    def _full_model(self) -> Transformer | None:
        """The model as one process holds it: with expert parallelism, a copy with every rank's experts, on rank 0
        (None on the others). The same hub-format checkpoint for any number of processes."""
        par = self.parallel
        if par is None or not par.expert_parallel:
            return self.model
        state = par.gather({k: v.detach().cpu() for k, v in self.model.state_dict().items()})
        if par.rank != 0:
            return None
        full = Transformer(self.model.config)
        full.load_state_dict(state)
        return full

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"step": torch.tensor(self.step, dtype=torch.int64),
                   "rng.torch": torch.get_rng_state(), "rng.data": self.generator.get_state()}
        state = self.optimizer.state_dict()["state"]
        moments = {}
        for i, name in enumerate(self._param_names()):
            for key, value in state.get(i, {}).items():
                moments[f"optimizer.{name}.{key}"] = value.detach().cpu().contiguous()
        if self.parallel is not None and self.parallel.expert_parallel:
            moments = self.parallel.gather(moments)  # every rank's experts, under their single-process names
        return {**tensors, **moments}

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
        _recovered(recover_folder(path))
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
            step_t, rng_torch, rng_data = tensors.pop("step"), tensors.pop("rng.torch"), tensors.pop("rng.data")
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise ValueError(f"{state_file}: damaged training state ({type(e).__name__}: {e})") from None
        if not isinstance(saved_cfg, dict):
            raise ValueError(f"{state_file}: model_config must be an object of ModelConfig fields, got "
                             f"{type(saved_cfg).__name__}")
        step = self._check_state(state_file, step_t, history, acc, rng_torch, rng_data)
        python_random = _python_random_state(state_file, python_random)
        ours = self.model.config.to_dict()
        differ = sorted(k for k in set(ours) | set(saved_cfg) if ours.get(k) != saved_cfg.get(k))
        if differ:
            detail = ", ".join(f"{k}: checkpoint {saved_cfg.get(k)!r}, model {ours.get(k)!r}" for k in differ)
            raise ValueError(f"{path}: the checkpoint was trained with a different model config ({detail})")
        loaded = from_pretrained(path, dtype=self.model.embed.weight.dtype).state_dict()  # ValueError if damaged
        par = self.parallel
        to_global = (lambda n: n) if par is None else par.global_name  # expert parallel: this rank's experts
        self.model.load_state_dict({name: loaded[to_global(name)] for name in self.model.state_dict()})
        sd = self.optimizer.state_dict()
        sd["state"] = self._optimizer_state(state_file, tensors, to_global)
        self.optimizer.load_state_dict(sd)
        self.step, self.history, self._acc = step, history, acc
        torch.set_rng_state(rng_torch)
        self.generator.set_state(rng_data)
        random.setstate(python_random)

    def _check_state(self, state_file: str, step: torch.Tensor, history: Any, acc: Any, rng_torch: torch.Tensor,
                     rng_data: torch.Tensor) -> int:
        """The step, after checking every field of a training state (ValueError naming the file and the field)."""
        def bad(field: str, what: str) -> ValueError:
            return ValueError(f"{state_file}: {field} {what}")

        if step.dim() != 0 or step.dtype != torch.int64 or int(step) < 0:
            raise bad("step", f"must be a non-negative int64 scalar, got {step.tolist()!r} ({step.dtype})")
        if not (isinstance(history, list) and all(isinstance(h, dict) for h in history)):
            raise bad("history", f"must be a list of objects, got {type(history).__name__}")
        if not (isinstance(acc, dict) and all(isinstance(v, (int, float)) for v in acc.values())):
            raise bad("log_accumulator", f"must be an object of numbers, got {type(acc).__name__}")
        for field, got, want in (("rng.torch", rng_torch, torch.get_rng_state()),
                                 ("rng.data", rng_data, self.generator.get_state())):
            if got.dtype != want.dtype or got.shape != want.shape:
                raise bad(field, f"must be a {want.dtype} tensor of shape {tuple(want.shape)}, got {got.dtype} "
                                 f"{tuple(got.shape)}")
        return int(step)

    def _optimizer_state(self, state_file: str, tensors: dict[str, torch.Tensor],
                         to_global: Callable[[str], str]) -> dict[int, dict[str, Any]]:
        """AdamW's state by parameter position from the `optimizer.{global name}.{key}` tensors: each parameter has
        all of step (a scalar), exp_avg and exp_avg_sq (its shape), or none of them (before the first step). Under
        expert parallelism the other ranks' experts' moments are skipped."""
        params = dict(self.model.named_parameters())
        state: dict[int, dict[str, torch.Tensor]] = {}
        for i, name in enumerate(self._param_names()):
            prefix = f"optimizer.{to_global(name)}."
            found = {k[len(prefix):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}
            if not found:
                continue
            p = params[name]
            want = {"step": ((), torch.float32), "exp_avg": (tuple(p.shape), p.dtype),
                    "exp_avg_sq": (tuple(p.shape), p.dtype)}
            got = {k: (tuple(t.shape), t.dtype) for k, t in found.items()}
            if got != want or not float(found["step"]) >= 0:
                raise ValueError(f"{state_file}: optimizer state of {name} must be {want} (key: shape, dtype) with "
                                 f"step >= 0, got {got}")
            state[i] = found
        if self.parallel is not None:
            tensors = {k: v for k, v in tensors.items() if not self.parallel.is_expert(k)}
        if tensors:
            raise ValueError(f"{state_file}: unexpected tensor(s) {sorted(tensors)[:5]} (a different model?)")
        return state


def _python_random_state(state_file: str, saved: Any) -> tuple:
    """The `random.setstate` tuple from its JSON form [version, [625 ints], gauss]; ValueError if it is not one."""
    probe = random.Random()
    try:
        version, internal, gauss = saved
        state = (version, tuple(internal), gauss)
        probe.setstate(state)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{state_file}: python_random is not a saved random state ({type(e).__name__}: {e})"
                         ) from None
    return state


def _recovered(message: str | None) -> None:
    """Say that an interrupted save was finished or undone (`io.atomic.recover_folder`)."""
    if message is not None:
        warnings.warn(message, stacklevel=3)


def check_out_folder(path: str | os.PathLike) -> str:
    """The absolute path a checkpoint will be saved to, checked before any training: ValueError if it is a file, a
    non-empty folder that is not a training checkpoint (never overwritten), or in a folder this process cannot
    write into. A symlink is followed: the folder it points to is the checkpoint, replaced on each save, and the link
    keeps pointing to it."""
    path = os.path.realpath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out {path} exists and is not a folder: a checkpoint is a folder")
    if os.path.isdir(path) and os.listdir(path) and not os.path.isfile(os.path.join(path, TRAIN_STATE_NAME)):
        raise ValueError(f"--out {path} exists and is not a training checkpoint (no {TRAIN_STATE_NAME}): refusing "
                         "to overwrite it")
    parent = os.path.dirname(path)
    while not os.path.exists(parent):  # the nearest folder that exists: the save creates the rest
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--out {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path}: no permission to write in {parent}")
    return path


def read_train_config(path: str | os.PathLike) -> TrainConfig:
    """The `train_config.json` of a checkpoint folder."""
    _recovered(recover_folder(path))
    file = os.path.join(os.fspath(path), TRAIN_CONFIG_NAME)
    try:
        with open(file, encoding="utf-8") as f:
            return TrainConfig.from_dict(json.load(f))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{file}: cannot read the training config ({type(e).__name__}: {e})") from None


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """The exact `ModelConfig` a checkpoint folder was trained with (kept in its training state)."""
    _recovered(recover_folder(path))
    file = os.path.join(os.fspath(path), TRAIN_STATE_NAME)
    try:
        with safe_open(file, framework="pt") as f:
            return ModelConfig.from_dict(json.loads(f.metadata()["model_config"]))
    except Exception as e:
        raise ValueError(f"{file}: cannot read the model config ({type(e).__name__}: {e})") from None
