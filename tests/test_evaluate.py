"""`evaluate`: exact sums, loss by position, the written outputs, bad input (the windows: test_data_windows)."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from longnet_lightning.data import LongTextDataModule
from longnet_lightning.evaluation.command import main
from longnet_lightning.evaluation import (
    EvaluationError,
    bucket_edges,
    context_label,
    evaluate_perplexity,
    max_context_length,
)
from longnet_lightning.lm import LongNetLM
from longnet_lightning.model import LongNet, LongNetConfig

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

PERIOD = 16  # the copy documents repeat a random block of this many letters
LETTERS = np.frombuffer(b"abcdefghijklmnop", dtype=np.uint8)


def copy_text(rng: np.random.Generator, n: int) -> str:
    """A random block of PERIOD letters, repeated to n characters: predictable after PERIOD tokens."""
    return np.resize(rng.choice(LETTERS, size=PERIOD), n).tobytes().decode()


# ----------------------------------------------------------------------------- the window protocol


def test_bucket_edges_are_log_spaced_and_end_at_the_context():
    assert bucket_edges(2048).tolist() == [2**k for k in range(12)]
    assert bucket_edges(3000).tolist() == [2**k for k in range(12)] + [3000]
    assert bucket_edges(1).tolist() == [1]
    two = bucket_edges(64, per_octave=2).tolist()
    assert two[0] == 1 and two[-1] == 64 and two == sorted(set(two)) and len(two) > len(bucket_edges(64))
    assert context_label(2048) == "2K" and context_label(2**20) == "1M" and context_label(3000) == "3000"


# ----------------------------------------------------------------------------- exact sums


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    return LongNet(LongNetConfig()).eval()  # tiny: dilated, segments 32/64/128


def test_perplexity_is_exp_mean_nll_over_exactly_the_counted_tokens(tiny_net):
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 257, size=n) for n in (0, 1, 2, 5, 31, 64, 65, 100, 250)]
    token_bytes = rng.integers(0, 4, size=257)  # unequal bytes per token, so the byte count is checked
    targets = sum(max(len(d) - 1, 0) for d in docs)
    target_bytes = sum(int(token_bytes[d[1:]].sum()) for d in docs)
    for c, s in [(16, None), (16, 5), (64, 64), (24, 1), (300, None)]:
        res = evaluate_perplexity(tiny_net, docs, c, s, token_bytes=token_bytes, batch_size=3, progress=False)
        assert res.tokens == targets and res.bytes == target_bytes
        assert res.documents == 7 and res.short_documents == sum(2 <= len(d) < c + 1 for d in docs)
        assert math.isclose(res.perplexity, math.exp(res.nll_sum / targets), rel_tol=1e-12)
        assert math.isclose(res.bits_per_byte, res.nll_sum / math.log(2) / target_bytes, rel_tol=1e-12)
        buckets = res.buckets()
        assert sum(b["count"] for b in buckets) == targets
        assert math.isclose(sum(b["nll_sum"] for b in buckets), res.nll_sum, rel_tol=1e-9)
        # other batchings pad differently (batch_size=1: not at all); the sums must not change
        other = evaluate_perplexity(tiny_net, docs, c, s, batch_size=1 if s != 1 else 64, progress=False)
        assert math.isclose(other.nll_sum, res.nll_sum, rel_tol=1e-5)
        assert (other.position_count == res.position_count).all()
    # a context longer than every document: each document is one window, scored by the model directly
    with torch.no_grad():
        direct = sum(float(tiny_net.loss(torch.as_tensor(d[None, :-1]), torch.as_tensor(d[None, 1:]),
                                         reduction="sum")) for d in docs if len(d) >= 2)
    assert math.isclose(res.nll_sum, direct, rel_tol=1e-5)
    assert res.short_documents == res.documents and res.windows == res.documents


def test_evaluate_perplexity_input_errors(tiny_net):
    docs = [np.arange(50) % 257]
    with pytest.raises(EvaluationError, match="stride 9 must be between 1 and the context length 8"):
        evaluate_perplexity(tiny_net, docs, 8, 9, progress=False)
    with pytest.raises(EvaluationError, match="token_bytes: the tokenizer has vocab_size=3 but the model vocab_size=257"):
        evaluate_perplexity(tiny_net, docs, 8, token_bytes=[1, 1, 1], progress=False)
    dense = LongNet(LongNetConfig(attention="dense"))
    assert max_context_length(dense)[0] == 70001 and max_context_length(tiny_net)[0] is None
    with pytest.raises(EvaluationError, match="works up to 70001 positions"):
        evaluate_perplexity(dense, docs, 80000, progress=False)


# ----------------------------------------------------------------------------- checkpoints and the CLI


def fit_checkpoint(path, datamodule, attention: str, steps: int) -> str:
    """Train a tiny LongNetLM for `steps` steps on the data module and save a real checkpoint."""
    torch.manual_seed(0)
    lm = LongNetLM(model="tiny", attention=attention, lr=3e-3, min_lr=3e-4, warmup_steps=min(10, steps - 1) or 0)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                        limit_val_batches=0, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(lm, datamodule=datamodule)
        trainer.save_checkpoint(path)
    return str(path)


@pytest.fixture(scope="module")
def copy_setup(tmp_path_factory):
    """Copy documents, a LongNet trained on them (200 steps, ~8 s) and a dense baseline (1 step).

    500 documents, so the model learns to copy rather than memorise blocks; 10% are held out.
    """
    root = tmp_path_factory.mktemp("copy")
    rng = np.random.default_rng(0)
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": copy_text(rng, int(rng.integers(150, 400)))}) + "\n"
                            for _ in range(500)))
    dm = dict(data_path=str(docs), seq_len=64, batch_size=16, val_fraction=0.0, test_fraction=0.1,
              cache_dir=str(root / "cache"), pack_documents=True, samples_per_epoch=10_000)
    longnet = fit_checkpoint(root / "longnet.ckpt", LongTextDataModule(**dm), "dilated", 200)
    dense = fit_checkpoint(root / "dense.ckpt", LongTextDataModule(**{**dm, "seq_len": 16}), "dense", 1)
    return {"root": root, "docs": docs, "longnet": longnet, "dense": dense, "cache": str(root / "cache")}


def run_cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--no_progress", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_copy_text_table_csv_png_agree(copy_setup, capsys, tmp_path):
    out = tmp_path / "eval"
    code, stdout, stderr = run_cli(capsys, "--ckpt_path", copy_setup["longnet"], copy_setup["dense"],
                                   "--context_lengths", 8, 64, "--out_dir", out, "--cache_dir", copy_setup["cache"])
    assert code == 0, stderr
    report = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in report["models"]] == ["LongNet 64", "Transformer 16"]
    assert report["data"]["split"] == "test"  # no --data: the checkpoint's own held-out test split
    assert "test split" in report["data"]["description"] and report["data"]["documents"] >= 5
    longnet = {r["context_length"]: r for r in report["models"][0]["results"]}

    # the copy structure: once the window holds one period, the next letters are predictable
    b64 = longnet[64]["buckets"]
    early = [b for b in b64 if b["end"] <= PERIOD]
    late = [b for b in b64 if b["start"] > PERIOD]
    mean = lambda bs: sum(b["mean_nll"] * b["count"] for b in bs) / sum(b["count"] for b in bs)  # noqa: E731
    assert mean(late) < 0.5 * mean(early), (early, late)
    assert longnet[64]["perplexity"] < 0.7 * longnet[8]["perplexity"]  # more context helps this text

    # every column scores the same targets; perplexity = exp(mean NLL) over exactly those
    for m in report["models"]:
        assert len({(r["tokens"], r["bytes"]) for r in m["results"]}) == 1
        for r in m["results"]:
            assert math.isclose(r["perplexity"], math.exp(r["nll_sum"] / r["tokens"]), rel_tol=1e-12)
            assert math.isclose(r["mean_nll"], r["nll_sum"] / r["tokens"], rel_tol=1e-12)

    # table.md and the printed table hold the results' numbers
    table = (out / "table.md").read_text()
    for m in report["models"]:
        row = next(line for line in table.splitlines() if line.startswith(f"| {m['name']} |"))
        cells = [f"{r['perplexity']:.3f} [{r['interval']['low']:.3f}, {r['interval']['high']:.3f}]"
                 for r in m["results"]]
        assert row.split(" | ")[2:] == cells[:-1] + [cells[-1] + " |"]
        assert all(r["interval"]["low"] <= r["perplexity"] <= r["interval"]["high"] for r in m["results"])
        assert row in stdout
    assert "Protocol:" in table and "shorter window" in table

    # the CSV holds every bucket of results.json, and its buckets add up to each mean NLL
    with open(out / "loss_by_position.csv") as f:
        rows = list(csv.DictReader(f))
    expect = [(m["name"], r["context_length"], b["start"], b["end"], b["count"])
              for m in report["models"] for r in m["results"] for b in r["buckets"]]
    assert [(r["model"], int(r["context_length"]), int(r["bucket_start"]), int(r["bucket_end"]), int(r["count"]))
            for r in rows] == expect
    for m in report["models"]:
        for r in m["results"]:
            mine = [x for x in rows if x["model"] == m["name"] and int(x["context_length"]) == r["context_length"]]
            assert sum(int(x["count"]) for x in mine) == r["tokens"]
            weighted = sum(float(x["mean_nll"]) * int(x["count"]) for x in mine) / r["tokens"]
            assert math.isclose(weighted, r["mean_nll"], rel_tol=1e-9)

    # the PNG is a real image whose plotted series are the CSV's (model, context) groups
    from PIL import Image

    with Image.open(out / "loss_by_position.png") as img:
        assert img.format == "PNG" and img.size[0] > 400
        series = json.loads(img.text["Description"])
    groups = {}
    for r in rows:
        key = (r["model"], int(r["context_length"]))
        groups[key] = groups.get(key, 0) + 1
    assert {(s["model"], s["context_length"]): s["points"] for s in series} == groups


def test_cli_jsonl_data_stride_and_max_tokens_are_reported(copy_setup, capsys, tmp_path):
    rng = np.random.default_rng(5)
    data = tmp_path / "held_out.jsonl"
    data.write_text("\n".join(json.dumps({"body": copy_text(rng, n)}) for n in (300, 200, 40, 500)) + "\n")
    out = tmp_path / "eval"
    code, stdout, stderr = run_cli(capsys, "--ckpt_path", copy_setup["longnet"], "--names", "mine", "--data_path", data,
                                   "--text_field", "body", "--context_lengths", 32, 128, "--stride", 16,
                                   "--max_tokens", 700, "--out_dir", out, "--cache_dir", copy_setup["cache"])
    assert code == 0, stderr
    report = json.loads((out / "results.json").read_text())
    m = report["models"][0]
    assert m["cap"] == {"max_tokens": 700, "tokens_used": 700, "tokens_available": 1040,
                        "documents_used": 4, "documents_available": 4}  # 300 + 200 + 40 + the first 160 of 500
    assert all(r["tokens"] == 299 + 199 + 39 + 159 for r in m["results"])
    assert {(r["protocol"], r["context_length"], r["stride"]) for r in m["results"]} == {
        ("non-overlapping", 32, 32), ("non-overlapping", 128, 128), ("sliding", 32, 16), ("sliding", 128, 16)}
    assert "reading 700 of 1,040 tokens" in stderr and "700 of 1,040 tokens read" in (out / "table.md").read_text()
    assert "context 128: 1 of 4 documents have fewer than 129 tokens" in stderr  # the 40-token one, reported
    assert "context 32:" not in stderr
    assert [r["short_documents"] for r in m["results"]] == [0, 1, 0, 1]
    assert "sliding windows" in report["protocol"]["description"]


# ----------------------------------------------------------------------------- bad input


def error_of(capsys, *args) -> str:
    code, stdout, stderr = run_cli(capsys, *args)
    assert code == 2, (stdout, stderr)
    assert stderr.startswith("error: ") and "Traceback" not in stderr
    return stderr


def test_bad_checkpoints_are_one_line_errors(copy_setup, capsys, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello " * 100)
    foreign = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "pytorch-lightning_version": "2.6.0"}, foreign)
    common = ("--data_path", text, "--context_lengths", 16, "--out_dir", tmp_path / "o", "--cache_dir", copy_setup["cache"])
    assert "is not a PyTorch checkpoint" in error_of(capsys, "--ckpt_path", text, *common)
    assert "does not exist" in error_of(capsys, "--ckpt_path", tmp_path / "missing.ckpt", *common)
    assert "not one of a LongNetLM" in error_of(capsys, "--ckpt_path", foreign, *common)
    raw = torch.load(copy_setup["longnet"], map_location="cpu", weights_only=True)
    raw["tokenizer_spec"] = None  # as saved by a run whose data module had no tokenizer
    torch.save(raw, tmp_path / "no-tokenizer.ckpt")
    assert "--tokenizer byte" in error_of(capsys, "--ckpt_path", tmp_path / "no-tokenizer.ckpt", *common)
    assert not (tmp_path / "o").exists()
    code, _, stderr = run_cli(capsys, "--ckpt_path", tmp_path / "no-tokenizer.ckpt", "--tokenizer", "byte", *common)
    assert code == 0, stderr


def test_bad_lengths_and_short_text_are_one_line_errors(copy_setup, capsys, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("x" * 50)  # 50 tokens: no window of 64 fits
    base = ("--data_path", short, "--out_dir", tmp_path / "o", "--cache_dir", copy_setup["cache"])
    msg = error_of(capsys, "--ckpt_path", copy_setup["longnet"], "--context_lengths", 64, 256, *base)
    assert "shorter than the shortest context length 64" in msg and "at most 49" in msg
    msg = error_of(capsys, "--ckpt_path", copy_setup["dense"], "--context_lengths", 16, 100000, *base)
    assert "cannot take context length(s) [100000]" in msg and "at most 70001" in msg
    msg = error_of(capsys, "--ckpt_path", copy_setup["longnet"], "--context_lengths", 8, 16, "--stride", 12, *base)
    assert "--stride 12 is longer than the context length 8" in msg
    msg = error_of(capsys, "--ckpt_path", copy_setup["longnet"], "--names", "a", "b", "--context_lengths", 8, *base)
    assert "2 names for 1 checkpoints" in msg
    with pytest.raises(SystemExit) as e:  # argparse: usage and a one-line error, status 2
        run_cli(capsys, "--ckpt_path", copy_setup["longnet"], "--context_lengths", 0, *base)
    assert e.value.code == 2 and "must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_module_entry_point_reports_bad_input_without_traceback(tmp_path):
    bogus = tmp_path / "model.ckpt"
    bogus.write_bytes(b"\x00not a checkpoint")
    proc = subprocess.run([sys.executable, "-m", "longnet_lightning", "evaluate", "--ckpt_path", str(bogus),
                           "--data_path", str(bogus), "--context_lengths", "8"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_contexts_beyond_the_models_reach_are_named_and_marked(tmp_path, capsys):
    """A context longer than the longest segment (or the training length) gets a note, in the
    log and in table.md; the plot marks both lengths and shows the targets per bucket."""
    from test_evaluation_golden import fixed_checkpoint

    docs, ckpt = fixed_checkpoint(tmp_path)
    longest = max(LongNetLM.load_from_checkpoint(ckpt).config.segment_lengths)
    out = tmp_path / "eval"
    code, _, stderr = run_cli(capsys, "--ckpt_path", ckpt, "--data_path", docs, "--context_lengths", 32, 2 * longest,
                              "--out_dir", out, "--cache_dir", tmp_path / "cache", "--pack_documents")
    assert code == 0, stderr
    assert f"exceeds its longest segment {longest:,}" in stderr and "never crosses a segment boundary" in stderr
    assert "exceeds its training length 64 (seq_len)" in stderr
    assert "exceeds its longest segment" in (out / "table.md").read_text()
    report = json.loads((out / "results.json").read_text())
    assert report["models"][0]["longest_segment"] == longest
    from PIL import Image

    with Image.open(out / "loss_by_position.png") as img:
        markers = json.loads(img.text["Markers"])
    assert {(m["kind"], m["position"]) for m in markers} == {("training length", 64), ("longest segment", longest)}


def test_a_run_folder_is_its_newest_last_checkpoint(tmp_path, capsys):
    import shutil

    from test_evaluation_golden import fixed_checkpoint

    docs, ckpt = fixed_checkpoint(tmp_path)
    run = tmp_path / "run" / "lightning_logs" / "version_3" / "checkpoints"
    run.mkdir(parents=True)
    shutil.copy(ckpt, run / "last.ckpt")
    code, _, stderr = run_cli(capsys, "--ckpt_path", tmp_path / "run", "--data_path", docs, "--context_lengths", 32,
                              "--out_dir", tmp_path / "eval", "--cache_dir", tmp_path / "cache", "--pack_documents")
    assert code == 0, stderr
    assert "using the newest last.ckpt" in stderr and "version_3" in stderr
    code, _, stderr = run_cli(capsys, "--ckpt_path", tmp_path / "run" / "lightning_logs", "--data_path", docs)
    assert code == 2 and "no last.ckpt found in that folder" in stderr


# ----------------------------------------------------------------------------- documents, intervals, patterns


def test_per_document_sums_are_each_document_scored_alone(tiny_net):
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 257, size=n) for n in (1, 40, 97, 200)]
    res = evaluate_perplexity(tiny_net, docs, 32, 8, batch_size=5, progress=False)
    assert res.document_tokens.tolist() == [0, 39, 96, 199]
    assert math.isclose(res.document_nll.sum(), res.nll_sum, rel_tol=1e-9)
    for i, d in enumerate(docs):
        alone = evaluate_perplexity(tiny_net, [d], 32, 8, batch_size=1, progress=False)
        assert math.isclose(res.document_nll[i], alone.nll_sum, rel_tol=1e-5, abs_tol=1e-9)


def test_bootstrap_intervals_are_paired_seeded_and_contain_the_estimate():
    from longnet_lightning.evaluation.intervals import (
        perplexity_interval, relative_difference, resample_weights, resampled_perplexity)

    rng = np.random.default_rng(0)
    tokens = rng.integers(100, 1000, size=30).astype(float)
    nll = tokens * rng.uniform(1.0, 2.0, size=30)
    w = resample_weights(30, 500, seed=1)
    assert w.shape == (500, 30) and (w.sum(1) == 30).all()
    assert (w == resample_weights(30, 500, seed=1)).all() and not (w == resample_weights(30, 500, seed=2)).all()
    idx = np.repeat(np.arange(30), w[7].astype(int))  # resample 7 as an explicit draw of documents
    assert math.isclose(resampled_perplexity(nll, tokens, w)[7], math.exp(nll[idx].sum() / tokens[idx].sum()))
    iv = perplexity_interval(nll, tokens, w)
    assert iv["low"] < iv["estimate"] < iv["high"] and iv["estimate"] == pytest.approx(math.exp(nll.sum() / tokens.sum()))
    flat = perplexity_interval(tokens * 1.5, tokens, w)  # every document alike: no spread
    assert flat["low"] == pytest.approx(flat["high"]) == pytest.approx(math.exp(1.5))
    same = relative_difference((nll, tokens), (nll, tokens), w)
    assert same["percent"] == 0 and same["low"] == same["high"] == 0 and not same["excludes_zero"]
    better = relative_difference((nll, tokens), (nll - 0.01 * tokens * rng.uniform(0.5, 1.5, 30), tokens), w)
    assert better["high"] < 0 and better["excludes_zero"] and better["low"] < better["percent"] < better["high"]
    # paired: a shift shared by both sides cancels, so the interval is narrower than unpaired ones
    wide = perplexity_interval(nll, tokens, w)
    assert better["high"] - better["low"] < 100 * (wide["high"] - wide["low"]) / wide["estimate"]
    with pytest.raises(ValueError, match="same documents"):
        relative_difference((nll, tokens), (nll[:5], tokens[:5]), w)


def test_cli_patterns_document_selection_and_combined_reports(copy_setup, capsys, tmp_path):
    """--patterns trained capped: one row each, shared numbers where the branches are the same;
    --min/--max_document_tokens select and cut documents; --from_results of two one-model
    evaluations equals one evaluation of both models, intervals and paired differences included."""
    base = ("--data_path", copy_setup["docs"], "--split", "test", "--test_fraction", "0.1", "--val_fraction", "0.0",
            "--cache_dir", copy_setup["cache"], "--min_document_tokens", 200, "--max_document_tokens", 300,
            "--context_lengths", 32, 64, 128, "--stride", "c/4", "--bootstrap_resamples", 300)
    both = tmp_path / "both"
    code, stdout, stderr = run_cli(capsys, "--ckpt_path", copy_setup["longnet"], copy_setup["dense"],
                                   "--patterns", "trained", "capped", "32,64:1,2", "--out_dir", both, *base)
    assert code == 0, stderr
    report = json.loads((both / "results.json").read_text())
    names = [m["name"] for m in report["models"]]
    assert names == ["LongNet 64", "LongNet 64, capped at 64", "LongNet 64, w 32,64 r 1,2", "Transformer 16"]
    assert "dense attention has no pattern; capped, 32,64:1,2 not applied" in stderr
    trained, capped, explicit, dense = report["models"]
    assert trained["segment_lengths"] == [32, 64, 128] and capped["segment_lengths"] == [32, 64, 64]
    assert capped["trained_pattern"] == {"segment_lengths": [32, 64, 128], "dilation_rates": [1, 2, 4]}
    key = lambda r: (r["protocol"], r["context_length"])  # noqa: E731
    t, c = {key(r): r for r in trained["results"]}, {key(r): r for r in capped["results"]}
    for k in t:  # up to the training length the capped pattern runs the same branches
        if k[1] <= 64:
            assert c[k]["same_as"] == "LongNet 64" and c[k]["nll_sum"] == t[k]["nll_sum"]
        else:
            assert "same_as" not in c[k] and c[k]["nll_sum"] != t[k]["nll_sum"]
    # the capped row is the model built with the capped pattern
    from longnet_lightning.checkpoint import build_model, model_config, read_checkpoint
    import dataclasses

    raw = read_checkpoint(copy_setup["longnet"])
    net = build_model(raw, config=dataclasses.replace(model_config(raw), segment_lengths=[32, 64, 64]))
    sel = report["data"]["selection"]
    assert sel["min_document_tokens"] == 200 and sel["max_document_tokens"] == 300 and sel["documents"] >= 3
    assert all(200 <= n <= 300 for n in report["data"]["scored_documents"]["tokens"])
    assert f"{sel['documents']} of {sel['documents_before']} documents" in report["data"]["description"]
    from longnet_lightning.data.tokenizers import build_tokenizer

    tok = build_tokenizer("byte")
    from longnet_lightning.data.cache import Corpus, SplitSpec, build_token_cache

    cache = build_token_cache(Corpus.from_paths(str(copy_setup["docs"])), tok, SplitSpec(0.0, 0.1, 1234),
                              copy_setup["cache"])
    split = cache.split("test")
    tokens = split.tokens()
    docs = [tokens[o:o + n][:300] for o, n in zip(split.offsets.tolist(), split.lengths.tolist()) if n >= 200]
    direct = evaluate_perplexity(net, docs, 128, None, progress=False)
    assert math.isclose(direct.nll_sum, c[("non-overlapping", 128)]["nll_sum"], rel_tol=1e-6)
    # sliding windows beside non-overlapping ones: a quarter of each context
    assert {(r["protocol"], r["context_length"], r["stride"]) for r in trained["results"]} == {
        ("non-overlapping", 32, 32), ("non-overlapping", 64, 64), ("non-overlapping", 128, 128),
        ("sliding", 32, 8), ("sliding", 64, 16), ("sliding", 128, 32)}
    # paired comparisons: every pair of contexts of each row, every pair of rows at each context
    comp = report["comparisons"]
    assert len(comp["contexts"]) == 4 * 2 * 3 and len(comp["models"]) == 6 * 2 * 3
    d = next(x for x in comp["contexts"] if x["model"] == "LongNet 64" and x["protocol"] == "non-overlapping"
             and (x["from"], x["to"]) == (32, 64))
    r32, r64 = t[("non-overlapping", 32)], t[("non-overlapping", 64)]
    assert d["percent"] == pytest.approx(100 * (r64["perplexity"] / r32["perplexity"] - 1))
    assert d["low"] <= d["percent"] <= d["high"]
    table = (both / "table.md").read_text()
    assert "## Sliding windows" in table and "32 → 64" in table and "vs LongNet 64" in table
    assert "LongNet 64, capped at 64" in stdout

    # the same, evaluated separately and combined
    parts = []
    for ckpt, patterns in ((copy_setup["longnet"], ("trained", "capped", "32,64:1,2")), (copy_setup["dense"], ())):
        out = tmp_path / f"part{len(parts)}"
        code, _, stderr = run_cli(capsys, "--ckpt_path", ckpt, "--out_dir", out, *base,
                                  *(("--patterns", *patterns) if patterns else ()))
        assert code == 0, stderr
        parts.append(out / "results.json")
    code, _, stderr = run_cli(capsys, "--from_results", *parts, "--bootstrap_resamples", 300,
                              "--out_dir", tmp_path / "combined")
    assert code == 0, stderr
    combined = json.loads((tmp_path / "combined" / "results.json").read_text())
    assert [m["name"] for m in combined["models"]] == names
    assert combined["comparisons"] == report["comparisons"]
    for a, b in zip(combined["models"], report["models"]):
        assert [r["interval"] for r in a["results"]] == [r["interval"] for r in b["results"]]

    # bad input: one line each
    other = tmp_path / "other"
    code, _, stderr = run_cli(capsys, "--ckpt_path", copy_setup["dense"], "--out_dir", other,
                              *base[:-8], "--min_document_tokens", 250, "--context_lengths", 32, 64, 128,
                              "--stride", "c/4")
    assert code == 0, stderr
    msg = error_of(capsys, "--from_results", parts[0], other / "results.json", "--out_dir", tmp_path / "x")
    assert "scored other documents" in msg
    assert "not both" in error_of(capsys, "--ckpt_path", copy_setup["dense"], "--from_results", parts[0])
    assert "does not exist" in error_of(capsys, "--from_results", tmp_path / "nope.json")
    assert "no document is that long" in error_of(capsys, "--ckpt_path", copy_setup["dense"], *base[:-8],
                                                  "--min_document_tokens", 10**6, "--context_lengths", 32)
    with pytest.raises(SystemExit):
        run_cli(capsys, "--ckpt_path", copy_setup["dense"], "--patterns", "bogus")
    assert "is not a pattern" in capsys.readouterr().err


# ----------------------------------------------------------------------------- resuming


def _without_timings(report: dict) -> dict:
    """A report without what differs between runs of the same numbers: when, how, how long."""
    out = {k: v for k, v in report.items() if k not in ("created", "command")}
    out["models"] = [{**m, "results": [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_second")}
                                       for r in m["results"]]} for m in report["models"]]
    return out


def test_an_interrupted_evaluation_resumes_to_the_report_of_an_uninterrupted_one(copy_setup, capsys, tmp_path,
                                                                                 monkeypatch):
    """Killed during its third result, the same command with --resume computes only the results
    not yet kept, and writes the report an uninterrupted run writes; a result whose settings
    differ (here the batching) is computed again, and a line cut short is skipped."""
    import longnet_lightning.evaluation.command as command

    args = ("--ckpt_path", copy_setup["longnet"], copy_setup["dense"], "--context_lengths", 16, 64,
            "--cache_dir", copy_setup["cache"], "--bootstrap_resamples", 200)
    code, _, stderr = run_cli(capsys, *args, "--out_dir", tmp_path / "whole")
    assert code == 0, stderr
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())

    real, calls = command.evaluate_perplexity, []

    def counted(*a, **k):
        calls.append(a[2])  # the context length
        if stop_at is not None and len(calls) == stop_at:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(command, "evaluate_perplexity", counted)
    out, stop_at = tmp_path / "cut", 3
    with pytest.raises(KeyboardInterrupt):
        run_cli(capsys, *args, "--out_dir", out)
    assert len((out / command.CELLS).read_text().splitlines()) == 2 and not (out / "results.json").exists()

    calls.clear()
    stop_at = None
    code, _, stderr = run_cli(capsys, *args, "--out_dir", out, "--resume")
    assert code == 0, stderr
    assert len(calls) == 2 and stderr.count("(finished by the interrupted run)") == 2, stderr
    assert "resume: 2 finished result(s)" in stderr
    assert _without_timings(json.loads((out / "results.json").read_text())) == _without_timings(whole)

    calls.clear()
    with open(out / command.CELLS, "a") as f:
        f.write('{"key": "cut sh')  # a write the interruption cut short
    code, _, stderr = run_cli(capsys, *args, "--out_dir", out, "--resume", "--batch_size", 2)
    assert code == 0, stderr
    assert len(calls) == 4 and "1 unreadable line(s) skipped" in stderr  # other batching: nothing taken
    calls.clear()
    code, _, stderr = run_cli(capsys, *args, "--out_dir", out)  # without --resume: a fresh run
    assert code == 0 and len(calls) == 4, stderr
    assert "--out_dir of the interrupted run" in error_of(capsys, *args, "--resume")
