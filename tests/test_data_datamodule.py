"""LongTextDataModule: settings, properties before setup, loaders, workers, warnings and BPE on train only."""

import logging

import numpy as np
import pytest
import torch

from jsonargparse import ArgumentParser

from longnet_lightning.data import IGNORE_INDEX, LongTextDataModule, SplitSpec, load_tokenizer, train_bpe


def write_corpus(folder, lengths=(300, 20, 500, 150, 5, 800, 260, 90, 410, 333, 12, 640)):
    folder.mkdir(parents=True, exist_ok=True)
    words = "alpha beta gamma delta épsilon ζῆτα 日本 ".split(" ")
    rng = np.random.default_rng(1)
    for i, n in enumerate(lengths):
        text = " ".join(rng.choice(words, size=n))[:n]
        (folder / f"doc{i:02d}.txt").write_text(text)
    return str(folder)


def make(tmp_path, **kw):
    kw = {"seq_len": 32, "batch_size": 4, "val_fraction": 0.25, "test_fraction": 0.2, "seed": 0, **kw}
    return LongTextDataModule(write_corpus(tmp_path / "corpus"), cache_dir=str(tmp_path / "cache"), **kw)


def batches(loader):
    return [{k: v.clone() for k, v in b.items()} for b in loader]


@pytest.mark.parametrize(
    "kw, setting",
    [
        ({"seq_len": 0}, "seq_len=0"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"num_workers": -1}, "num_workers=-1"),
        ({"val_fraction": 1.2}, "val_fraction=1.2"),
        ({"test_fraction": -0.5}, "test_fraction=-0.5"),
        ({"format": "csv"}, "format='csv'"),
        ({"errors": "ignore"}, "errors='ignore'"),
        ({"samples_per_epoch": 0}, "samples_per_epoch=0"),
        ({"val_samples": 0}, "val_samples=0"),
        ({"tokenizer": "bpe", "bpe_vocab_size": 100}, "bpe_vocab_size=100"),
    ],
)
def test_bad_settings_name_the_setting(kw, setting):
    with pytest.raises(ValueError, match=setting):
        LongTextDataModule(**kw)


def test_properties_before_setup(tmp_path):
    dm = LongTextDataModule(seq_len=64)  # default corpus, nothing read yet
    assert (dm.vocab_size, dm.seq_len) == (257, 64)
    assert dm.token_bytes.shape == (257,) and dm.token_bytes.sum() == 256
    assert LongTextDataModule(tokenizer="bpe", bpe_vocab_size=300).vocab_size == 300


def test_batches_and_exact_evaluation(tmp_path):
    dm = make(tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    train = next(iter(dm.train_dataloader()))
    assert set(train) == {"input_ids", "labels"}
    assert train["input_ids"].shape == train["labels"].shape == (4, 32) and train["input_ids"].dtype == torch.long
    assert (train["input_ids"][:, 1:] == train["labels"][:, :-1]).all()  # labels are inputs shifted by one
    assert (train["labels"] != IGNORE_INDEX).all()
    for name, loader in [("val", dm.val_dataloader()), ("test", dm.test_dataloader())]:
        split = dm._cache.split(name)
        scored = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in loader)
        assert len(split.names) > 0 and scored == int(np.maximum(split.lengths - 1, 0).sum()), name


def test_short_documents_are_reported_and_never_silently_dropped(tmp_path):
    dm = make(tmp_path, seq_len=200, val_fraction=0.0, test_fraction=0.0)
    skipped = r"5 of 12 training documents are shorter than seq_len \+ 1 = 201 tokens .*skipped \(\d+ tokens, [\d.]+% "
    with pytest.warns(UserWarning, match=skipped + ".*pack_documents=True"):
        dm.setup("fit")
    dm = make(tmp_path, seq_len=3000, val_fraction=0.0, test_fraction=0.0)
    nothing_fits = r"the longest training document has \d+ tokens; use a smaller seq_len or pack_documents=True"
    with pytest.raises(ValueError, match=nothing_fits):
        with pytest.warns(UserWarning):
            dm.setup("fit")
    packed = make(tmp_path, seq_len=3000, val_fraction=0.0, test_fraction=0.0, pack_documents=True)
    packed.setup("fit")
    x = next(iter(packed.train_dataloader()))["input_ids"]
    assert (x == packed.tokenizer.eos_id).any()  # windows run across documents, separated by EOS


def test_packed_evaluation_scores_the_whole_stream(tmp_path):
    dm = make(tmp_path, pack_documents=True)
    dm.setup("validate")
    split = dm._cache.split("val")
    scored = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in dm.val_dataloader())
    assert scored == split.n_tokens - 1


