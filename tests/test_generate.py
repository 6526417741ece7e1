"""Generation: KV-cached prefill/decode equals full recomputation, batching, stopping, sampling, bad input, CLI."""

import pytest
import torch

from dsv3_ref import ModelConfig, Transformer, save_pretrained
from dsv3_ref.data import BOS_ID, decode, encode
from dsv3_ref.inference.generate import decode_step, generate, generate_text, prefill

PROMPTS = [[BOS_ID, 72, 101, 108, 108, 111], [BOS_ID, 65], [BOS_ID, 1, 2, 3, 4, 5, 6, 7, 8, 9]]  # lengths 6, 2, 10


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_preset("tiny"))
    m.reset_parameters(seed=0)
    return m.eval()


def full_logits(model, ids):
    """Logits of the last position, recomputed from scratch without a cache: (V,)."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1]


@pytest.mark.parametrize("attn_impl", ["naive", "absorb"])
def test_prefill_and_decode_step_match_full_forward(model, attn_impl):
    tokens = torch.tensor([PROMPTS[0], PROMPTS[2][:6]])  # (2, 6)
    cache = model.new_cache(2, 16, attn_impl)
    logits = prefill(model, tokens, cache)
    assert logits.shape == (2, model.config.vocab_size) and cache.seq_len == 6
    with torch.no_grad():
        torch.testing.assert_close(logits, model(tokens)[:, -1], atol=1e-5, rtol=1e-5)
    for step in range(3):
        nxt = logits.argmax(-1)  # (2,)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        logits = decode_step(model, nxt, cache)
        assert cache.seq_len == 7 + step
        with torch.no_grad():
            torch.testing.assert_close(logits, model(tokens)[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn_impl", ["naive", "absorb"])
def test_cached_generation_logits_equal_recomputation(model, attn_impl):
    ids, logits = generate(model, PROMPTS, 5, eos_id=None, attn_impl=attn_impl, return_logits=True)
    for prompt, new, steps in zip(PROMPTS, ids, logits, strict=True):
        assert len(new) == 5 and steps.shape == (5, model.config.vocab_size)
        for k in range(5):
            torch.testing.assert_close(steps[k], full_logits(model, prompt + new[:k]), atol=1e-5, rtol=1e-5)
            assert new[k] == int(steps[k].argmax())  # greedy


def test_batch_of_different_lengths_equals_each_prompt_alone(model):
    batch_ids, batch_logits = generate(model, PROMPTS, 8, eos_id=None, return_logits=True)
    for prompt, ids, logits in zip(PROMPTS, batch_ids, batch_logits, strict=True):
        alone_ids, alone_logits = generate(model, [prompt], 8, eos_id=None, return_logits=True)
        assert ids == alone_ids[0]
        torch.testing.assert_close(logits, alone_logits[0], atol=1e-5, rtol=1e-5)


def test_naive_and_absorb_caches_generate_the_same(model):
    naive = generate(model, PROMPTS, 6, eos_id=None, attn_impl="naive")
    assert generate(model, PROMPTS, 6, eos_id=None, attn_impl="absorb") == naive


def test_greedy_is_deterministic(model):
    first = generate(model, PROMPTS, 6)
    assert generate(model, PROMPTS, 6) == first
    assert generate(model, PROMPTS, 6, seed=123) == first  # the seed only matters when sampling


def test_eos_stops_one_sequence_while_the_others_continue(model):
    free = generate(model, PROMPTS[:2], 6, eos_id=None)
    # call EOS a token that the second sequence emits after its first step and the first never emits
    k = next(k for k, t in enumerate(free[1]) if k > 0 and t not in free[0] and t not in free[1][:k])
    ids = generate(model, PROMPTS[:2], 6, eos_id=free[1][k])
    assert ids[1] == free[1][: k + 1]  # stopped, EOS kept as the last id
    assert ids[0] == free[0]  # unaffected, ran to max_new_tokens


def test_sampling_with_a_seed_is_reproducible(model):
    a = generate(model, PROMPTS, 8, temperature=1.0, top_p=0.9, eos_id=None, seed=7)
    assert generate(model, PROMPTS, 8, temperature=1.0, top_p=0.9, eos_id=None, seed=7) == a
    assert generate(model, PROMPTS, 8, temperature=1.0, top_p=0.9, eos_id=None, seed=8) != a
    assert a != generate(model, PROMPTS, 8, eos_id=None)  # random weights: near-uniform, so sampling != greedy


def test_tiny_top_p_is_greedy(model):
    greedy = generate(model, PROMPTS, 8, eos_id=None)
    assert generate(model, PROMPTS, 8, temperature=1.5, top_p=1e-6, eos_id=None, seed=3) == greedy


def test_max_seq_len_is_usable_to_the_last_position(model):
    L = model.config.max_seq_len
    assert len(generate(model, [[1] * (L - 3)], 3, eos_id=None)[0]) == 3
    with pytest.raises(ValueError, match=f"max_seq_len={L}"):
        generate(model, [[1] * (L - 3)], 4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[]), "non-empty list"),
    (dict(prompts=[[1, 2], []]), r"prompts\[1\]"),
    (dict(prompts=[[1, 259]]), "vocab_size=259"),
    (dict(prompts=[[-1]]), "vocab_size=259"),
    (dict(prompts=[[1.5]]), "integers"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(eos_id=259), "eos_id"),
    (dict(attn_impl="flash"), "attn_impl"),
])
def test_bad_input_raises(model, kwargs, match):
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(model, **args)


def test_generate_text_encodes_and_decodes_bytes(model):
    text = generate_text(model, "ab", max_new_tokens=5)
    assert text == decode(generate(model, [[BOS_ID, 97, 98]], 5)[0])  # <bos> a b; special tokens dropped
    assert generate_text(model, "ab", max_new_tokens=5, bos=False) == decode(generate(model, [encode("ab")], 5)[0])
    assert isinstance(generate_text(model, "", max_new_tokens=3), str)  # just <bos>: an unconditional sample
    with pytest.raises(ValueError, match="zero tokens"):
        generate_text(model, "", max_new_tokens=5, bos=False)


def test_cli_generate(model, tmp_path, capsys):
    from dsv3_ref.cli import main

    save_pretrained(model, tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", "ab", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ab")
    assert out.rstrip("\n") == "ab" + generate_text(model, "ab", max_new_tokens=5)
    assert main(["generate", str(tmp_path), "--prompt", "ab", "--max-new-tokens", "999"]) == 2
    assert "max_seq_len" in capsys.readouterr().err
