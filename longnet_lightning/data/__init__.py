"""Long-text data: sources, tokenizers, token caches, windows, the LongTextDataModule and the prompts of predict."""

from .cache import Corpus, SplitSpec, TokenCache, build_token_cache, cache_root, load_or_train_bpe
from .datamodule import LongTextDataModule
from .prompts import PromptDataModule
from .sources import (
    BUILTIN_CORPORA,
    Document,
    SitePackagesManifest,
    read_documents,
    resolve_sources,
    scan_site_packages,
    site_packages_corpus_files,
    site_packages_roots,
    stdlib_corpus_files,
)
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
    "BUILTIN_CORPORA",
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
    "SitePackagesManifest",
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
    "scan_site_packages",
    "site_packages_corpus_files",
    "site_packages_roots",
    "stdlib_corpus_files",
    "train_bpe",
]
