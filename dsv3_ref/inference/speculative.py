"""Self-speculative greedy decoding with the MTP module as the drafter (report §2.2 and §5.4.3).

The main model's forward pass over token t_n yields its final hidden state h_n and, through the head, the next token
t_{n+1}. The depth-1 MTP module, given (h_n, Emb(t_{n+1})), predicts the token after that: a *draft* d of t_{n+2},
at the price of one block instead of the whole model. The next main forward pass feeds two tokens, [t_{n+1}, d]:

* its first position gives the main model's own choice y for t_{n+2}. If y == d the draft is accepted and the second
  position, computed on a correct prefix, gives t_{n+3} as well: two tokens for one main forward pass;
* otherwise y replaces the draft, and the cache entry written for d (a wrong prefix) is discarded with
  `KVCache.truncate`: one token, as plain decoding would have produced.

Either way every emitted token is the main model's greedy choice on the true prefix, so the output is identical to
`dsv3_ref.generate.generate(..., temperature=0)` (up to floating-point rounding: the two-token pass does the same
arithmetic in differently shaped kernels; see the tests). The MTP block keeps its own one-layer `KVCache`; its slot j
combines h_j with Emb(t_{j+1}) (cache index j, RoPE position j + 1, as in `dsv3_ref.mtp`), and after every step it
is extended over exactly the positions the main model accepted, so both caches always hold seq_len positions.

With D > 1 MTP modules only the first drafts (the report uses D = 1); deeper drafts would need a chain of guesses.
Batch 1 only: with a batch, rows accept different numbers of tokens and their caches fall out of step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import EOS_ID
from ..nn.attention import KVCache, causal_mask
from ..nn.model import Transformer
from .generate import check_generation_args


@dataclass
class SpeculativeStats:
    """Counters of one `speculative_generate` call. main_forwards includes the prefill; drafted counts the drafts
    the main model verified (a draft left over when generation stops is not counted)."""

    new_tokens: int = 0
    main_forwards: int = 0
    mtp_forwards: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / verified drafts (the report's "acceptance rate of the second token prediction")."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def forwards_per_token(self) -> float:
        """Main-model forward passes per generated token (1.0 for plain decoding, prefill included)."""
        return self.main_forwards / self.new_tokens if self.new_tokens else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"new_tokens": self.new_tokens, "main_forwards": self.main_forwards,
                "mtp_forwards": self.mtp_forwards, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": self.acceptance_rate, "forwards_per_token": self.forwards_per_token}


class _Drafter:
    """The depth-1 MTP module with its own one-layer KV cache. `extend(h, next_tokens)` appends the slots for the
    main hidden states h (1, S, dim) at positions seq_len .. seq_len + S - 1 and the tokens that follow each of them
    (1, S), and returns the draft for the token after the last one (a Python int)."""

    def __init__(self, model: Transformer, max_len: int, attn_impl: str | None):
        self.model, self.module = model, model.mtp[0]
        p = model.embed.weight
        self.cache = KVCache(model.config, 1, max_len, attn_impl, n_layers=1, dtype=p.dtype, device=p.device)

    def extend(self, h: torch.Tensor, next_tokens: torch.Tensor) -> int:
        start, S = self.cache.seq_len, h.size(1)
        freqs = self.model.freqs_cis(h.device)[start + 1:start + 1 + S]  # slot j embeds t_{j+1}: position j + 1
        hk = self.module(h, self.model.embed(next_tokens), freqs, causal_mask(S, start, h.device),
                         self.cache.layers[0], start, self.cache.attn_impl)  # (1, S, dim)
        self.cache.seq_len = start + S
        return int(self.model.head(hk[:, -1]).argmax(-1))


@torch.no_grad()
def speculative_generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = EOS_ID,
                         attn_impl: str | None = None) -> tuple[list[int], SpeculativeStats]:
    """Greedy continuation of one prompt (a list of token ids) by up to `max_new_tokens` tokens, drafting with the
    model's first MTP module and verifying with the main model. Returns (new ids, stats): the ids are those of
    `generate(model, [prompt_ids], max_new_tokens, eos_id=eos_id)[0]` (prompt excluded, a final EOS included)."""
    if len(model.mtp) == 0:
        raise ValueError("speculative_generate needs a model with an MTP module (config n_mtp_layers >= 1)")
    check_generation_args(model, [prompt_ids], max_new_tokens, 0.0, 1.0, eos_id)
    device = model.embed.weight.device
    P = len(prompt_ids)
    # positions fed: the prompt, then every new token but the last, plus one draft beyond it
    cache = model.new_cache(1, P + max_new_tokens, attn_impl)
    drafter = _Drafter(model, P + max_new_tokens, cache.attn_impl)
    stats = SpeculativeStats()
    out: list[int] = []

    def emit(tok: int) -> bool:
        """Append a verified token; True when generation is over."""
        out.append(tok)
        return tok == eos_id or len(out) == max_new_tokens

    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, P)
    hidden = model.hidden_states(prompt, cache)  # (1, P, dim)
    stats.main_forwards += 1
    x = int(model.head(hidden[:, -1]).argmax(-1))  # t_P
    if emit(x):
        stats.new_tokens = len(out)
        return out, stats
    # MTP slots 0..P-1: (h_j, t_{j+1}); the last one drafts t_{P+1}
    draft = drafter.extend(hidden, torch.tensor([prompt_ids[1:] + [x]], device=device))
    stats.mtp_forwards += 1
    while True:
        n = cache.seq_len  # positions verified and cached; x = t_n is the last verified token, not yet fed
        fed = torch.tensor([[x, draft]], device=device)  # (1, 2)
        hidden = model.hidden_states(fed, cache)  # (1, 2, dim): h_n, h_{n+1} (the latter valid iff accepted)
        stats.main_forwards += 1
        stats.drafted += 1
        pred = model.head(hidden).argmax(-1)[0].tolist()  # [t_{n+1}, t_{n+2} if the draft was right]
        if pred[0] == draft:
            stats.accepted += 1
            if emit(pred[0]) or emit(pred[1]):
                break
            new_h, follow = hidden, torch.tensor([[draft, pred[1]]], device=device)
            x = pred[1]
        else:
            cache.truncate(n + 1)  # forget the draft's position
            if emit(pred[0]):
                break
            new_h, follow = hidden[:, :1], torch.tensor([[pred[0]]], device=device)
            x = pred[0]
        draft = drafter.extend(new_h, follow)  # the MTP cache catches up with the main cache
        stats.mtp_forwards += 1
    stats.new_tokens = len(out)
    return out, stats
