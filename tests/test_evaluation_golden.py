"""`evaluate` on a fixed checkpoint gives the numbers recorded before the evaluation code moved.

The checkpoint is a seeded, untrained tiny LongNetLM (byte tokenizer) saved by a Trainer; the data
are twelve seeded "copy" documents. The constants below were computed by the evaluation code as it
was before the checkpoint/evaluation refactor; any change to the windows, the loading of the
weights or the sums shows up here.
"""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from longnet_lightning.evaluation.command import main
from longnet_lightning.lm import LongNetLM

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

# (extra flags; "--pack_documents" was "--pack") -> {context_length: (scored targets, perplexity, bits per byte)}
GOLDEN = {
    (): {16: (1498, 350.5411891692383, 8.45344016302314), 64: (1498, 367.0162448872676, 8.51970011088033)},
    ("--stride", "8"): {16: (1498, 357.5521414582634, 8.482009833730254),
                        64: (1498, 372.98146110302633, 8.542960113447153)},
    ("--pack_documents",): {16: (1521, 364.024596259144, 8.575549316717442), 64: (1521, 370.079470916768, 8.599537749993901)},
}


def fixed_checkpoint(root):
    """(documents .jsonl, checkpoint path): both fully determined by their seeds."""
    rng = np.random.default_rng(7)
    letters = np.frombuffer(b"abcdefghijklmnop", dtype=np.uint8)
    docs = root / "docs.jsonl"
    docs.write_text("".join(
        json.dumps({"text": np.resize(rng.choice(letters, size=16), int(n)).tobytes().decode()}) + "\n"
        for n in rng.integers(20, 200, size=12)))
    torch.manual_seed(0)
    lm = LongNetLM(model="tiny", vocab_size=257, seq_len=64)
    lm.tokenizer_spec = {"kind": "byte"}
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root)
    one = [{"input_ids": torch.zeros(8, dtype=torch.long), "labels": torch.zeros(8, dtype=torch.long)}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.validate(lm, torch.utils.data.DataLoader(one), verbose=False)  # attaches the trainer
        trainer.save_checkpoint(root / "tiny.ckpt")
    return docs, root / "tiny.ckpt"


@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    docs, ckpt = fixed_checkpoint(root)
    return root, docs, ckpt


@pytest.mark.parametrize("extra", list(GOLDEN), ids=lambda e: " ".join(e) or "plain")
def test_evaluate_gives_the_recorded_numbers(fixed, extra, tmp_path):
    root, docs, ckpt = fixed
    out = tmp_path / "eval"
    code = main(["--no_progress", "--ckpt_path", str(ckpt), "--data_path", str(docs), "--context_lengths", "16", "64",
                 "--out_dir", str(out), "--cache_dir", str(root / "cache"), *extra])
    assert code == 0
    results = json.loads((out / "results.json").read_text())["models"][0]["results"]
    protocol = "sliding" if "--stride" in extra else "non-overlapping"  # --stride adds sliding windows beside
    got = {r["context_length"]: (r["tokens"], r["perplexity"], r["bits_per_byte"])
           for r in results if r["protocol"] == protocol}
    assert set(got) == set(GOLDEN[extra])
    for c, (tokens, ppl, bpb) in GOLDEN[extra].items():
        assert got[c][0] == tokens
        assert got[c][1] == pytest.approx(ppl, rel=1e-6, abs=1e-6)
        assert got[c][2] == pytest.approx(bpb, rel=1e-6, abs=1e-6)


def test_evaluation_imports_neither_the_cli_nor_the_lightning_module(fixed, tmp_path):
    """A whole `evaluate` run, in a fresh interpreter, never imports longnet_lightning.cli or .lm."""
    root, docs, ckpt = fixed
    argv = ["--no_progress", "--ckpt_path", str(ckpt), "--data_path", str(docs), "--context_lengths", "16",
            "--out_dir", str(tmp_path / "eval"), "--cache_dir", str(root / "cache")]
    code = (
        "import sys\n"
        "import longnet_lightning.evaluation\n"
        "from longnet_lightning.evaluation.command import main\n"
        f"assert main({argv!r}) == 0\n"
        "bad = sorted(m for m in sys.modules if m in ('longnet_lightning.cli', 'longnet_lightning.lm'))\n"
        "print('IMPORTED', bad)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "IMPORTED []" in proc.stdout, proc.stdout
    assert (tmp_path / "eval" / "results.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("nproc, extra", [(2, ()), (3, ("--stride", "8"))])
def test_evaluate_over_a_sequence_group_gives_the_same_numbers(fixed, tmp_path, nproc, extra):
    """``torchrun`` with ``nproc`` CPU processes: every window split over the ranks, the numbers of
    one process (each rank holds a chunk of each window; the NLL sums are added up)."""
    import os

    root, docs, ckpt = fixed
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "longnet_lightning", "evaluate", "--no_progress", "--ckpt_path", str(ckpt), "--data_path", str(docs),
           "--context_lengths", "16", "64", "--out_dir", str(out), "--cache_dir", str(root / "cache"),
           "--device", "cpu", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())["models"][0]["results"]
    protocol = "sliding" if "--stride" in extra else "non-overlapping"
    for r in (r for r in results if r["protocol"] == protocol):
        tokens, ppl, bpb = GOLDEN[extra][r["context_length"]]
        assert r["tokens"] == tokens
        assert r["perplexity"] == pytest.approx(ppl, rel=1e-6) and r["bits_per_byte"] == pytest.approx(bpb, rel=1e-6)
