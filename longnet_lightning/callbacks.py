"""The callbacks the CLI adds: :class:`PredictionWriter` (completions out), :class:`LRMonitor`
and :class:`ResumeAwareProgressBar`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter, LearningRateMonitor, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf


class ResumeAwareProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, which also knows its total and epoch after a mid-epoch resume.

    Lightning does not call ``on_train_epoch_start`` when it resumes inside an epoch, so the
    plain bar shows ``Training: 520/?``; this one sets the epoch's total and description at the
    first batch it sees without them."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        bar = self.train_progress_bar
        if bar is not None and bar.total is None:  # resumed in mid-epoch at batch_idx; the data is set up now
            remaining = convert_inf(self.total_train_batches)  # what is left to run of this epoch
            if remaining is not None:
                bar.total = min(batch_idx + remaining, trainer.num_training_batches)
                bar.initial = bar.n = batch_idx
                bar.set_description(f"Epoch {trainer.current_epoch}")


class LRMonitor(LearningRateMonitor):
    """LearningRateMonitor that stays silent (instead of failing) when the Trainer has no logger."""

    def on_train_start(self, trainer, *args, **kwargs) -> None:
        self._silent = not trainer.loggers
        if not self._silent:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
        if not getattr(self, "_silent", True):
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer, *args, **kwargs) -> None:
        if not getattr(self, "_silent", True):
            super().on_train_epoch_start(trainer, *args, **kwargs)


class PredictionWriter(BasePredictionWriter):
    """Writes each completion to stdout and/or appends it as JSON Lines to ``output``.

    Args:
        output: a ``.jsonl`` file to write ``{"index", "prompt", "completion"}`` records to
            (replaced at the start of each predict run); None writes no file.
        stdout: also print ``prompt + completion`` to standard output.
    """

    def __init__(self, output: str | None = None, stdout: bool = True):
        super().__init__(write_interval="batch")
        self.output, self.stdout = output, stdout

    def on_predict_start(self, trainer, pl_module) -> None:
        if self.output and trainer.is_global_zero:
            path = Path(self.output).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        for rec in prediction:
            if self.stdout:
                sys.stdout.write(f"=== prompt {rec['index']} ===\n{rec['prompt']}{rec['completion']}\n")
                sys.stdout.flush()
            if self.output:
                with open(Path(self.output).expanduser(), "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")


__all__ = ["LRMonitor", "PredictionWriter"]
