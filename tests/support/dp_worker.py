"""Worker launched by tests/test_distributed.py with `torchrun --nproc-per-node 2` (gloo, CPU).

Trains the test's tiny setup (`setup()`, shared with the one-process reference) data-parallel (DP=2) and data +
expert parallel (DP=2, EP=2), checkpointing at step 2 and at the end; trains DP=2 to step 2 a second time
(determinism);
resumes the one-process checkpoint of step 2 (argv[2]) in DP=2 and in DP=2+EP=2. Records, per rank, the history,
every gate bias after each step, and after step 1 the bias each rank WOULD get from its own loads alone. Writes the
checkpoints and `rank{r}.json` into argv[1].
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from dsv3_ref.config import ModelConfig
from dsv3_ref.data import CorpusData, TokenData
from dsv3_ref.nn.model import Transformer
from dsv3_ref.objectives.balance import moe_layers, update_bias
from dsv3_ref.train import LossFreeBalancing, MTPLoss, SequenceBalanceLoss, TrainConfig, Trainer
from dsv3_ref.train.distributed import Parallel

GAMMA = 0.01  # large enough to move the biases visibly in 4 steps


def setup(parallel: Parallel | None = None, data: TokenData | None = None) -> Trainer:
    """The test's run: tiny preset with one MTP module, 4 steps of 2 micro-batches of 4 x 32 tokens, loss-free
    balancing, the sequence-wise loss and MTP (data: the synthetic corpus, built if not given)."""
    cfg = TrainConfig.for_preset("tiny", steps=4, batch_size=4, seq_len=32, grad_accum=2, warmup_steps=1,
                                 eval_every=2, eval_batches=1, log_every=1)
    model = Transformer(ModelConfig.from_preset("tiny", n_mtp_layers=1))
    model.reset_parameters(0)
    hooks = [MTPLoss(lam=0.3), BiasRecorder(GAMMA), SequenceBalanceLoss(alpha=1e-2)]
    return Trainer(model, cfg, data=data, hooks=hooks, progress=False, parallel=parallel)


class BiasRecorder(LossFreeBalancing):
    """LossFreeBalancing that records the biases after every step and, at step 1, the per-rank counterfactual."""

    def __init__(self, gamma: float):
        super().__init__(gamma)
        self.biases: list[dict[str, list[float]]] = []
        self.per_rank: dict[str, list[float]] = {}

    def after_step(self, trainer, step: int) -> None:
        layers = moe_layers(trainer.model)
        if step == 1:  # what a per-rank update (this rank's loads only) would give
            for name, load in self.loads.items():
                bias = layers[name].gate.bias.clone()
                update_bias(bias, load, self.current_gamma(step * trainer.tokens_per_step), self.rule)
                self.per_rank[name] = bias.tolist()
        super().after_step(trainer, step)
        self.biases.append({name: moe.gate.bias.tolist() for name, moe in layers.items()})


def run(par: Parallel, data: TokenData, out: str, name: str, resume: str | None = None, steps: int = 4) -> dict:
    trainer = setup(par, data)
    if resume is None:
        trainer.fit(stop_at=2, out=os.path.join(out, f"{name}_2"))
    if steps == 4:
        trainer.fit(resume_from=resume, out=os.path.join(out, f"{name}_4"))
    recorder = trainer.hooks[1]
    return {"history": trainer.history, "biases": recorder.biases, "per_rank": recorder.per_rank}


def main(out: str, reference_2: str) -> None:
    torch.set_num_threads(1)
    dp = Parallel.init(torch.device("cpu"))
    ep = Parallel.init(torch.device("cpu"), expert_parallel=True)
    data = CorpusData(seed=0)
    result = {"world": dp.world_size, "runs": {
        "dp": run(dp, data, out, "dp"),
        "dp_again": run(dp, data, out, "dp_again", steps=2),
        "ep": run(ep, data, out, "ep"),
        "dp_resumed": run(dp, data, out, "dp_resumed", resume=reference_2),
        "ep_resumed": run(ep, data, out, "ep_resumed", resume=reference_2),
    }}
    with open(os.path.join(out, f"rank{dp.rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
