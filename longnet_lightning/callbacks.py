"""The callbacks the CLI adds: :class:`PredictionWriter` (completions out), :class:`LRMonitor`,
:class:`Throughput` (tokens/s and MFU), and the progress bars :class:`ResumeAwareProgressBar` and
:class:`RichBar`; and :class:`TimeBudget`, to train for a wall-clock budget."""
from __future__ import annotations

import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import (BasePredictionWriter, Callback, LearningRateMonitor, RichProgressBar,
                                         TQDMProgressBar)
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf


class _ShownWithoutWaiting:
    """Progress-bar mixin: shows logged training metrics without making the host wait for the GPU.

    Lightning turns ``prog_bar=True`` values into numbers with ``.item()`` several times per batch,
    and each one waits until the GPU has run everything queued so far, so the host cannot queue
    the next step while the GPU works. A bar with this mixin instead shows the ``shown`` metrics
    (logged without ``prog_bar``, e.g. ``train/loss``) from copies to pinned host memory that do
    not wait: the newest value whose copy has arrived, typically that of the batch before; at the
    end of an epoch, its last value.
    """

    shown: tuple[str, ...] = ("train/loss",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._arrived: dict[str, float] = {}
        self._in_flight: list[tuple] = []  # (name, pinned copy, CUDA event, the logged tensor)

    def _poll(self, trainer) -> dict[str, float]:
        """Start copies of the shown metrics logged this batch; the newest that have arrived."""
        arrived, flight = self._arrived, self._in_flight
        metrics = trainer.callback_metrics  # tensors as logged: only prog_bar values are read with .item()
        for name in self.shown:
            value = metrics.get(name)
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                continue
            if value.device.type != "cuda":
                arrived[name] = float(value)
            elif not any(v is value for *_, v in flight) and len(flight) < 8:
                copy = torch.empty((), dtype=value.dtype, pin_memory=True)
                copy.copy_(value.detach(), non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                flight.append((name, copy, event, value))
        waiting = []
        for name, copy, event, value in flight:
            if event.query():
                arrived[name] = float(copy)
            else:
                waiting.append((name, copy, event, value))
        flight[:] = waiting
        return dict(arrived)

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        if trainer.training:
            items.update(self._poll(trainer))
            for cb in trainer.callbacks:
                if isinstance(cb, Throughput):
                    items.update(cb.shown())
        return items

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        for *_, event, _ in self._in_flight:  # the epoch's last values: one wait per epoch
            event.synchronize()
        super().on_train_epoch_end(trainer, pl_module)


class ResumeAwareProgressBar(_ShownWithoutWaiting, TQDMProgressBar):
    """Lightning's TQDM bar, which also knows its total and epoch after a mid-epoch resume, and
    shows ``train/loss`` without making the host wait for the GPU (:class:`_ShownWithoutWaiting`).

    Lightning does not call ``on_train_epoch_start`` when it resumes inside an epoch, so the
    plain bar shows ``Training: 520/?``; this one sets the epoch's total and description at the
    first batch it sees without them.
    """

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        bar = self.train_progress_bar
        if bar is not None and bar.total is None:  # resumed in mid-epoch at batch_idx; the data is set up now
            remaining = convert_inf(self.total_train_batches)  # what is left to run of this epoch
            if remaining is not None:
                bar.total = min(batch_idx + remaining, trainer.num_training_batches)
                bar.initial = bar.n = batch_idx
                bar.set_description(f"Epoch {trainer.current_epoch}")


class RichBar(_ShownWithoutWaiting, RichProgressBar):
    """Lightning's Rich bar (its default when ``rich`` is installed), showing ``train/loss``
    without making the host wait for the GPU (:class:`_ShownWithoutWaiting`)."""


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


# ----------------------------------------------------------------------------- throughput

# Dense matmul peaks that Lightning's table (``get_available_flops``) lacks or lists differently:
# its H200 entries are the datasheet's 2:4-sparse figures, twice the dense ones, and the CUDA name
# "NVIDIA H200" matches neither. bf16 and fp16, FLOP/s: the datasheets' sparse 1,979 and 1,671
# TFLOP/s halved (the H100's dense figures: the same GH100 chip), to the TFLOP/s below.
_DENSE_PEAKS = {"h200 nvl": 835e12, "h200": 989e12}
_PRECISION_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16, "32": torch.float32, "64": torch.float64}


def precision_dtype(precision: str) -> torch.dtype | None:
    """The matmul dtype of a Lightning precision setting (``"bf16-mixed"`` -> bfloat16, ...)."""
    return _PRECISION_DTYPES.get(str(precision).split("-")[0])


def peak_flops(device: torch.device, dtype: torch.dtype | None) -> float | None:
    """One device's dense matmul peak in FLOP/s for ``dtype`` (the denominator of MFU), or None
    when it is not known (CPUs, unlisted GPUs, dtypes a GPU lacks)."""
    if device.type != "cuda" or dtype is None:
        return None
    name = torch.cuda.get_device_name(device).lower()
    for chip, flops in _DENSE_PEAKS.items():
        if chip in name:
            return flops if dtype in (torch.bfloat16, torch.float16) else None
    with warnings.catch_warnings():  # an unlisted GPU: said once, by Throughput
        warnings.simplefilter("ignore")
        flops = get_available_flops(device, dtype)
    return float(flops) if flops else None


class Throughput(Callback):
    """Logs training speed every ``every_n_steps`` optimizer steps (default: the Trainer's
    ``log_every_n_steps``), and shows it in the CLI's progress bar:

    * ``perf/tokens_per_s``: input tokens trained on per second, over all processes
      (:attr:`.LongNetLM.tokens_seen`, each token once);
    * ``perf/step_s``: seconds per optimizer step;
    * ``perf/mfu``: model FLOPs utilisation, ``flops_per_token(context) x tokens/s`` over the
      dense peak of all devices (:meth:`.LongNetConfig.flops_per_token`, the formula of
      ``benchmarks/RESULTS.md``; :func:`peak_flops` for the run's precision, or ``peak_tflops``).

    A window runs from one log point (a multiple of ``every_n_steps``) to the next, less the time
    spent validating. The first opens after the first optimizer step (and again after a resume),
    so compilation is not counted. The clock is the host's, read without waiting for the GPU: in
    steady state the host runs ahead of the GPU by a bounded amount, so over a window of many
    steps the two agree. (With several processes, reading the token count at a log point waits
    once, as Lightning's own logging does at that step.)

    Args:
        every_n_steps: optimizer steps per window; None: ``trainer.log_every_n_steps``.
        peak_tflops: one device's dense matmul peak in TFLOP/s at the run's precision, for GPUs
            :func:`peak_flops` does not know (or to state another); None: looked up (on a CPU,
            none: MFU is left out).
    """

    def __init__(self, every_n_steps: int | None = None, peak_tflops: float | None = None):
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"throughput.every_n_steps={every_n_steps} must be an integer >= 1 (or null: the "
                             "trainer's log_every_n_steps)")
        if peak_tflops is not None and not peak_tflops > 0:
            raise ValueError(f"throughput.peak_tflops={peak_tflops} must be > 0 (one device's dense peak in "
                             "TFLOP/s), or null to look it up")
        self.every_n_steps, self.peak_tflops = every_n_steps, peak_tflops
        self.latest: dict[str, float] = {}
        self._peak: float | None = None
        self._mark: tuple[int, float, int] | None = None  # (optimizer step, time, tokens) where the window opened
        self._step = -1
        self._paused = 0.0
        self._validating: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        if not hasattr(pl_module, "tokens_seen"):
            raise ValueError(f"Throughput needs the tokens_seen count of a LongNetLM, which "
                             f"{type(pl_module).__name__} lacks; use it with a LongNetLM (or a subclass)")
        self._mark, self._step, self._paused, self.latest = None, trainer.global_step, 0.0, {}
        if self.peak_tflops is not None:
            self._peak = self.peak_tflops * 1e12
        else:
            self._peak = peak_flops(pl_module.device, precision_dtype(trainer.precision))
            if self._peak is None and pl_module.device.type == "cuda":  # (on CPUs MFU is not reported)
                rank_zero_info(f"throughput: perf/mfu is not logged: the dense peak of "
                               f"{torch.cuda.get_device_name(pl_module.device)} at precision {trainer.precision} "
                               "is not known; set --throughput.peak_tflops to log it")

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._mark is not None:  # inside a window
            self._validating = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._validating is not None:
            self._paused += time.perf_counter() - self._validating
            self._validating = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._step:  # inside an accumulation: no optimizer step yet
            return
        self._step = step
        if self._mark is not None and step % (self.every_n_steps or trainer.log_every_n_steps):
            return
        now, tokens = time.perf_counter(), pl_module.tokens_seen
        if self._mark is not None:
            steps = step - self._mark[0]
            seconds = now - self._mark[1] - self._paused
            context = batch["input_ids"].shape[-1]  # the whole sequence, also under sequence parallelism
            self.latest = self.window(steps, seconds, tokens - self._mark[2], context, pl_module.config,
                                      trainer.world_size)
            logged_at = trainer.fit_loop.epoch_loop._batches_that_stepped  # Lightning's step for this batch's metrics
            for logger in trainer.loggers:
                logger.log_metrics(self.latest, step=logged_at)
        self._mark, self._paused = (step, now, tokens), 0.0

    def window(self, steps: int, seconds: float, tokens: int, context: int, config, devices: int) -> dict[str, float]:
        """The metrics of one window: ``steps`` optimizer steps and ``tokens`` in ``seconds``, of
        sequences of ``context`` tokens, for a model ``config`` on ``devices`` devices."""
        tps = tokens / seconds
        out = {"perf/tokens_per_s": tps, "perf/step_s": seconds / steps}
        if self._peak is not None:
            out["perf/mfu"] = config.flops_per_token(context) * tps / (self._peak * devices)
        return out

    def shown(self) -> dict[str, str]:
        """The latest window for the progress bar."""
        if not self.latest:
            return {}
        tps = self.latest["perf/tokens_per_s"]
        out = {"tok/s": f"{tps / 1e3:.1f}K" if tps < 1e6 else f"{tps / 1e6:.2f}M"}
        if "perf/mfu" in self.latest:
            out["MFU"] = f"{100 * self.latest['perf/mfu']:.1f}%"
        return out


