"""Data- and expert-parallel training over `torch.distributed`, launched by torchrun (gloo on CPU, NCCL on CUDA).

Layout: all W ranks are data-parallel; with `expert_parallel` the routed experts of every MoE layer are also split
over the same W ranks (`systems.parallel.ExpertParallelMoE`, E/W experts each, two all-to-alls per layer), while
everything else (attention, dense FFNs, the gates, the shared experts, the MTP module) is replicated.

The global batch is the one-process batch: every rank draws the same `batch_size * grad_accum` windows (the data
generator is seeded alike) and keeps rows [r B/W, (r+1) B/W) of each micro-batch. A rank's loss is the mean over
its rows, so the mean of the ranks' gradients is the one-process gradient: DDP averages the replicated parameters'
gradients; an expert-parallel expert already received the gradients of every rank's tokens through the all-to-all,
summed, so it is divided by W instead (DDP ignores it).

Why DDP and not FSDP2's `fully_shard`: the models trained here fit on one device many times over, so sharding the
parameters and optimizer state buys nothing yet, while DDP keeps plain tensors (no DTensor) for the safetensors
checkpoint, `FP8Linear`, gradient clipping and the teaching code; DDP also runs on gloo. At a scale where the
optimizer state does not fit, FSDP2 is the next step (docs/scaling.md).

The aux-loss-free bias update needs the global batch: `sum_over_ranks` adds up each layer's expert loads over the
ranks (each rank has already summed its micro-batches), so every rank applies the same update once per optimizer
step (`train.hooks.LoadMonitor`). Nothing is broadcast afterwards: the biases stay identical because the inputs are.
"""

from __future__ import annotations

import os
import re
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import ModelConfig
from ..data import Batch
from ..objectives.balance import moe_layers
from ..systems.parallel import ExpertParallelMoE

_EXPERT = re.compile(r"^(.*\.experts\.)(\d+)(\..*)$")


def torchrun_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) in a plain process."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def check_layout(model_cfg: ModelConfig, batch_size: int, world_size: int, expert_parallel: bool) -> None:
    """ValueError for a layout that cannot run: the micro-batch (`batch_size` windows, also the evaluation batch)
    must split evenly over the data-parallel ranks; with expert parallelism the routed experts over the ranks."""
    if batch_size % world_size:
        raise ValueError(f"batch_size ({batch_size}, one micro-batch of the global batch) must be divisible by the "
                         f"data-parallel size ({world_size} processes)")
    if expert_parallel:
        if model_cfg.n_routed_experts == 0 or model_cfg.n_layers <= model_cfg.n_dense_layers:
            raise ValueError("expert parallelism needs a model with MoE layers")
        if model_cfg.n_routed_experts % world_size:
            raise ValueError(f"n_routed_experts ({model_cfg.n_routed_experts}) must be divisible by the "
                             f"expert-parallel size ({world_size} processes)")


