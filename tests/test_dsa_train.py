"""The two training stages of DeepSeek-V3.2-Exp as trainer hooks: the dense warm-up trains the indexers and nothing
else and leaves the model trainable; the sparse stage trains everything; a sparse Trainer built on a frozen model is
refused."""

import pytest
import torch

from dsv3_ref import ModelConfig, Transformer
from dsv3_ref.train import TrainConfig, Trainer
from dsv3_ref.train.dsa import IndexerWarmup, SparseTraining, set_sparse

CFG = ModelConfig.from_preset("tiny", index_n_heads=4, index_head_dim=16, index_topk=8, max_seq_len=64,
                              original_seq_len=64)
RUN = dict(batch_size=4, seq_len=64, eval_batches=1, log_every=5, eval_every=5, warmup_steps=2)


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(CFG)


def test_warmup_trains_only_the_indexers_and_learns():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    history = Trainer(model, TrainConfig(steps=20, lr=3e-3, **RUN), hooks=[IndexerWarmup()], progress=False).fit()
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (".indexer." in name), name
        assert p.requires_grad, f"{name} still frozen after the warm-up"
    assert all(not layer.attn.sparse for layer in model.layers)
    kl = [e["indexer_kl"] for e in history]
    assert kl[-1] < 0.7 * kl[0], kl
    assert {"indexer_recall", "indexer_chance", "indexer_mass"} <= set(history[-1])


def test_sparse_stage_trains_everything():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    history = Trainer(model, TrainConfig(steps=3, lr=1e-3, **RUN), hooks=[SparseTraining()], progress=False).fit()
    assert all(layer.attn.sparse for layer in model.layers)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert "indexer_kl" in history[-1]


def test_a_sparse_trainer_built_on_a_frozen_model_is_refused():
    model = _model()
    for name, p in model.named_parameters():
        p.requires_grad_(".indexer." in name)
    trainer = Trainer(model, TrainConfig(steps=2, **RUN), hooks=[SparseTraining()], progress=False)
    with pytest.raises(ValueError, match="optimizer does not hold"):
        trainer.fit()


def test_set_sparse_needs_an_indexer():
    assert set_sparse(_model(), False) == CFG.n_layers
    with pytest.raises(ValueError, match="no lightning indexer"):
        set_sparse(Transformer(ModelConfig.from_preset("tiny")), True)
