"""MLA decode: time per token and KV-cache bytes, naive vs absorbed, side by side in one run.

The model is the `small` preset stretched to an 8K context: `max_seq_len=8192` with YaRN on (original_seq_len stays
512, `rope_factor = 8192 / 512 = 16`, as for a checkpoint whose context was extended from 512 to 8K). YaRN changes
only the rotation frequencies and the softmax scale, not the work per token, so the timings do not depend on it.

For each context length `ctx` (the positions the new token attends to: ctx - 1 cached ones plus itself):

* the two caches are filled directly, without a prefill (a prefill of 8K tokens would take far longer than the
  measurement and does not change what a decode step reads): per layer, a random latent c_kv is put through that
  layer's `kv_norm`, a random shared key k_pe is rotated to its positions; the absorb cache stores these
  (d_c + d_r values per position), the naive cache stores what the naive path would have computed from them
  (k = [W_UK c_kv ; k_pe] and v = W_UV c_kv for every head). Both caches so describe the same attention state, and
  the two paths' decode logits must agree (checked);
* one decode step (`dsv3_ref.inference.generate.decode_step`: the whole model, batch `--batch`) is timed for each
  path, the two alternating step by step after warm-up so that machine noise hits both alike; the median of `--reps`
  steps is reported, and the ratio naive / absorbed (> 1: absorbed faster);
* the same for the attention module of one layer alone (`MLA.forward` on one token), which isolates what the two
  paths change from the fixed per-token cost (embedding, norms, MoE, output head);
* cache bytes for `ctx` positions, all layers, float32; the absorbed cache is asserted to be exactly the latent
  size n_layers * ctx * (kv_lora_rank + qk_rope_head_dim) * 4 bytes (`dsv3_ref.systems.accounting.kv_cache_bytes`).

What to expect. With 4 heads the `small` naive cache is only 4x the latent (71x at 671B), and the absorbed path
reads the latent twice (for the scores and for the weighted sum), so one layer's cache traffic per step differs by
about 2.3x at batch 1, at 1.8x the arithmetic; the rest of a step (embedding, norms, MoE, head) costs both paths the
same. At batch > 1 the naive scores `einsum("bshd,bthd->bsht")` over the (B, T, H, d) cache cannot treat (b, h) as
one strided batch dimension, so torch copies the whole K and V caches at every step; the official naive path has
the same einsum on the same layout. The absorbed path's cache has no head axis and is read in place.

    python benchmarks/bench_mla_decode.py [--ctx 256 512 1024 2048 4096 8192] [--batch 1 4] [--threads 1] [--reps 15]
    python benchmarks/bench_mla_decode.py --profile    # also the hottest ops of both paths at the last batch and ctx
"""

from __future__ import annotations

import argparse

import torch
from timing import race  # benchmarks/timing.py (the script's folder is on sys.path)

from dsv3_ref import KVCache, ModelConfig, Transformer
from dsv3_ref.inference.generate import decode_step
from dsv3_ref.nn.rope import apply_rotary_emb
from dsv3_ref.systems.accounting import kv_cache_bytes

IMPLS = ("naive", "absorb")