@dataclass
class Parallel:
    """This process's place in the job: `rank` of `world_size` data-parallel ranks; with `expert_parallel`, the
    routed experts are split over the same ranks (the all-to-alls run on their own process group `ep_group`)."""

    rank: int
    world_size: int
    expert_parallel: bool = False
    ep_group: dist.ProcessGroup | None = field(default=None, repr=False)
    n_local: int = 0  # routed experts per rank and MoE layer (set by `prepare` with expert parallelism)

    @classmethod
    def init(cls, device: torch.device, expert_parallel: bool = False) -> Parallel:
        """Join the torchrun job (initialising the default process group if needed: NCCL for CUDA, else gloo)."""
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # the all-to-alls get their own group, so that they never interleave with DDP's all-reduces
        ep_group = dist.new_group() if expert_parallel else None
        return cls(dist.get_rank(), dist.get_world_size(), expert_parallel, ep_group)

    # ------------------------------------------------------------------ the model
    def prepare(self, model: nn.Module) -> None:
        """In place: with expert parallelism, each MoE layer becomes this rank's `ExpertParallelMoE` share."""
        if not self.expert_parallel:
            return
        for name, moe in moe_layers(model).items():
            parent, _, attr = name.rpartition(".")
            local = ExpertParallelMoE.from_moe(moe, self.ep_group)
            setattr(model.get_submodule(parent), attr, local)
            self.n_local = local.n_local

    def is_expert(self, name: str) -> bool:
        """Whether `name` names a routed expert's tensor under expert parallelism (False without it): in this
        rank's model, one of its own experts (not replicated)."""
        return self.expert_parallel and _EXPERT.match(name) is not None

    def global_name(self, name: str, rank: int | None = None) -> str:
        """The single-process name of a parameter: expert-parallel experts renumbered by their owner `rank`."""
        match = _EXPERT.match(name) if self.expert_parallel else None
        if match is None:
            return name
        n_local = self.n_local
        owner = self.rank if rank is None else rank
        return f"{match.group(1)}{owner * n_local + int(match.group(2))}{match.group(3)}"

    def wrap(self, step: nn.Module, model: nn.Module) -> DistributedDataParallel:
        """DDP over `step` (a module holding `model` as `step.model`), ignoring the expert-parallel experts."""
        ignore = [f"model.{n}" for n, _ in model.named_parameters() if self.is_expert(n)]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step, ignore)
        # experts idle on a rank get no gradient there: find_unused_parameters lets DDP complete the reduction;
        # buffers (the gates' biases) are synced once at construction, never after: every rank computes the same
        # update itself
        return DistributedDataParallel(step, find_unused_parameters=True, forward_sync_buffers=False)

    def finish_gradients(self, model: nn.Module) -> None:
        """After the step's last backward: an expert-parallel expert's gradient is the sum over the ranks' losses;
        divide it by W to make it the gradient of their mean, as for the DDP-averaged parameters."""
        for name, p in model.named_parameters():
            if p.grad is not None and self.is_expert(name):
                p.grad.div_(self.world_size)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """`torch.nn.utils.clip_grad_norm_` over the whole model, the experts living on every rank: the norm of the
        replicated gradients (equal on every rank) combined with the experts' summed over the ranks."""
        params = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
        if not self.expert_parallel:
            return torch.nn.utils.clip_grad_norm_([p for _, p in params], max_norm)
        replicated = torch.nn.utils.get_total_norm([p.grad for n, p in params if not self.is_expert(n)])
        experts = [p.grad for n, p in params if self.is_expert(n)]
        local = torch.nn.utils.get_total_norm(experts) if experts else replicated.new_zeros(())
        squares = local.square()
        dist.all_reduce(squares)
        total = (replicated.square() + squares).sqrt()
        torch.nn.utils.clip_grads_with_norm_([p for _, p in params], max_norm, total)
        return total

    def no_sync(self, ddp: DistributedDataParallel, last: bool) -> AbstractContextManager:
        """DDP reduces the gradients once per optimizer step, after its last micro-batch."""
        return nullcontext() if last else ddp.no_sync()

    # ------------------------------------------------------------------ data and statistics
    def shard(self, batch: Batch) -> Batch:
        """This rank's rows of a (micro-)batch that every rank drew alike."""
        return batch.split(self.world_size)[self.rank]

    def sum_over_ranks(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each tensor summed over the ranks (one all-reduce; every rank must pass the same names and shapes)."""
        if not tensors:
            return {}
        names = sorted(tensors)
        flat = torch.cat([tensors[n].flatten().double() for n in names])
        dist.all_reduce(flat)
        out = {}
        for n, part in zip(names, flat.split([tensors[n].numel() for n in names]), strict=True):
            out[n] = part.view_as(tensors[n]).to(tensors[n].dtype)
        return out

    def mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Each float averaged over the ranks."""
        summed = self.sum_over_ranks({k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()})
        return {k: float(summed[k]) / self.world_size for k in values}

    # ------------------------------------------------------------------ checkpoints
    def gather(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's tensors by name (experts under their local index, as its model names them) -> every rank's,
        the experts renamed to their single-process index. A collective (every rank calls it); the replicated
        tensors are this rank's. CPU tensors: `all_gather_object` sends them whole (a rank's experts may lack
        optimizer moments another's have, when they never received a token)."""
        mine = {self.global_name(k): v for k, v in tensors.items() if self.is_expert(k)}
        every: list[dict[str, torch.Tensor]] = [{} for _ in range(self.world_size)]
        dist.all_gather_object(every, mine)
        out = {k: v for k, v in tensors.items() if not self.is_expert(k)}
        for part in every:
            out.update(part)
        return out

    def barrier(self) -> None:
        dist.barrier()


class MicroStep(nn.Module):
    """The trainer's forward of one micro-batch as a module (tokens, targets -> loss, logged terms), so that DDP
    wraps it: the trainer runs `hidden_states`, `head` and its hooks' loss terms, not `Transformer.forward`."""

    def __init__(self, model: nn.Module, forward):
        super().__init__()
        self.model = model
        self._forward = forward

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor):
        return self._forward(tokens, targets)
