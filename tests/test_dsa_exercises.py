"""The sparse-attention exercise checkers (notebook 70): the package's own functions and from-scratch solutions pass,
and each classic mistake, written the way a student would write it, gets its diagnosis."""

import json
import math
from pathlib import Path

import pytest
import torch

from dsv3_ref.nn import indexer
from dsv3_ref.nn.rope import apply_rotary_emb
from dsv3_ref.objectives import indexer as indexer_objective
from dsv3_ref.teaching import exercises
from dsv3_ref.teaching.exercises import CheckResult

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "70_sparse_attention.ipynb"


def _fails_with(result: CheckResult, *fragments: str) -> None:
    assert not result.passed, f"expected a failure, got {result}"
    for fragment in fragments:
        assert fragment in result.message, f"{fragment!r} not in {result.message!r}"


def _passes(result: CheckResult) -> None:
    assert result.passed, str(result)


# ---------------------------------------------------------------------------------------------- the index scores
def _scores(idx, x, qr, freqs_cis, mask, interleaved=False, rope_last=False, act="relu", norm=True, scales=True):
    """A from-scratch indexer with the mistakes as switches."""
    B, S, _ = x.shape
    H, d, r = idx.n_heads, idx.head_dim, idx.rope_head_dim

    def rope(t):
        if rope_last:
            return torch.cat([t[..., :d - r], apply_rotary_emb(t[..., d - r:], freqs_cis, interleaved=False)], -1)
        return torch.cat([apply_rotary_emb(t[..., :r], freqs_cis, interleaved=interleaved), t[..., r:]], -1)

    q = rope((qr @ idx.wq_b.weight.T).view(B, S, H, d))
    k = x @ idx.wk.weight.T
    if norm:
        k = torch.nn.functional.layer_norm(k, (d,), idx.k_norm.weight, idx.k_norm.bias, 1e-6)
    k = rope(k)
    w = x @ idx.weights_proj.weight.T
    if scales:
        w = w * H**-0.5 * d**-0.5
    logits = torch.einsum("bshd,btd->bsht", q, k)
    logits = logits.relu() if act == "relu" else logits.softmax(-1) if act == "softmax" else logits
    out = torch.einsum("bsht,bsh->bst", logits, w)
    return out if mask is None else out + mask


def test_index_scores_pass():
    _passes(exercises.check_indexer_scores(lambda idx, x, qr, f, m: idx(x, qr, f, m)))
    _passes(exercises.check_indexer_scores(_scores))


@pytest.mark.parametrize("mistake, fragment", [
    (dict(interleaved=True), "half-split"),
    (dict(rope_last=True), "rotary part comes FIRST"),
    (dict(act="softmax"), "softmax instead of ReLU"),
    (dict(act="none"), "no ReLU"),
    (dict(norm=False), "k_norm"),
    (dict(scales=False), "both H^-0.5 and d^-0.5"),
])
def test_index_score_mistakes(mistake, fragment):
    _fails_with(exercises.check_indexer_scores(lambda *a: _scores(*a, **mistake)), fragment)


def test_index_scores_without_the_causal_mask():
    _fails_with(exercises.check_indexer_scores(lambda idx, x, qr, f, m: _scores(idx, x, qr, f, None)),
                "add the causal mask")


# ---------------------------------------------------------------------------------------------- the top-k mask
def _topk_mask(scores, topk, mask, causal_again=True, largest=True, clamp=True, as_bool=False):
    T = scores.shape[-1]
    k = min(topk, T) if clamp else topk
    idx = scores.topk(k, dim=-1, largest=largest).indices
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)
    if causal_again and mask is not None:
        keep &= torch.isfinite(mask)
    if as_bool:
        return keep
    return torch.zeros_like(scores).masked_fill(~keep, float("-inf"))


def test_topk_mask_passes():
    _passes(exercises.check_topk_mask(lambda s, k, m: indexer.sparse_mask(indexer.topk_indices(s, k), s.shape[-1], m)))
    _passes(exercises.check_topk_mask(_topk_mask))


@pytest.mark.parametrize("mistake, fragment", [
    (dict(causal_again=False), "keeps a future position"),
    (dict(largest=False), "LOWEST scores"),
    (dict(clamp=False), "min(topk, T)"),
    (dict(as_bool=True), "additive float mask"),
])
def test_topk_mask_mistakes(mistake, fragment):
    _fails_with(exercises.check_topk_mask(lambda s, k, m: _topk_mask(s, k, m, **mistake)), fragment)


# ---------------------------------------------------------------------------------------------- the KL objective
def _kl(scores, attn, selected, detach=True, normalise=True, restrict=True, reverse=False, reduce="mean", ce=False):
    p = attn.detach().sum(2) if detach else attn.sum(2)
    support = torch.isfinite(scores)
    if selected is not None and restrict:
        support = support & selected
    p = p * support
    if normalise:
        p = p / p.sum(-1, keepdim=True)
    log_q = scores.masked_fill(~support, -math.inf).log_softmax(-1) if restrict else scores.log_softmax(-1)
    log_q = log_q.masked_fill(~torch.isfinite(log_q), 0.0)
    if reverse:
        q = log_q.exp() * support
        per = (torch.xlogy(q, q) - q * torch.log(p).masked_fill(~support, 0.0)).sum(-1)
    elif ce:
        per = -(p * log_q).sum(-1)
    else:
        per = (torch.xlogy(p, p) - p * log_q).sum(-1)
    return per.mean() if reduce == "mean" else per.sum()


def test_kl_passes():
    _passes(exercises.check_indexer_kl(
        lambda s, a, sel: indexer_objective.indexer_kl_loss(indexer.IndexerRecord(s, a.detach().sum(2), sel))))
    _passes(exercises.check_indexer_kl(_kl))


@pytest.mark.parametrize("mistake, fragment", [
    (dict(detach=False), "detach the target"),
    (dict(normalise=False), "not L1-normalised"),
    (dict(restrict=False), "selected positions only"),
    (dict(reverse=True), "reversed"),
    (dict(reduce="sum"), "summed over the queries"),
    (dict(ce=True), "cross-entropy"),
])
def test_kl_mistakes(mistake, fragment):
    _fails_with(exercises.check_indexer_kl(lambda s, a, sel: _kl(s, a, sel, **mistake)), fragment)


# ---------------------------------------------------------------------------------------------- the notebook
def _tagged_solutions(path: Path) -> dict:
    """The functions defined by the notebook's code cells tagged `solution`, run in order in one namespace."""
    namespace: dict = {"__name__": "dsv3_solutions"}
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    sources = ["".join(c["source"]) for c in cells if "solution" in c.get("metadata", {}).get("tags", [])]
    for source in sources:
        exec(compile(source, f"{path.name}:solution", "exec"), namespace)  # noqa: S102 - the repository's notebook
    return {k: v for k, v in namespace.items() if callable(v) and getattr(v, "__module__", "") == "dsv3_solutions"}


def test_the_chapter_notebook_solves_its_exercises():
    solutions = _tagged_solutions(NOTEBOOK)
    for name in ("dsa_score", "dsa_topk", "dsa_kl"):
        exercise = exercises.EXERCISES[name]
        assert exercise.notebook == NOTEBOOK.stem
        _passes(exercise.check(solutions[exercise.function]))
