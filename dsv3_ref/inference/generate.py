"""Autoregressive generation with a KV cache, after the official `inference/generate.py`.

Two phases, kept as separate functions so they can be timed apart:

* `prefill(model, tokens, cache)`: one forward pass over a (B, S) block of prompt tokens; writes S positions into
  the cache and returns the logits of the last position (B, V).
* `decode_step(model, next_tokens, cache)`: one new token per sequence (B,); reads every cached position, writes
  one more, and returns its logits (B, V).

`generate` batches prompts of different lengths the way the official code does: it prefills the shortest common
length in one pass, then steps one position at a time for the whole batch; at positions still inside a longer
prompt the true prompt token is forced in (`torch.where`) and the sampled one is ignored. The model has no padding
mask, so this scheme keeps every sequence's attention exactly what it would be alone (no left-padding); the price
is that the tail of a longer prompt is fed one token per step instead of in the prefill.

Sampling: `temperature == 0` is greedy (argmax); otherwise softmax(logits / temperature), restricted to the
nucleus (the smallest set of most likely tokens whose probability reaches `top_p`), then drawn by the official
"exponential race" argmax(p / E) with E ~ Exp(1), which is a draw from p. A `seed` makes sampling reproducible.

Differences from the official driver: prompt + max_new_tokens beyond `max_seq_len` raises instead of silently
shortening the output; a generated EOS is kept as the last id (the official code cuts it off) so that the ids and
the per-step logits line up. As there, the loop ends as soon as every sequence has stopped.
"""

from __future__ import annotations

import math

import torch

from ..data import EOS_ID, decode, encode
from ..nn.attention import KVCache
from ..nn.model import Transformer


@torch.no_grad()
def prefill(model: Transformer, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the prompt block tokens (B, S) through the model, filling cache positions [seq_len, seq_len + S).

    Returns the logits of the last position (B, V): the distribution of the first new token. The output head runs
    on that position only.
    """
    hidden = model.hidden_states(tokens, cache)  # (B, S, dim)
    return model.head(hidden[:, -1]).float()  # (B, V)


@torch.no_grad()
def decode_step(model: Transformer, next_tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed one token per sequence, next_tokens (B,), at position cache.seq_len; returns its logits (B, V)."""
    if not isinstance(next_tokens, torch.Tensor) or next_tokens.dim() != 1:
        raise ValueError(f"next_tokens must be a 1-D (batch,) tensor, got {getattr(next_tokens, 'shape', None)}")
    hidden = model.hidden_states(next_tokens.unsqueeze(1), cache)  # (B, 1, dim)
    return model.head(hidden[:, -1]).float()  # (B, V)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of logits (B, V) -> (B,): greedy if temperature == 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)  # (B, V)
        # keep a token if the tokens more likely than it hold less than top_p: always keeps the most likely one
        keep_sorted = (sorted_p.cumsum(dim=-1) - sorted_p) < top_p
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        probs = probs * keep
        probs = probs / probs.sum(dim=-1, keepdim=True)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)  # E ~ Exp(1), official sampler
    return (probs / noise).argmax(dim=-1)


def check_generation_args(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                          top_p: float, eos_id: int | None) -> None:
    """ValueError naming the argument and what is allowed, for `generate`'s (and `speculative_generate`'s) arguments."""
    cfg = model.config
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    for i, p in enumerate(prompts):
        if not isinstance(p, (list, tuple)) or len(p) == 0:
            raise ValueError(f"prompts[{i}] must be a non-empty list of token ids, got {p!r}")
        bad = [t for t in p if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompts[{i}]: token ids must be integers in [0, vocab_size={cfg.vocab_size}), "
                             f"got {bad[:5]}")
        if len(p) + max_new_tokens > cfg.max_seq_len:
            raise ValueError(f"prompts[{i}]: prompt length {len(p)} + max_new_tokens {max_new_tokens} exceeds "
                             f"max_seq_len={cfg.max_seq_len}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if eos_id is not None and (not isinstance(eos_id, int) or not 0 <= eos_id < cfg.vocab_size):
        raise ValueError(f"eos_id must be None or an integer in [0, vocab_size={cfg.vocab_size}), got {eos_id!r}")


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: int | None = EOS_ID, seed: int | None = None, attn_impl: str | None = None,
             return_logits: bool = False
             ) -> list[list[int]] | tuple[list[list[int]], list[torch.Tensor]]:
    """Continue each prompt by up to `max_new_tokens` tokens; a sequence stops after emitting `eos_id`.

    Returns the new ids per prompt (prompt excluded; a final EOS included), and with `return_logits` also, per
    prompt, the float32 logits (n_new, V) from which each new id was chosen. `attn_impl` picks the cache layout
    ('naive' | 'absorb'; default: the model's). Sampling with a `seed` uses its own generator (reproducible);
    without one it draws from torch's global RNG.
    """
    check_generation_args(model, prompts, max_new_tokens, temperature, top_p, eos_id)
    device = model.embed.weight.device
    B = len(prompts)
    lens = torch.tensor([len(p) for p in prompts], device=device)  # (B,)
    min_len, total = int(lens.min()), int(lens.max()) + max_new_tokens
    tokens = torch.full((B, total), -1, dtype=torch.long, device=device)  # (B, total), -1 = not known yet
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    in_prompt = tokens != -1  # (B, total)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    # the last new token is never fed back, so total - 1 positions suffice
    cache = model.new_cache(B, total - 1, attn_impl)

    new_ids: list[list[int]] = [[] for _ in range(B)]
    new_logits: list[list[torch.Tensor]] = [[] for _ in range(B)]
    done = [False] * B
    logits = prefill(model, tokens[:, :min_len], cache)  # (B, V): predicts position min_len
    for pos in range(min_len, total):
        nxt = sample(logits, temperature, top_p, generator)  # (B,)
        nxt = torch.where(in_prompt[:, pos], tokens[:, pos], nxt)  # still inside its prompt: force the known token
        for b, tok in enumerate(nxt.tolist()):
            if done[b] or pos < len(prompts[b]):
                continue
            new_ids[b].append(tok)
            if return_logits:
                new_logits[b].append(logits[b])
            done[b] = tok == eos_id or len(new_ids[b]) == max_new_tokens
        if all(done):
            break
        logits = decode_step(model, nxt, cache)  # (B, V): predicts position pos + 1
    if return_logits:
        return new_ids, [torch.stack(steps) for steps in new_logits]
    return new_ids


def generate_text(model: Transformer, prompt: str, max_new_tokens: int = 64, bos: bool = True, **kwargs) -> str:
    """Byte-level text in, text out: encode `prompt` with the byte tokenizer of `dsv3_ref.data` (after <bos>, as
    documents start in the training stream, unless `bos=False`), `generate`, and decode the new tokens (special
    tokens such as a final <eos> are dropped). Other keyword arguments are those of `generate` (not
    `return_logits`)."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    ids = encode(prompt, bos=bos)
    if not ids:
        raise ValueError("prompt encodes to zero tokens; give at least one character or use bos=True")
    return decode(generate(model, [ids], max_new_tokens, **kwargs)[0])
