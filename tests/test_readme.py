"""Every ```python block of README.md runs as written, at tiny sizes.

The only changes made before running are the substitutions in ``TINY`` (sizes, step counts,
and the user's data folder, which becomes a small generated corpus). Each one must still occur
in the README, so the mapping cannot silently go stale. A block whose first line is
``# not run by tests/test_readme.py`` would be skipped; none is today.
"""
from __future__ import annotations

import re

import pytest

from conftest import REPO, write_tiny_corpus

SKIP_MARK = "# not run by tests/test_readme.py"

# README text -> what runs here (same code, smaller numbers).
TINY = {
    "10_000": "300",                            # sequence length of the attention example
    '"125M"': '"tiny"',                         # model preset
    "(1, 4097)": "(1, 257)",                    # tokens of the model example
    '"data/books/"': "DATA",                    # the user's corpus: a generated one (bound below)
    "bpe_vocab_size=16384": "bpe_vocab_size=300",
    "seq_len=8192": "seq_len=64",
    "max_steps=1000": "max_steps=2",
    "max_steps=2000": "max_steps=2",
    "warmup_steps=100": "warmup_steps=1",
    "max_new_tokens=100": "max_new_tokens=5",
}


def python_blocks() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


BLOCKS = python_blocks()


def test_readme_has_python_blocks_and_every_substitution_applies():
    assert len(BLOCKS) >= 3
    readme = "\n".join(BLOCKS)
    stale = [old for old in TINY if old not in readme]
    assert not stale, f"TINY names text no longer in README.md's python blocks: {stale}"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")  # Lightning's advice on tiny CPU runs is not what this checks
@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i}")
def test_readme_block_runs(index, tmp_path, monkeypatch):
    code = BLOCKS[index]
    if code.startswith(SKIP_MARK):
        pytest.skip("marked as not runnable here")
    for old, new in TINY.items():
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)  # anything a snippet writes (lightning_logs/) lands here
    monkeypatch.setenv("LONGNET_CACHE", str(tmp_path / "cache"))
    namespace = {"__name__": "__readme__", "DATA": str(write_tiny_corpus(tmp_path / "docs", n_docs=60))}
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)
