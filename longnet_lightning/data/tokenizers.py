"""Tokenizers behind one small interface, rebuildable from a JSON spec stored in checkpoints.

- ByteTokenizer: UTF-8 bytes 0..255 plus EOS=256; no files, exact round trip.
- HFTokenizer: any Hugging Face ``tokenizers`` model (a user ``tokenizer.json``, or a byte-level
  BPE trained here with :func:`train_bpe`). Its spec carries the full tokenizer JSON.

Special tokens that occur literally in text are encoded as ordinary text, so the EOS id only
ever appears where the data pipeline puts it (between documents).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
# Tried in order when a user tokenizer.json does not say which token ends a document.
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]")


class Tokenizer:
    """Interface: encode/decode text, vocabulary size, EOS id, bytes per token, a complete spec."""

    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> np.ndarray:
        """int64 ids [n] of `text` (no EOS added)."""
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """`encode` over a list; subclasses may parallelise."""
        return [self.encode(t) for t in texts]

    def encode_batch_compact(self, texts: list[str]) -> list[np.ndarray]:
        """The ids of `encode_batch`, each array in any integer dtype that holds them (the token
        cache writes them out; a narrow dtype saves an int64 copy of every document)."""
        return self.encode_batch(texts)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of `ids`; special tokens are dropped, invalid UTF-8 becomes U+FFFD (never raises)."""
        raise NotImplementedError

    def token_bytes(self) -> np.ndarray:
        """int64 [vocab_size]: how many UTF-8 bytes each id stands for (0 for special tokens)."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """JSON-serialisable description from which `load_tokenizer` rebuilds this exact tokenizer."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Stable 16-hex-digit hash of the spec (used in cache keys)."""
        blob = json.dumps(self.spec(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.spec() == other.spec()

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class ByteTokenizer(Tokenizer):
    """Ids 0..255 are UTF-8 bytes, 256 is EOS (vocab 257)."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def encode_batch_compact(self, texts: list[str]) -> list[np.ndarray]:
        """uint8 views of the UTF-8 bytes: the ids of `encode`, without the int64 copy (a subclass
        that overrides `encode` or `encode_batch` is called through them instead)."""
        cls = type(self)
        if cls.encode is not ByteTokenizer.encode or cls.encode_batch is not Tokenizer.encode_batch:
            return super().encode_batch_compact(texts)
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        out = np.ones(self.vocab_size, dtype=np.int64)
        out[self.eos_id] = 0
        return out

    def spec(self) -> dict[str, Any]:
        return {"kind": "byte"}


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers.Tokenizer`, given as its JSON string."""

    def __init__(self, tokenizer_json: str, eos_token: str | None = None):
        from tokenizers import Tokenizer as _HF

        self._json = tokenizer_json
        self._tok = _HF.from_str(tokenizer_json)
        self._tok.encode_special_tokens = True  # literal "<|endoftext|>" in text is text, not EOS
        self.eos_token = eos_token or _find_eos(self._tok)
        eos = self._tok.token_to_id(self.eos_token)
        if eos is None:
            raise ValueError(f"eos_token {self.eos_token!r} is not in the tokenizer's vocabulary.")
        self.eos_id = int(eos)
        # ids need not be contiguous: size the vocabulary by the largest id
        self.vocab_size = 1 + max(self._tok.get_vocab(with_added_tokens=True).values())

    @classmethod
    def from_file(cls, path: str | os.PathLike, eos_token: str | None = None) -> HFTokenizer:
        """Load a Hugging Face ``tokenizer.json``."""
        from tokenizers import Tokenizer as _HF

        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer file {str(path)!r} does not exist; use 'byte', 'bpe' or a tokenizer.json path."
            )
        text = path.read_text(encoding="utf-8")
        try:
            _HF.from_str(text)
        except Exception as e:
            raise ValueError(f"tokenizer={str(path)!r} is not a Hugging Face tokenizer.json ({e}).") from None
        return cls(text, eos_token)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encs = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        ids = [int(i) for i in ids]
        return self._tok.decode([i for i in ids if 0 <= i < self.vocab_size], skip_special_tokens=True)

    def token_bytes(self) -> np.ndarray:
        out = np.zeros(self.vocab_size, dtype=np.int64)
        added = self._tok.get_added_tokens_decoder()  # added tokens hold raw text, not byte-level symbols
        byte_level = _is_byte_level(json.loads(self._json))
        alphabet = _byte_level_alphabet() if byte_level else set()
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            if i in added:
                out[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
            elif byte_level and all(c in alphabet for c in token):
                out[i] = len(token)  # one alphabet character per byte
            else:  # not byte-level: bytes of the decoded piece (exact for most vocabularies)
                out[i] = len(self._tok.decode([i], skip_special_tokens=False).encode("utf-8"))
        return out

    def spec(self) -> dict[str, Any]:
        return {"kind": "hf", "eos_token": self.eos_token, "json": self._json}


def _find_eos(tok) -> str:
    """The first EOS_CANDIDATES token in the vocabulary, else the tokenizer's only special token."""
    for c in EOS_CANDIDATES:
        if tok.token_to_id(c) is not None:
            return c
    special = [t.content for t in tok.get_added_tokens_decoder().values() if t.special]
    if len(special) == 1:
        return special[0]
    raise ValueError(
        f"cannot tell which token ends a document (special tokens: {special}); "
        f"add one of {list(EOS_CANDIDATES)} to the tokenizer or pass eos_token=..."
    )


def _is_byte_level(cfg: dict) -> bool:
    """Whether the tokenizer JSON decodes with the byte-level (GPT-2 style) alphabet."""
    dec = cfg.get("decoder") or {}
    decs = dec.get("decoders", []) if dec.get("type") == "Sequence" else [dec]
    return any(d and d.get("type") == "ByteLevel" for d in decs)


def _byte_level_alphabet() -> set[str]:
    """The 256 characters byte-level BPE uses to spell bytes."""
    from tokenizers import pre_tokenizers

    return set(pre_tokenizers.ByteLevel.alphabet())


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """Train a byte-level BPE (256 byte symbols + EOS + merges) of exactly `vocab_size` ids.

    Raises ValueError if the texts are too small to learn that many merges.
    """
    from tokenizers import Tokenizer as _HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    base = 256 + 1
    if vocab_size <= base:
        raise ValueError(
            f"bpe_vocab_size={vocab_size} must exceed {base} (256 bytes + EOS); for bytes only use tokenizer='byte'."
        )
    tok = _HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise ValueError(
            f"the training split only supports {got} BPE tokens, fewer than bpe_vocab_size={vocab_size}; "
            f"set bpe_vocab_size <= {got} or add training text."
        )
    return HFTokenizer(tok.to_str(), EOS_TOKEN)


def load_tokenizer(spec: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from `Tokenizer.spec()` (no files needed)."""
    kind = spec.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        return HFTokenizer(spec["json"], spec.get("eos_token"))
    raise ValueError(f"unknown tokenizer spec kind {kind!r}; expected 'byte' or 'hf'.")


def build_tokenizer(
    name_or_path: str = "byte",
    *,
    bpe_vocab_size: int = 8192,
    train_texts: Iterable[str] | None = None,
    eos_token: str | None = None,
) -> Tokenizer:
    """'byte', 'bpe' (trained on `train_texts` with `bpe_vocab_size` ids) or a tokenizer.json path."""
    if name_or_path == "byte":
        return ByteTokenizer()
    if name_or_path == "bpe":
        if train_texts is None:
            raise ValueError("tokenizer='bpe' needs training text (train_texts=...).")
        return train_bpe(train_texts, bpe_vocab_size)
    if not str(name_or_path).endswith(".json") and not Path(name_or_path).expanduser().exists():
        raise ValueError(f"tokenizer={name_or_path!r}: use 'byte', 'bpe' or the path of a Hugging Face tokenizer.json.")
    return HFTokenizer.from_file(name_or_path, eos_token)