def test_samples_per_epoch_and_val_cap(tmp_path, caplog):
    dm = make(tmp_path, samples_per_epoch=10, val_samples=3)
    with caplog.at_level(logging.INFO):
        dm.setup("fit")
    assert len(dm.train_dataloader()) == 3  # 10 windows in batches of 4
    assert sum(len(b["labels"]) for b in dm.val_dataloader()) == 3
    total = dm.datasets["val"].total_windows
    assert f"using 3 of {total} windows" in caplog.text and total > 3
    default = make(tmp_path)
    default.setup("fit")
    tokens = int(default._cache.split("train").lengths.sum())
    assert len(default.train_dataloader().sampler) == tokens // 32


def test_workers_give_the_same_batches(tmp_path):
    dm = make(tmp_path, num_workers=0)
    dm.setup("fit")
    dm2 = make(tmp_path, num_workers=2)
    dm2.setup("fit")
    for a, b in [(dm.train_dataloader(), dm2.train_dataloader()), (dm.val_dataloader(), dm2.val_dataloader())]:
        xs, ys = batches(a), batches(b)
        assert len(xs) == len(ys) > 1
        for x, y in zip(xs, ys):
            assert all(torch.equal(x[k], y[k]) for k in x)


def test_train_batches_depend_on_seed_and_epoch_only(tmp_path):
    dm = make(tmp_path)
    dm.setup("fit")
    loader = dm.train_dataloader()
    epoch0 = batches(loader)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(epoch0, batches(loader)))
    loader.sampler.set_epoch(1)
    epoch1 = batches(loader)
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(epoch0, epoch1))
    other = make(tmp_path)  # a fresh module (another process) gives the same epoch-1 batches
    other.setup("fit")
    again = other.train_dataloader()
    again.sampler.set_epoch(1)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(epoch1, batches(again)))


def test_bpe_is_trained_on_the_training_split_only(tmp_path):
    spec = SplitSpec(0.25, 0.2, seed=0)
    names = [f"doc{i:02d}.txt" for i in range(12)]
    val_doc = next(n for n in names if spec.split_of(f"corpus/{n}") == 1)
    dm = make(tmp_path, tokenizer="bpe", bpe_vocab_size=290)
    (tmp_path / "corpus" / val_doc).write_text("zqxv " * 500)  # only in validation
    assert dm.vocab_size == 290
    dm.prepare_data()
    tok = dm.tokenizer
    assert tok.vocab_size == dm.vocab_size == 290 and dm.token_bytes.shape == (290,)
    assert len(tok.encode("zqxv zqxv")) >= 8  # never merged: unseen in training
    assert len(tok.encode("alpha beta")) <= 4  # frequent in training: merged
    assert dm._cache.index["bytes_exact"]
    again = make(tmp_path, tokenizer="bpe", bpe_vocab_size=290)
    assert again.tokenizer == tok  # read back from the cache, not retrained differently


def test_checkpoint_state_guards_the_tokenizer(tmp_path):
    dm = make(tmp_path)
    state = dm.state_dict()
    dm.load_state_dict(state)
    with pytest.raises(ValueError, match="tokenizer fingerprint 0123"):
        dm.load_state_dict({"tokenizer_fingerprint": "0123"})


def test_a_given_tokenizer_replaces_the_setting(tmp_path):
    bpe = train_bpe(["alpha beta gamma delta " * 50], 270)
    dm = make(tmp_path)
    dm.tokenizer = load_tokenizer(bpe.spec())  # e.g. the spec stored in a checkpoint
    dm.setup("fit")
    assert dm.vocab_size == 270 and dm._cache.index["tokenizer"] == bpe.fingerprint()
    assert int(next(iter(dm.train_dataloader()))["input_ids"].max()) < 270


def test_lightning_cli_can_parse_the_arguments():
    parser = ArgumentParser()
    parser.add_class_arguments(LongTextDataModule, "data")
    cfg = parser.parse_args(["--data.data_path=[a.txt, b/]", "--data.seq_len=128", "--data.val_samples=4"])
    assert cfg.data.data_path == ["a.txt", "b/"] and cfg.data.seq_len == 128 and cfg.data.val_samples == 4
    assert parser.parse_args(["--data.data_path=x.jsonl"]).data.data_path == "x.jsonl"


def test_without_val_or_test_split(tmp_path):
    dm = make(tmp_path, val_fraction=0.0, test_fraction=0.0)
    dm.setup()
    assert set(dm.datasets) == {"train"}
    assert dm.val_dataloader() == []  # Lightning skips validation
    with pytest.raises(ValueError, match="there is no test split: test_fraction is 0"):
        dm.test_dataloader()
