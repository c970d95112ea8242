"""Plugging in both directions: the user's classes into our CLI, our classes into the user's code."""
from __future__ import annotations

import textwrap

import lightning as L
import torch
import torch.nn.functional as F
from conftest import tiny_args

from longnet_lightning import LongNetLM, LongTextDataModule, MultiheadDilatedAttention
from longnet_lightning.cli import LongNetCLI

USER_MODULE = '''
"""A user's plugin module: nothing in longnet_lightning knows about it."""
import json
import os

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from longnet_lightning import LongNetLM


class Counting(Dataset):
    """Sequences counting up modulo vocab_size: trivially learnable."""

    def __init__(self, n, seq_len, vocab_size):
        self.n, self.seq_len, self.vocab_size = n, seq_len, vocab_size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x = (torch.arange(self.seq_len + 1) + i) % self.vocab_size
        return {"input_ids": x[:-1], "labels": x[1:]}


class CountingData(L.LightningDataModule):
    """The user's own data: exposes vocab_size and seq_len, which the CLI links into the model."""

    def __init__(self, vocab_size: int = 50, seq_len: int = 32, batch_size: int = 4):
        super().__init__()
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size

    def train_dataloader(self):
        return DataLoader(Counting(64, self.seq_len, self.vocab_size), batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(Counting(8, self.seq_len, self.vocab_size), batch_size=self.batch_size)


class StepLog(L.Callback):
    """The user's own callback: writes the step losses to a JSON file."""

    def __init__(self, path: str):
        self.path, self.losses = path, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module):
        with open(self.path, "w") as f:
            json.dump({"losses": self.losses, "model": type(pl_module).__name__}, f)


class MyLM(LongNetLM):
    """The user's model subclass with one extra setting."""

    def __init__(self, label_note: str = "mine", **kwargs):
        super().__init__(**kwargs)
        self.label_note = label_note
'''


def test_user_plugins_by_class_path(tmp_path, monkeypatch):
    """A recipe names the user's DataModule, callback and model subclass; nothing of ours changes."""
    (tmp_path / "my_plugins.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))  # as if run from that folder or with PYTHONPATH set
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.yaml").write_text(textwrap.dedent(f"""\
        seed_everything: 0
        trainer:
          max_steps: 12
          accelerator: cpu
          logger: false
          enable_progress_bar: false
          enable_model_summary: false
          num_sanity_val_steps: 0
          default_root_dir: {tmp_path / "runs"}
          callbacks:
            - class_path: my_plugins.StepLog
              init_args:
                path: {tmp_path / "losses.json"}
        model:
          class_path: my_plugins.MyLM
          init_args:
            label_note: plugged
            warmup_steps: 2
            lr: 3.0e-3
        data:
          class_path: my_plugins.CountingData
          init_args:
            vocab_size: 50
            seq_len: 32
        """))
    cli = LongNetCLI(args=["fit", "--config", "recipe.yaml"])
    import json

    log = json.loads((tmp_path / "losses.json").read_text())
    assert log["model"] == "MyLM" and cli.model.label_note == "plugged"
    assert cli.model.hparams.vocab_size == 50 and cli.model.hparams.seq_len == 32  # linked from the user's data
    assert len(log["losses"]) == 12 and log["losses"][-1] < log["losses"][0]
    assert "val/bpb" not in cli.trainer.callback_metrics  # the user's data has no tokenizer: no bytes


class UserClassifier(L.LightningModule):
    """A user's own model that uses MultiheadDilatedAttention as a layer."""

    def __init__(self, vocab=32, dim=32):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.attn = MultiheadDilatedAttention(dim, 4, segment_lengths=[8, 16], dilation_rates=[1, 2],
                                              causal=True, position="rope")
        self.head = torch.nn.Linear(dim, vocab)
        self.losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.emb(x)
        logits = self.head(h + self.attn(h))
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _trainer(tmp_path, steps):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                     limit_val_batches=2, default_root_dir=tmp_path)


def test_attention_inside_a_users_lightning_module(tmp_path):
    torch.manual_seed(0)
    seq = (torch.arange(33).repeat(16, 1) + torch.arange(16)[:, None]) % 32  # copy-the-pattern task
    loader = torch.utils.data.DataLoader(list(zip(seq[:, :-1], seq[:, 1:])), batch_size=8)
    model = UserClassifier()
    _trainer(tmp_path, 20).fit(model, loader)
    assert sum(model.losses[-3:]) / 3 < 0.7 * sum(model.losses[:3]) / 3


class Bigram(L.LightningModule):
    """A user's own model trained on our LongTextDataModule."""

    def __init__(self, vocab_size):
        super().__init__()
        self.table = torch.nn.Embedding(vocab_size, vocab_size)
        self.losses = []

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.table(batch["input_ids"]).flatten(0, 1), batch["labels"].flatten(),
                               ignore_index=-100)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.1)


def test_datamodule_with_a_users_model(tmp_path, tiny_corpus, cache_dir):
    dm = LongTextDataModule(str(tiny_corpus), seq_len=64, batch_size=8, val_fraction=0.2, test_fraction=0.2,
                            cache_dir=str(cache_dir))
    model = Bigram(dm.vocab_size)
    _trainer(tmp_path, 15).fit(model, datamodule=dm)
    assert model.losses[-1] < model.losses[0] - 1.0


def test_longnet_lm_with_a_plain_trainer(tmp_path, tiny_corpus, cache_dir):
    torch.manual_seed(0)
    dm = LongTextDataModule(str(tiny_corpus), seq_len=64, batch_size=8, val_fraction=0.2, test_fraction=0.2,
                            cache_dir=str(cache_dir))
    lm = LongNetLM(model="tiny", vocab_size=dm.vocab_size, seq_len=dm.seq_len, lr=3e-3, warmup_steps=2)
    trainer = _trainer(tmp_path, 12)
    before = trainer.validate(lm, datamodule=dm, verbose=False)[0]["val/loss"]
    trainer.fit(lm, datamodule=dm)
    after = trainer.validate(lm, datamodule=dm, verbose=False)[0]
    assert after["val/loss"] < before - 0.5 and "val/bpb" in after
    assert lm.tokenizer_spec == {"kind": "byte"}


def test_cli_args_only_name_what_differs(tmp_path, tiny_corpus, cache_dir):
    """Sanity: the tiny settings used across the CLI tests are accepted by the data module."""
    args = tiny_args(tmp_path, tiny_corpus, cache_dir)
    assert "--data.seq_len" in args and "--model.vocab_size" not in args
