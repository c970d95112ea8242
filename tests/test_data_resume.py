"""A run stopped mid-epoch and resumed from its checkpoint sees exactly the batches of an uninterrupted run."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from longnet_lightning.data import LongTextDataModule

pytestmark = pytest.mark.filterwarnings("ignore:.*(val_dataloader|Checkpoint directory .* exists):UserWarning")


class TinyLM(L.LightningModule):
    """Embedding + linear next-byte model that records every batch it trains on."""

    def __init__(self, vocab_size: int = 257):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab_size, 8)
        self.out = torch.nn.Linear(8, vocab_size)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].clone())
        logits = self.out(self.emb(batch["input_ids"]))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(6):
        (folder / f"doc{i}.txt").write_text("".join(f"line {j} of document {i}\n" for j in range(20 + 7 * i)))
    return folder


def _fit(tmp_path, corpus, max_steps, workers, ckpt_path=None, callbacks=()):
    L.seed_everything(0, workers=True)
    dm = LongTextDataModule(
        str(corpus), seq_len=16, batch_size=3, samples_per_epoch=13, val_fraction=0.0, test_fraction=0.0,
        num_workers=workers, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    model = TinyLM()
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=bool(callbacks), callbacks=list(callbacks),
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


# 13 windows in batches of 3 = 5 batches per epoch (the last one holds 1 window): stop inside
# epoch 0, exactly at the end of epoch 0, and inside epoch 1 with worker processes.
@pytest.mark.parametrize("k,workers", [(3, 0), (5, 0), (7, 2)])
def test_resume_mid_epoch_sees_same_batches(tmp_path, k, workers):
    corpus = _corpus(tmp_path)
    a = _fit(tmp_path, corpus, 2 * k, workers)
    ckpt = lambda d: ModelCheckpoint(dirpath=tmp_path / d, every_n_train_steps=k, save_top_k=-1)  # noqa: E731
    b = _fit(tmp_path, corpus, k, workers, callbacks=[ckpt("b")])
    (path,) = (tmp_path / "b").iterdir()
    c = _fit(tmp_path, corpus, 2 * k, workers, ckpt_path=str(path), callbacks=[ckpt("b")])

    assert len(a.seen) == 2 * k and len(b.seen) == k and len(c.seen) == k
    assert not torch.equal(a.seen[0], a.seen[1])  # batches differ, so the comparison below means something
    for i, (x, y) in enumerate(zip(a.seen, b.seen + c.seen)):
        assert torch.equal(x, y), f"batch {i} differs after resuming at step {k}"
    for (name, p), q in zip(a.named_parameters(), c.parameters()):
        assert torch.equal(p, q), name
