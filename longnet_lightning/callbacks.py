"""The callbacks the CLI adds: :class:`PredictionWriter` (completions out) and :class:`LRMonitor`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter, LearningRateMonitor


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
