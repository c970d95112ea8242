"""TimeBudget: the run length follows from the measured step time, the schedule from the length."""
from __future__ import annotations

import time
import warnings
from time import localtime, strftime

import lightning as L
import pytest
import torch

from longnet_lightning.callbacks import TimeBudget
from longnet_lightning.lm import LongNetLM

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class FakeClock:
    """The callback's clock: every reading of perf_counter is one step of `tick` seconds later, and
    time() follows it, so the budget arithmetic does not depend on how busy the machine is."""

    def __init__(self, tick: float):
        self.tick, self.now, self.base = tick, 0.0, 1_000_000.0

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now

    def time(self) -> float:
        return self.base + self.now

    strftime, localtime = staticmethod(strftime), staticmethod(localtime)


@pytest.fixture
def clock(monkeypatch):
    import longnet_lightning.callbacks as callbacks

    fake = FakeClock(0.1)
    monkeypatch.setattr(callbacks, "time", fake)
    return fake


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
                        enable_model_summary=False, callbacks=[budget, LR(), *extra],
                        default_root_dir=tmp_path, enable_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(lm, loader, ckpt_path=ckpt_path)
    return trainer, lm, lrs


def test_time_budget_sets_the_length_and_fits_the_decay_to_it(tmp_path, clock):
    budget = TimeBudget(until=clock.base + 10.0, skip_steps=2, measure_steps=5)
    trainer, lm, lrs = fit(budget, 10_000, tmp_path)
    # timed: steps 2..7, 0.1 s each; decided at step 7, at 0.6 s: 9.4 s left = 94 more steps (93 by float floor)
    assert budget.step_seconds == pytest.approx(0.1)
    steps = budget.steps
    assert steps in (100, 101) and trainer.global_step == steps  # it stopped at the length that fits
    expect = [lm.lr_schedule(steps, 40)(i) * 1e-3 for i in range(steps)]
    assert lrs == pytest.approx(expect, rel=1e-9)  # warm-up as before, then a decay that ends at the last step
    assert budget.state_dict() == {"steps": steps, "step_seconds": budget.step_seconds}
    short = TimeBudget(until=clock.base + clock.now + 2.0, skip_steps=2, measure_steps=5)
    trainer, _, _ = fit(short, 10_000, tmp_path)  # fewer steps fit than the warm-up: said, not hidden
    assert short.steps < 40 and trainer.global_step == short.steps


def test_time_budget_never_exceeds_max_steps_and_checks_its_settings(tmp_path, clock):
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
