"""TimeBudget: the run length follows from the measured step time, the schedule from the length;
the progress bar reads nothing on the host between logging steps; Throughput's windows."""
from __future__ import annotations

import time
import warnings
from time import localtime, strftime

import lightning as L
import pytest
from lightning.pytorch.loggers import Logger
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


# ----------------------------------------------------------------------------- the progress bar


def test_training_batches_never_read_tensors_on_the_host(tmp_path, monkeypatch):
    """Between logging steps a training batch reads no tensor value on the host (on a GPU each
    read waits until every queued kernel has run), and the CLI's bar still shows train/loss (and
    Throughput's tokens/s, from the window closed at a logging step).
    Allowed: AdamW's step counters (CPU tensors on a GPU too), the eager model's token-id range
    check (left out when compiled) and the bar's own read (on a GPU, of its pinned copy once that
    has arrived)."""
    import traceback

    from longnet_lightning.callbacks import ResumeAwareProgressBar, Throughput

    reads, counting = [], [False]
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _original=original, _name=name, **k):
            if counting[0]:
                stack = traceback.extract_stack()[:-1]
                allowed = any("/torch/optim/" in f.filename or f.name in ("hidden_states", "_poll") for f in stack)
                if not allowed:
                    reads.append((_name, [f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in stack[-4:]]))
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)

    class Count(L.Callback):  # batches 4..6 of 8: log_every_n_steps=4 logs after batches 3 and 7
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            counting[0] = 4 <= batch_idx <= 6

    bar = ResumeAwareProgressBar()
    shown = []

    class Shown(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            counting[0] = False
            shown.append(bar.get_metrics(trainer, pl_module))

    lm = LongNetLM(model="tiny", vocab_size=257, seq_len=16, warmup_steps=1)
    data = [{"input_ids": torch.randint(0, 257, (2, 16)), "labels": torch.randint(0, 257, (2, 16))} for _ in range(8)]
    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False,
                        callbacks=[Count(), Throughput(), bar, Shown()], enable_model_summary=False,
                        default_root_dir=tmp_path, enable_checkpointing=False, log_every_n_steps=4,
                        gradient_clip_val=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(lm, torch.utils.data.DataLoader(data, batch_size=None))
    assert reads == [], reads
    assert len(shown) == 8 and all(isinstance(v.get("train/loss"), float) for v in shown)
    assert shown[-1]["train/loss"] == pytest.approx(float(trainer.callback_metrics["train/loss"]))
    assert "tok/s" not in shown[2] and shown[3]["tok/s"].endswith("K")  # the window of steps 1-4 closed at step 4
    assert lm.tokens_seen == 8 * 2 * 16


def test_the_cli_swaps_lightnings_rich_bar_for_one_that_does_not_wait(tmp_path):
    """With ``rich`` installed Lightning's default bar is Rich; the CLI puts in RichBar, keeping its
    settings (and ResumeAwareProgressBar for the TQDM bar, tested with every CLI run)."""
    pytest.importorskip("rich")
    from lightning.pytorch.callbacks import RichProgressBar

    from longnet_lightning.callbacks import RichBar
    from longnet_lightning.cli import LongNetCLI

    cli = LongNetCLI(args=["--model.model", "tiny", "--model.vocab_size", "257", "--trainer.accelerator", "cpu",
                           "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks+=RichProgressBar",
                           "--trainer.callbacks.refresh_rate", "3"], run=False)
    bars = [cb for cb in cli.trainer.callbacks if isinstance(cb, RichProgressBar)]
    assert len(bars) == 1 and type(bars[0]) is RichBar and bars[0].refresh_rate == 3


# ----------------------------------------------------------------------------- throughput


class _Recorder(Logger):
    """A logger that keeps what it is given."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    name, version = "recorder", 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))


def test_throughput_logs_tokens_per_second_and_mfu_per_window_without_validation(tmp_path, monkeypatch):
    """Windows of 2 optimizer steps (2 micro-batches each, 32 tokens per micro-batch); the clock
    moves 0.5 s per training micro-batch and 100 s per validation batch, which the windows leave out."""
    import longnet_lightning.callbacks as callbacks

    class Clock:
        now = 0.0

        def perf_counter(self):
            return self.now

    clock = Clock()
    monkeypatch.setattr(callbacks, "time", clock)

    class Tick(L.Callback):
        def on_train_batch_start(self, *a):
            clock.now += 0.5

        def on_validation_batch_start(self, *a):
            clock.now += 100.0

    lm = LongNetLM(model="tiny", vocab_size=257, seq_len=16, warmup_steps=1)
    data = [{"input_ids": torch.randint(0, 257, (2, 16)), "labels": torch.randint(0, 257, (2, 16))} for _ in range(4)]
    loader = torch.utils.data.DataLoader(data * 10, batch_size=None)
    logger, meter = _Recorder(), callbacks.Throughput(every_n_steps=2, peak_tflops=1e-6)
    trainer = L.Trainer(max_steps=7, accelerator="cpu", logger=logger, callbacks=[meter, Tick()],
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        enable_checkpointing=False, accumulate_grad_batches=2, val_check_interval=6,
                        limit_val_batches=2, num_sanity_val_steps=0, log_every_n_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(lm, loader, loader)
    rows = [(step, m) for step, m in logger.rows if any(k.startswith("perf/") for k in m)]
    # windows: steps 1-2, 2-4 (with a validation of 200 s), 4-6; step 7 closes none
    assert [step for step, _ in rows] == [1, 3, 5]  # Lightning's step for the metrics of steps 2, 4, 6
    flops = lm.config.flops_per_token(16)
    for _, m in rows:
        assert m["perf/tokens_per_s"] == pytest.approx(64.0)  # 64 tokens per optimizer step of 1 s
        assert m["perf/step_s"] == pytest.approx(1.0)
        assert m["perf/mfu"] == pytest.approx(flops * 64.0 / 1e6)
    assert meter.shown() == {"tok/s": "0.1K", "MFU": f"{100 * flops * 64.0 / 1e6:.1f}%"}


def test_throughput_finds_dense_peaks_and_checks_its_settings(monkeypatch):
    from longnet_lightning.callbacks import Throughput, peak_flops, precision_dtype

    gpu, bf16 = torch.device("cuda", 0), torch.bfloat16
    for name, want in [("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA H100 80GB HBM3", 989.4e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("Some Future GPU", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, _n=name: _n)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an unknown GPU is said once, by Throughput, not warned here
            assert peak_flops(gpu, bf16) == want, name
    assert peak_flops(torch.device("cpu"), bf16) is None and peak_flops(gpu, None) is None
    assert [precision_dtype(p) for p in ("bf16-mixed", "16-mixed", "32-true", "64-true", "transformer-engine")] == [
        torch.bfloat16, torch.float16, torch.float32, torch.float64, None]
    with pytest.raises(ValueError, match="every_n_steps=0"):
        Throughput(every_n_steps=0)
    with pytest.raises(ValueError, match="peak_tflops=-1"):
        Throughput(peak_tflops=-1)
