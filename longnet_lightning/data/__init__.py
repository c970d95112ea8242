"""Long-text data: sources, tokenizers, token caches, windows, the LongTextDataModule and the prompts of predict."""

from .cache import Corpus, SplitSpec, TokenCache, build_token_cache, cache_root, load_or_train_bpe
from .datamodule import LongTextDataModule
from .prompts import PromptDataModule
from .sources import Document, read_documents, resolve_sources, stdlib_corpus_files
from .tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer, load_tokenizer, train_bpe
from .windows import (
    IGNORE_INDEX,
    EvalWindows,
    RandomWindowSampler,
    ResumableDataLoader,
    ShardSampler,
    TrainWindows,
    context_windows,
)

__all__ = [
    "IGNORE_INDEX",
    "ByteTokenizer",
    "Corpus",
    "Document",
    "EvalWindows",
    "HFTokenizer",
    "LongTextDataModule",
    "PromptDataModule",
    "RandomWindowSampler",
    "ResumableDataLoader",
    "ShardSampler",
    "SplitSpec",
    "TokenCache",
    "Tokenizer",
    "TrainWindows",
    "build_token_cache",
    "build_tokenizer",
    "cache_root",
    "context_windows",
    "load_or_train_bpe",
    "load_tokenizer",
    "read_documents",
    "resolve_sources",
    "stdlib_corpus_files",
    "train_bpe",
]