@torch.no_grad()
def fill_caches(model: Transformer, batch: int, ctx: int, seed: int) -> dict[str, KVCache]:
    """Caches of both layouts holding the same random attention state at positions [0, ctx - 1), seq_len = ctx - 1."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    caches = {impl: model.new_cache(batch, ctx, impl) for impl in IMPLS}
    freqs = model.freqs_cis(torch.device("cpu"))[: ctx - 1]
    for i, layer in enumerate(model.layers):
        mla = layer.attn
        c_kv = mla.kv_norm(torch.randn(batch, ctx - 1, cfg.kv_lora_rank, generator=gen))  # (B, T, d_c)
        k_pe = apply_rotary_emb(torch.randn(batch, ctx - 1, cfg.qk_rope_head_dim, generator=gen), freqs)  # (B, T, d_r)
        kv = mla.wkv_b(c_kv).view(batch, ctx - 1, cfg.n_heads, -1)  # (B, T, H, d_h + d_v)
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, cfg.n_heads, -1)], dim=-1)  # (B, T, H, d_h + d_r)
        caches["absorb"].layers[i]["kv"][:, : ctx - 1] = c_kv
        caches["absorb"].layers[i]["pe"][:, : ctx - 1] = k_pe
        caches["naive"].layers[i]["k"][:, : ctx - 1] = k
        caches["naive"].layers[i]["v"][:, : ctx - 1] = v
    for cache in caches.values():
        cache.seq_len = ctx - 1
    return caches


def bench(model: Transformer, batch: int, ctx: int, warmup: int, reps: int) -> dict[str, dict]:
    """Median seconds of a decode step ("step") and of layer 0's MLA alone ("mla"), cache bytes ("bytes"), and the
    step functions ("fns", for profiling) of both paths at one (batch, ctx)."""
    cfg = model.config
    caches = fill_caches(model, batch, ctx, seed=ctx)
    token = torch.randint(0, cfg.vocab_size, (batch,), generator=torch.Generator().manual_seed(ctx))  # (B,)

    # correctness: both layouts hold the same state, so the two paths give the same logits
    logits = {impl: decode_step(model, token, caches[impl]) for impl in IMPLS}
    torch.testing.assert_close(logits["absorb"], logits["naive"], rtol=1e-4, atol=1e-4)

    def step(impl: str) -> callable:
        def fn() -> None:
            caches[impl].seq_len = ctx - 1  # re-run the same step: position ctx - 1 is overwritten
            decode_step(model, token, caches[impl])

        return fn

    x = torch.randn(batch, 1, cfg.dim, generator=torch.Generator().manual_seed(1))  # (B, 1, dim)
    freqs = model.freqs_cis(torch.device("cpu"))[ctx - 1: ctx]
    mla = model.layers[0].attn

    def attn(impl: str) -> callable:
        def fn() -> None:
            with torch.no_grad():
                mla(x, freqs, None, caches[impl].layers[0], ctx - 1, impl)

        return fn

    nbytes = {impl: float(caches[impl].nbytes(ctx)) for impl in IMPLS}
    latent = cfg.n_layers * ctx * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4 * batch
    assert nbytes["absorb"] == latent == kv_cache_bytes(cfg, "mla", 4, ctx, batch), nbytes
    assert nbytes["naive"] == kv_cache_bytes(cfg, "naive", 4, ctx, batch), nbytes
    steps = {impl: step(impl) for impl in IMPLS}
    step_times, mla_times = race(steps, warmup, reps), race({impl: attn(impl) for impl in IMPLS}, warmup, reps)
    return {"step": {name: wall for name, (wall, _) in step_times.items()},
            "mla": {name: wall for name, (wall, _) in mla_times.items()},
            "bytes": nbytes, "fns": steps}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="decode batch sizes (default: 1 4)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: a decode step is many tiny ops, and 2 threads on a shared 2-core "
                         "machine mostly measure the other processes)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--profile", action="store_true", help="print both paths' hottest ops at the last batch and ctx")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    max_len = max(8192, *args.ctx)
    cfg = ModelConfig.from_preset("small", max_seq_len=max_len, rope_factor=max_len / 512)
    model = Transformer(cfg).eval()
    print(f"small preset at max_seq_len={cfg.max_seq_len} (YaRN s={cfg.rope_factor:g} over {cfg.original_seq_len}), "
          f"{cfg.n_layers} layers, {cfg.n_heads} heads, d_c={cfg.kv_lora_rank}, d_r={cfg.qk_rope_head_dim}, "
          f"d_h={cfg.qk_nope_head_dim}, d_v={cfg.v_head_dim}; threads={args.threads}; "
          f"median of {args.reps} alternating steps after {args.warmup} warm-up")
    mib = 2**20
    for batch in args.batch:
        print(f"\nbatch {batch}: one decode step = {batch} new token(s)")
        print(f"{'ctx':>6} | {'decode ms/step':>19} {'naive/absorb':>12} | {'1-layer MLA ms':>17} "
              f"{'naive/absorb':>12} | {'cache MiB (fp32)':>17} {'naive/absorb':>12}")
        print(f"{'':>6} | {'naive':>9} {'absorb':>9} {'':>12} | {'naive':>8} {'absorb':>8} {'':>12} "
              f"| {'naive':>8} {'absorb':>8} {'':>12}")
        for ctx in args.ctx:
            r = bench(model, batch, ctx, args.warmup, args.reps)
            full, layer, nbytes = r["step"], r["mla"], r["bytes"]
            print(f"{ctx:>6} | {full['naive'] * 1e3:>9.2f} {full['absorb'] * 1e3:>9.2f} "
                  f"{full['naive'] / full['absorb']:>12.2f} | {layer['naive'] * 1e3:>8.3f} "
                  f"{layer['absorb'] * 1e3:>8.3f} {layer['naive'] / layer['absorb']:>12.2f} | "
                  f"{nbytes['naive'] / mib:>8.2f} {nbytes['absorb'] / mib:>8.2f} "
                  f"{nbytes['naive'] / nbytes['absorb']:>12.2f}")
    print(f"\nabsorbed cache = latent size exactly: {cfg.kv_lora_rank} + {cfg.qk_rope_head_dim} values per position "
          f"per layer (checked); naive caches {cfg.n_heads} x ({cfg.qk_head_dim} + {cfg.v_head_dim})")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for impl in IMPLS:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    r["fns"][impl]()
            print(f"\n{impl}, batch={batch}, ctx={ctx}: 5 decode steps")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
