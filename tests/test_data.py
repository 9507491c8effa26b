"""Training data: reading, the document split (never leaks, deterministic, stable), packing, batches that
restart exactly and shard across ranks, and the offline corpora."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import WORDS, save_tiny_tokenizer
from upcycle.data.corpora import corpus_documents, python_stdlib_documents, roff_to_text
from upcycle.data.documents import Document, read_documents, split_documents
from upcycle.data.tokens import Batches, load_data, pack, pack_documents, tokenize_documents
from upcycle.errors import UpcycleError


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(d)
    return AutoTokenizer.from_pretrained(d)


def docs(n: int) -> list[Document]:
    # document i is the word WORDS[i % 100] repeated: which document a token came from is visible
    return [Document(f"doc{i}", " ".join([WORDS[1 + i % 100]] * (20 + i))) for i in range(n)]


def test_split_is_by_document_and_never_leaks(tok):
    ds = docs(60)
    train, val = split_documents(ds, 0.2, seed=3)
    assert {d.id for d in train}.isdisjoint({d.id for d in val})
    assert len(train) + len(val) == 60 and 4 <= len(val) <= 24
    data = pack_documents(ds, tok, 16, 0.2, seed=3)
    vocab = tok.get_vocab()
    val_words = {vocab[d.text.split()[0]] for d in val}
    train_words = {vocab[d.text.split()[0]] for d in train} - val_words  # words 1..100 repeat past doc 99
    seen_val = set(data.val.unique().tolist())
    seen_train = set(data.train.unique().tolist())
    assert seen_val <= val_words and seen_val.isdisjoint(train_words)
    assert seen_train.isdisjoint(val_words - {vocab[d.text.split()[0]] for d in train})
    assert data.info["train_documents"] == len(train) and data.info["val_documents"] == len(val)


def test_split_deterministic_and_stable():
    ds = docs(50)
    a = split_documents(ds, 0.3, seed=0)
    assert split_documents(list(reversed(ds)), 0.3, seed=0)[1] == [d for d in reversed(ds) if d in a[1]]
    assert {d.id for d in split_documents(ds, 0.3, seed=1)[1]} != {d.id for d in a[1]}
    # adding documents never moves an existing one across the split
    more = split_documents(ds + docs(80)[50:], 0.3, seed=0)
    assert {d.id for d in a[1]} <= {d.id for d in more[1]}
    assert {d.id for d in a[0]} <= {d.id for d in more[0]}


def test_split_edge_cases():
    two = docs(2)
    train, val = split_documents(two, 0.01, seed=0)
    assert len(train) == 1 and len(val) == 1  # a requested validation side is never empty
    assert split_documents(docs(1), 0.5) == (docs(1), [])
    assert split_documents(docs(5), 0.0)[1] == []
    with pytest.raises(UpcycleError, match="unique"):
        split_documents([Document("x", "a"), Document("x", "b")], 0.1)
    with pytest.raises(UpcycleError, match="val_fraction"):
        split_documents(docs(3), 1.0)


def test_packing_eos_and_determinism(tok):
    ids = tokenize_documents([Document("a", "the a of"), Document("b", "to and")], tok)
    assert ids == [[1, 2, 3], [4, 5]]  # the tiny tokenizer has no EOS/BOS: nothing between documents
    assert pack(ids, 2).tolist() == [[1, 2], [3, 4]]
    tok.add_special_tokens({"eos_token": "the"})  # any known token will do as a separator here
    try:
        assert tokenize_documents([Document("b", "to and")], tok) == [[4, 5, 1]]
    finally:
        tok.eos_token = None
    a = pack_documents(docs(30), tok, 8, 0.1, seed=5)
    b = pack_documents(docs(30), tok, 8, 0.1, seed=5)
    c = pack_documents(docs(30), tok, 8, 0.1, seed=6)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert not torch.equal(a.train[: len(c.train)], c.train[: len(a.train)])


def test_tokenisation_cache(tmp_path, tok):
    ds = docs(10)
    first = tokenize_documents(ds, tok, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    assert tokenize_documents(ds, tok, cache_dir=tmp_path) == first
    changed = ds[:-1] + [Document(ds[-1].id, "of of")]
    assert tokenize_documents(changed, tok, cache_dir=tmp_path)[-1] == [3, 3]
    assert len(list(tmp_path.glob("*.pt"))) == 2


def test_batches_restart_and_shard():
    seqs = torch.arange(10 * 4).view(10, 4)
    full = Batches(seqs, 2, seed=1)
    steps = [full.next_step(2) for _ in range(4)]  # 16 sequences: crosses into the second epoch
    epoch0 = torch.cat([mb for s in steps for mb in s])[:10, 0] // 4
    assert sorted(epoch0.tolist()) == list(range(10))  # every sequence once per epoch
    b = Batches(seqs, 2, seed=1)
    b.next_step(2)
    state = json.loads(json.dumps(b.state_dict()))
    c = Batches(seqs, 2, seed=1)
    c.load_state_dict(state)
    for s in steps[1:]:
        assert all(torch.equal(x, y) for x, y in zip(c.next_step(2), s))
    # two ranks with one micro-batch each see exactly the two micro-batches of one rank with two
    r0, r1 = Batches(seqs, 2, seed=1, rank=0, world=2), Batches(seqs, 2, seed=1, rank=1, world=2)
    for s in steps:
        assert torch.equal(r0.next_step(1)[0], s[0]) and torch.equal(r1.next_step(1)[0], s[1])
    with pytest.raises(UpcycleError, match="not this data"):
        Batches(seqs[:9], 2, seed=1).load_state_dict(state)


def test_read_text_folder_jsonl(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("para one\n\npara two\n\n" + "x " * 50)
    (tmp_path / "d" / ".hidden.txt").write_text("secret")
    (tmp_path / "d" / "blob.bin").write_bytes(b"\x00\x01")
    (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "sub" / "b.md").write_text("hello")
    rows = [{"text": "first"}, {"text": "second", "id": "s2"}, {"other": 1, "text": "third"}]
    (tmp_path / "d" / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = read_documents(tmp_path / "d", chunk_chars=20)
    ids = [d.id for d in ds]
    assert ids == ["a.txt#0", "a.txt#1", "c.jsonl:1", "c.jsonl:s2", "c.jsonl:3", "sub/b.md#0"]
    assert "".join(d.text for d in ds[:2]) == (tmp_path / "d" / "a.txt").read_text()  # chunks lose nothing
    (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(UpcycleError, match="no 'text' field; pass --text-field"):
        read_documents(tmp_path / "bad.jsonl")
    assert read_documents(tmp_path / "bad.jsonl", text_field="content")[0].text == "x"
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(UpcycleError, match="broken.jsonl:1: not valid JSON"):
        read_documents(tmp_path / "broken.jsonl")
    with pytest.raises(UpcycleError, match="not found"):
        read_documents(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UpcycleError, match="no text found"):
        read_documents(tmp_path / "empty")


def test_load_data_file(tmp_path, tok):
    f = tmp_path / "t.txt"
    f.write_text("\n\n".join(" ".join(WORDS[i : i + 30]) for i in range(40)))
    data = load_data(f, tok, 16, val_fraction=0.25, seed=0, chunk_chars=100)
    assert data.seq_len == 16 and data.train.shape[0] > 0 and data.val.shape[0] > 0
    with pytest.raises(UpcycleError, match="fewer than one sequence"):
        load_data(f, tok, 10**6)


def test_roff_to_text():
    src = (
        '.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list directory contents\n.SH DESCRIPTION\n'
        '.B ls\nlists \\fIfiles\\fR and \\(lqdirs\\(rq.\n.PP\n.IP "\\(bu" 2m\nan item\n'
    )
    text = roff_to_text(src)
    assert "NAME\nls - list directory contents" in text
    assert 'lists files and "dirs".' in text and "\\f" not in text and "comment" not in text
    assert "* \nan item" in text or "*\nan item" in text


def test_offline_corpora():
    py = python_stdlib_documents(max_files=20)
    assert len(py) >= 15 and all(d.id.startswith("stdlib/") and d.id.endswith(".py") for d in py)
    assert any("def " in d.text for d in py)
    pypi = corpus_documents("pypi", max_chars=20_000)
    assert pypi and sum(len(d.text) for d in pypi) >= 20_000 or len(pypi) == len(corpus_documents("pypi"))
    with pytest.raises(UpcycleError, match="unknown corpus"):
        corpus_documents("klingon")
