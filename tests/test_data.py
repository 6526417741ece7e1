"""dsv3_ref.data: the byte tokenizer, the synthetic corpus (determinism, domains, split) and batching."""

import hashlib
import json

import pytest
import torch

from dsv3_ref.data import (
    BOS_ID,
    DOMAINS,
    EOS_ID,
    PAD_ID,
    VOCAB_SIZE,
    CorpusData,
    TextFileData,
    decode,
    encode,
    make_corpus,
)

N_BYTES = 200_000  # small corpus: fast, still every domain many times


@pytest.fixture(scope="module")
def corpus() -> CorpusData:
    return CorpusData(seed=0, n_bytes=N_BYTES)


# ---------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip():
    text = "héllo wörld → 漢字 🙂\n\tdef f(x):"
    ids = encode(text)
    assert ids == list(text.encode("utf-8")) and all(0 <= i < 256 for i in ids)
    assert decode(ids) == text
    framed = encode(text, bos=True, eos=True)
    assert framed[0] == BOS_ID and framed[-1] == EOS_ID and framed[1:-1] == ids
    assert decode(framed) == text  # specials dropped
    assert decode(framed, show_special=True) == f"<bos>{text}<eos>"
    assert decode([PAD_ID]) == "" and decode([PAD_ID], show_special=True) == "<pad>"
    assert encode(b"\x00\xff") == [0, 255]
    assert decode(torch.tensor(framed)) == text
    assert VOCAB_SIZE == 259


def test_tokenizer_partial_utf8_is_replaced():
    ids = encode("é")[:1]  # half of a 2-byte character
    assert decode(ids) == "\ufffd"


@pytest.mark.parametrize("bad", [[-1], [VOCAB_SIZE], [65, 1000]])
def test_decode_rejects_bad_ids(bad):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        decode(bad)


def test_encode_rejects_non_text():
    with pytest.raises(ValueError, match="str or bytes"):
        encode(123)


# ---------------------------------------------------------------------------------------------- corpus
def test_corpus_is_deterministic():
    a, b = make_corpus(0, 50_000), make_corpus(0, 50_000)
    assert a == b
    assert make_corpus(1, 50_000) != a
    text = "".join(d.text for d in a).encode("utf-8")
    # identical bytes on every machine: pure-Python random.Random(seed), nothing else
    assert hashlib.sha256(text).hexdigest()[:16] == "bc4536df15f490e4"


def test_corpus_domains_balanced_and_distinct():
    docs = make_corpus(0, N_BYTES)
    sizes = {d: sum(len(doc.text) for doc in docs if doc.domain == d) for d in DOMAINS}
    assert set(sizes) == set(DOMAINS)
    assert max(sizes.values()) < 1.1 * min(sizes.values())  # about the same bytes per domain
    sample = {d: next(doc.text for doc in docs if doc.domain == d) for d in DOMAINS}
    assert "=" in sample["arithmetic"] and sample["arithmetic"].replace("\n", "").replace("=", "").replace(
        "+", "").replace("-", "").replace("*", "").replace("x", "").isdigit()
    assert sample["code"].startswith("def ") and "    return" in sample["code"]
    assert sample["prose"][0].isupper() and sample["prose"].rstrip().endswith(".")
    for line in sample["json"].splitlines():
        assert set(json.loads(line)) == {"id", "name", "age", "city", "active"}
    with pytest.raises(ValueError, match="domains"):
        make_corpus(0, 1000, domains=["poetry"])


def test_split_is_by_document_and_disjoint(corpus):
    assert corpus.train_docs and corpus.val_docs
    all_docs = make_corpus(0, N_BYTES)
    assert len(corpus.train_docs) + len(corpus.val_docs) == len(all_docs)
    assert not {id(d) for d in corpus.train_docs} & {id(d) for d in corpus.val_docs}
    assert not {d.text for d in corpus.train_docs if len(d.text) > 200} & {d.text for d in corpus.val_docs}
    assert 0.05 < len(corpus.val_docs) / len(all_docs) < 0.15
    # streams: <bos> text <eos> per document, one domain index per token
    assert corpus.train[0] == BOS_ID and corpus.train[-1] == EOS_ID
    assert corpus.train.shape == corpus.train_domains.shape and corpus.val.shape == corpus.val_domains.shape
    assert decode(corpus.train[: len(corpus.train_docs[0].text.encode()) + 2]) == corpus.train_docs[0].text


# ---------------------------------------------------------------------------------------------- batches
def test_batches_are_deterministic(corpus):
    b1 = corpus.train_batch(4, 32, torch.Generator().manual_seed(0))
    b2 = CorpusData(seed=0, n_bytes=N_BYTES).train_batch(4, 32, torch.Generator().manual_seed(0))
    assert torch.equal(b1.inputs, b2.inputs) and torch.equal(b1.targets, b2.targets)
    assert b1.inputs.shape == b1.targets.shape == b1.domains.shape == (4, 32)
    assert b1.inputs.dtype == torch.int64
    assert torch.equal(b1.inputs[:, 1:], b1.targets[:, :-1])  # targets are the inputs shifted by one
    digest = hashlib.sha256(b1.inputs.numpy().tobytes() + b1.targets.numpy().tobytes()).hexdigest()[:16]
    assert digest == "506977a9741195fb"
    v1, v2 = corpus.val_batches(2, 4, 32), corpus.val_batches(2, 4, 32)
    assert all(torch.equal(a.inputs, b.inputs) for a, b in zip(v1, v2, strict=True))


def test_domain_batches_and_domain_of(corpus):
    gen = torch.Generator().manual_seed(0)
    for d in DOMAINS:
        batch = corpus.train_batch(3, 48, gen, domain=d)
        assert (batch.domains == DOMAINS.index(d)).all()
        assert [batch.domain_of(i) for i in range(3)] == [d] * 3
    code = decode(corpus.train_batch(1, 64, gen, domain="code").inputs[0])
    assert "    " in code
    with pytest.raises(ValueError, match="domain must be one of"):
        corpus.train_batch(1, 8, gen, domain="poetry")
    with pytest.raises(ValueError, match="too long"):
        corpus.val_batches(1, 1, corpus.val.numel())  # a window of N + 1 tokens does not fit in N


def test_split_into_micro_batches(corpus):
    batch = corpus.train_batch(6, 16, torch.Generator().manual_seed(1))
    parts = batch.split(3)
    assert [p.inputs.shape[0] for p in parts] == [2, 2, 2]
    assert torch.equal(torch.cat([p.inputs for p in parts]), batch.inputs)
    with pytest.raises(ValueError, match="micro-batches"):
        batch.split(4)


# ---------------------------------------------------------------------------------------------- text files
def test_text_file_data(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("the quick brown fox jumps over the lazy dog\n" * 50, encoding="utf-8")
    data = TextFileData(path, val_fraction=0.2)
    assert data.train.numel() + data.val.numel() == path.stat().st_size
    assert data.domain_names == ("text",)
    batch = data.train_batch(2, 16, torch.Generator().manual_seed(0))
    assert decode(batch.inputs[0]) in path.read_text() and batch.domain_of(0) == "text"


def test_text_file_data_rejects_bad_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        TextFileData(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        TextFileData(tmp_path / "empty.txt")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="UTF-8|binary"):
        TextFileData(tmp_path / "blob.bin")
    (tmp_path / "nul.txt").write_bytes(b"abc\x00def")
    with pytest.raises(ValueError, match="binary"):
        TextFileData(tmp_path / "nul.txt")
