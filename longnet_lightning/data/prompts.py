"""PromptDataModule: the prompts of ``predict`` (inline or from a file), one ``{"index", "prompt"}`` per item."""
from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader


class _Prompts(torch.utils.data.Dataset):
    def __init__(self, prompts: list[str]):
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {"index": i, "prompt": self.prompts[i]}


def _list_collate(items: list[dict]) -> list[dict]:
    return list(items)


class PromptDataModule(L.LightningDataModule):
    """Prompts for ``predict``: given inline, or read from a file.

    Args:
        prompts: prompt strings (an empty string samples from the start of a document).
        prompt_file: a text file with one prompt per line, or a ``.jsonl`` file of
            ``{"prompt": ...}`` records (use this for prompts containing newlines).
        batch_size: prompts per predict batch.
        tokenizer: only needed without ``--ckpt_path``: "byte" or a tokenizer.json path for the
            model's vocabulary (a checkpoint brings its own tokenizer, which then wins).
    """

    def __init__(self, prompts: list[str] | None = None, prompt_file: str | None = None,
                 batch_size: int = 1, tokenizer: str | None = None):
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
        if prompts is None and prompt_file is None:
            raise ValueError("give data.prompts (a list of strings) or data.prompt_file (a text or .jsonl file)")
        self.prompts_given, self.prompt_file, self.batch_size = prompts, prompt_file, batch_size
        self.tokenizer_name = tokenizer
        self._tok = None

    @property
    def tokenizer(self):
        if self.tokenizer_name is None:
            return None
        if self._tok is None:
            from .tokenizers import build_tokenizer

            self._tok = build_tokenizer(self.tokenizer_name)
        return self._tok

    @property
    def vocab_size(self) -> int | None:
        """The tokenizer's vocabulary (None: the checkpoint's is used)."""
        return None if self.tokenizer is None else self.tokenizer.vocab_size

    def read_prompts(self) -> list[str]:
        prompts = list(self.prompts_given or [])
        if self.prompt_file is not None:
            path = Path(self.prompt_file).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"data.prompt_file={self.prompt_file!r} does not exist (cwd: {os.getcwd()})")
            lines = path.read_text(encoding="utf-8").splitlines()
            if path.suffix.lower() == ".jsonl":
                for n, line in enumerate(lines, 1):
                    if line.strip():
                        rec = json.loads(line)
                        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                            raise ValueError(f"{path}:{n}: expected a JSON object with a string field 'prompt'")
                        prompts.append(rec["prompt"])
            else:
                prompts.extend(lines)
        if not prompts:
            raise ValueError("no prompts: data.prompts is empty and data.prompt_file has no lines")
        return prompts

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(_Prompts(self.read_prompts()), batch_size=self.batch_size, collate_fn=_list_collate)


__all__ = ["PromptDataModule"]
