"""Shared fixtures: a tiny text corpus, a token cache folder, and CLI arguments for tiny runs."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # the Triton kernels are checked on CPU through Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]

# Lightning's own chatter on tiny CPU runs (few workers, few batches, reused dirs) is not what we test.
LIGHTNING_NOISE = [
    "ignore:.*does not have many workers.*",
    "ignore:.*number of training batches.*is smaller than the logging interval.*",
    "ignore:.*The dirpath has changed from.*",
    "ignore:.*Checkpoint directory .* exists and is not empty.*",
    "ignore:.*isinstance\\(treespec, LeafSpec\\).*",
    "ignore:.*LightningCLI's args parameter is intended to run from within Python.*",
]


LIGHTNING_TESTS = {"test_lm.py", "test_cli.py", "test_recipes.py", "test_plugins.py", "test_first_runs.py", "test_bad_inputs.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).name in LIGHTNING_TESTS:
            for spec in LIGHTNING_NOISE:
                item.add_marker(pytest.mark.filterwarnings(spec))


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_runs(request):
    """Tiny models gain nothing from intra-op threads, and on a busy machine every parallel op
    can wait milliseconds for a descheduled thread; the Lightning tests run single-threaded."""
    if Path(str(request.node.fspath)).name not in LIGHTNING_TESTS:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_tiny_corpus(folder: Path, n_docs: int = 40, seed: int = 0) -> Path:
    """``n_docs`` small plain-text documents with learnable structure (a few hundred bytes each)."""
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = [f"{j}: {' '.join(rng.choice(words) for _ in range(6))}." for j in range(8 + i % 5)]
        (folder / f"doc{i:02d}.txt").write_text(f"# document {i}\n" + "\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus") / "docs")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token-cache")


def tiny_args(root: Path, corpus: Path, cache: Path, *, steps: int = 4, extra: tuple[str, ...] = ()) -> list[str]:
    """Settings for a tiny, fast run (model "tiny", seq_len 64) below ``root``; append to a subcommand."""
    return [
        "--seed_everything", "0",
        "--data.data_path", str(corpus),
        "--data.cache_dir", str(cache),
        "--data.seq_len", "64",
        "--data.batch_size", "4",
        "--data.val_fraction", "0.2",
        "--data.test_fraction", "0.2",
        "--data.val_samples", "6",
        "--model.warmup_steps", "1",
        "--trainer.max_steps", str(steps),
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "1",
        "--trainer.default_root_dir", str(root),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.log_every_n_steps", "1",
        *extra,
    ]
