"""TimeBudget: the run length follows from the measured step time, the schedule from the length."""
from __future__ import annotations

import time
import warnings

import lightning as L
import pytest
import torch

from longnet_lightning.callbacks import TimeBudget
from longnet_lightning.lm import LongNetLM

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class SlowSteps(L.Callback):
    """Makes every optimizer step take at least `seconds`, so the budget arithmetic is predictable."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, *args, **kwargs):
        time.sleep(self.seconds)


def fit(budget: TimeBudget, max_steps: int, tmp_path, warmup: int = 40, ckpt_path=None, extra=()):
    torch.manual_seed(0)
    lm = LongNetLM(model="tiny", vocab_size=257, seq_len=16, lr=1e-3, min_lr=1e-4, warmup_steps=warmup)
    data = [{"input_ids": torch.randint(0, 257, (2, 16)), "labels": torch.randint(0, 257, (2, 16))}
            for _ in range(4)]
    loader = torch.utils.data.DataLoader(data * 100, batch_size=None)
    lrs = []

    class LR(L.Callback):
        def on_train_batch_start(self, trainer, *a):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[budget, SlowSteps(0.05), LR(), *extra],
                        default_root_dir=tmp_path, enable_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(lm, loader, ckpt_path=ckpt_path)
    return trainer, lm, lrs


def test_time_budget_sets_the_length_and_fits_the_decay_to_it(tmp_path):
    t0 = time.time()
    budget = TimeBudget(until=t0 + 4.0, skip_steps=2, measure_steps=5)
    trainer, lm, lrs = fit(budget, 10_000, tmp_path)
    steps, done = budget.steps, time.time()
    assert budget.step_seconds >= 0.05 and steps is not None and 7 < steps < 10_000
    assert trainer.global_step == steps  # it stopped at the chosen length, which fits the budget
    assert done < t0 + 4.0 + 4 * budget.step_seconds + 2.0, (done - t0, budget.step_seconds)
    expect = [lm.lr_schedule(steps, 40)(i) * 1e-3 for i in range(steps)]
    assert lrs == pytest.approx(expect, rel=1e-9)  # warm-up as before, then a decay that ends at the last step
    assert lrs[-1] == pytest.approx(1e-3 * lm.lr_schedule(steps, 40)(steps - 1))
    assert budget.state_dict() == {"steps": steps, "step_seconds": budget.step_seconds}


def test_time_budget_never_exceeds_max_steps_and_checks_its_settings(tmp_path):
    budget = TimeBudget(minutes=10, skip_steps=1, measure_steps=3)
    trainer, _, _ = fit(budget, 12, tmp_path)
    assert budget.steps == 12 and trainer.global_step == 12
    with pytest.raises(ValueError, match="minutes or until"):
        TimeBudget()
    with pytest.raises(ValueError, match="minutes or until"):
        TimeBudget(minutes=1, until=time.time())
    with pytest.raises(ValueError, match="measure_steps"):
        TimeBudget(minutes=1, measure_steps=1)
    with pytest.raises(RuntimeError, match="after the warm-up"):
        fit(TimeBudget(minutes=1, skip_steps=5, measure_steps=5), 100, tmp_path, warmup=3)
