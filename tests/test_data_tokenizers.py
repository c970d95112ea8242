"""Tokenizers: exact round trips, bytes per token, and spec -> load_tokenizer rebuilding the same tokenizer."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longnet_lightning.data import ByteTokenizer, HFTokenizer, build_tokenizer, load_tokenizer, train_bpe

TRAIN = [
    "def f(x):\n    return x * 2  # double\n" * 20,
    "Größe, naïve café — 日本語のテキスト, emoji 🎉🎉 and tabs\t\tend.\n" * 20,
    "<|endoftext|> appears literally in this text\n" * 5,
]
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(TRAIN, 300)


@settings(max_examples=60, deadline=None)
@given(texts)
def test_byte_round_trip_and_bytes(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.token_bytes()[ids].sum() == len(text.encode("utf-8"))


@settings(max_examples=60, deadline=None)
@given(texts)
def test_bpe_round_trip_and_bytes(bpe, text):
    ids = bpe.encode(text)
    assert ids.dtype == np.int64 and (ids < bpe.vocab_size).all() and (ids != bpe.eos_id).all()
    assert bpe.decode(ids) == text
    assert bpe.token_bytes()[ids].sum() == len(text.encode("utf-8"))


def test_byte_tokenizer_basics():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    assert tok.encode("é").tolist() == [0xC3, 0xA9]
    assert tok.decode([0xC3, 256, 0xA9]) == "é"  # EOS dropped
    assert tok.decode([0xC3]) == "\ufffd"  # a cut-off character never raises
    assert tok.token_bytes().tolist() == [1] * 256 + [0]


def test_bpe_learns_merges_and_keeps_special_text_as_text(bpe):
    assert bpe.vocab_size == 300 and bpe.eos_token == "<|endoftext|>"
    text = TRAIN[0][:60]
    assert len(bpe.encode(text)) < len(text.encode())  # merges were learned
    assert bpe.eos_id not in bpe.encode("<|endoftext|>").tolist()  # EOS only where the pipeline puts it
    assert bpe.token_bytes()[bpe.eos_id] == 0


def test_bpe_too_small_corpus_or_vocab():
    with pytest.raises(ValueError, match=r"only supports \d+ BPE tokens.*set bpe_vocab_size <="):
        train_bpe(["abab"], 5000)
    with pytest.raises(ValueError, match="bpe_vocab_size=200 must exceed 257"):
        train_bpe(TRAIN, 200)


def test_spec_is_complete_and_rebuilds_the_same_tokenizer(bpe):
    for tok in [ByteTokenizer(), bpe]:
        spec = json.loads(json.dumps(tok.spec()))  # survives a JSON round trip (checkpoints)
        again = load_tokenizer(spec)
        assert again == tok and again.fingerprint() == tok.fingerprint()
        assert (again.vocab_size, again.eos_id) == (tok.vocab_size, tok.eos_id)
        assert (again.token_bytes() == tok.token_bytes()).all()
        assert again.encode(TRAIN[1]).tolist() == tok.encode(TRAIN[1]).tolist()
    assert ByteTokenizer().fingerprint() != bpe.fingerprint()
    assert train_bpe(TRAIN, 300).fingerprint() == bpe.fingerprint()  # training is deterministic
    with pytest.raises(ValueError, match="unknown tokenizer spec kind"):
        load_tokenizer({"kind": "sentencepiece"})


def test_user_tokenizer_json(tmp_path, bpe):
    path = tmp_path / "tokenizer.json"
    path.write_text(bpe.spec()["json"])
    tok = build_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer) and tok == bpe
    assert build_tokenizer("byte") == ByteTokenizer()

    with pytest.raises(FileNotFoundError, match="missing.json' does not exist"):
        build_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="use 'byte', 'bpe' or the path"):
        build_tokenizer("gpt2")
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ValueError, match="junk.json' is not a Hugging Face tokenizer.json"):
        build_tokenizer(str(tmp_path / "junk.json"))
    with pytest.raises(ValueError, match="needs training text"):
        build_tokenizer("bpe")


def test_user_tokenizer_without_an_end_token(tmp_path, bpe):
    cfg = json.loads(bpe.spec()["json"])
    cfg["added_tokens"] = [dict(cfg["added_tokens"][0], content=c, id=i) for i, c in [(0, "<a>"), (1, "<b>")]]
    vocab = cfg["model"]["vocab"]
    del vocab["<|endoftext|>"]
    vocab["<a>"], vocab["<b>"] = 0, 1 + max(vocab.values())
    cfg["added_tokens"][1]["id"] = vocab["<b>"]
    with pytest.raises(ValueError, match=r"cannot tell which token ends a document.*\['<a>', '<b>'\].*eos_token"):
        HFTokenizer(json.dumps(cfg))
    tok = HFTokenizer(json.dumps(cfg), eos_token="<b>")
    assert tok.eos_id == vocab["<b>"] and tok.vocab_size == vocab["<b>"] + 1
    assert load_tokenizer(tok.spec()).eos_id == tok.eos_id