class TimeBudget(Callback):
    """Train as many optimizer steps as fit in a wall-clock budget, with the learning-rate decay
    fitted to exactly that many steps (unlike ``trainer.max_time``, which stops in mid-schedule).

    After ``skip_steps`` steps (compilation, cache warm-up) it times the next ``measure_steps``
    optimizer steps, takes their median and sets ``max_steps`` to what fits before the deadline
    (never more than the Trainer's own ``max_steps``). The decision falls inside the warm-up, whose
    learning rates do not depend on the schedule's length, so the run is the one it would have
    been with that ``max_steps`` from the start. The chosen length is saved in checkpoints, so a
    resumed run keeps it.

    Args:
        minutes: budget from the start of training; or
        until: the deadline as a Unix time (several runs sharing one machine and one deadline).
        skip_steps, measure_steps: optimizer steps left untimed, then timed.
        reserve_s: seconds kept free after training (e.g. for the final evaluation).
    """

    def __init__(self, minutes: float | None = None, until: float | None = None, skip_steps: int = 10,
                 measure_steps: int = 20, reserve_s: float = 0.0):
        if (minutes is None) == (until is None):
            raise ValueError(f"TimeBudget: give minutes or until, not {'both' if minutes else 'neither'} "
                             f"(minutes={minutes}, until={until})")
        if minutes is not None and minutes <= 0:
            raise ValueError(f"TimeBudget: minutes={minutes} must be positive")
        if skip_steps < 0 or measure_steps < 2:
            raise ValueError(f"TimeBudget: skip_steps={skip_steps} must be >= 0 and measure_steps={measure_steps} >= 2")
        self.minutes, self.until, self.reserve_s = minutes, until, reserve_s
        self.skip_steps, self.measure_steps = skip_steps, measure_steps
        self.steps: int | None = None  # the chosen length, once decided
        self.step_seconds: float | None = None
        self._times: list[float] = []
        self._deadline: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._deadline = self.until if self.until is not None else time.time() + 60.0 * self.minutes
        self._deadline -= self.reserve_s
        if self.steps is not None:  # resumed: the length chosen before
            self._apply(trainer, pl_module, self.steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.steps is not None:
            return
        step = trainer.global_step
        if step <= self.skip_steps or (self._times and self._times[-1][0] == step):
            if step == self.skip_steps and not self._times:
                self._times.append((step, time.perf_counter()))
            return
        self._times.append((step, time.perf_counter()))
        if len(self._times) <= self.measure_steps:
            return
        dts = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(self._times, self._times[1:])]
        self.step_seconds = statistics.median(dts)
        fit = step + int(max(0.0, self._deadline - time.time()) / self.step_seconds)
        cap = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else fit
        # every rank decides at the same step; rank 0's clock decides for all (else DDP ranks could disagree)
        self.steps, self.step_seconds = trainer.strategy.broadcast((max(step + 1, min(cap, fit)), self.step_seconds), 0)
        warmup = pl_module.hparams.get("warmup_steps", 0)
        if self.steps < warmup:  # the shortened warm-up (effective_warmup_steps warns) differs from here on
            rank_zero_info(f"TimeBudget: only {self.steps} steps fit, fewer than model.warmup_steps={warmup}; "
                           f"the learning rates of the first {step} steps followed the longer warm-up")
        if step > warmup:
            raise RuntimeError(f"TimeBudget decided at step {step}, after the warm-up ({warmup} steps): the "
                               "learning rates so far depended on the old length; lower skip_steps + measure_steps "
                               "or raise model.warmup_steps")
        rank_zero_info(f"TimeBudget: {self.step_seconds:.3f} s per optimizer step; training {self.steps} steps "
                       f"(of max_steps {cap}) to end by {time.strftime('%H:%M:%S', time.localtime(self._deadline))}")
        self._apply(trainer, pl_module, self.steps)

    def _apply(self, trainer, pl_module, steps: int) -> None:
        trainer.fit_loop.epoch_loop.max_steps = steps
        for config in trainer.lr_scheduler_configs:
            sched = config.scheduler
            if hasattr(sched, "lr_lambdas") and hasattr(pl_module, "lr_schedule"):
                sched.lr_lambdas = [pl_module.lr_schedule(steps, pl_module.effective_warmup_steps(steps))
                                    for _ in sched.lr_lambdas]

    def state_dict(self) -> dict:
        return {"steps": self.steps, "step_seconds": self.step_seconds}

    def load_state_dict(self, state_dict: dict) -> None:
        self.steps, self.step_seconds = state_dict.get("steps"), state_dict.get("step_seconds")


__all__ = ["LRMonitor", "PredictionWriter", "Throughput", "TimeBudget", "peak_flops", "precision_dtype"]
