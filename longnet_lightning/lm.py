"""LongNetLM: the LongNet language model as a LightningModule (training, evaluation, generation).

Every constructor argument is typed and documented so ``LightningCLI`` can expose it. Batches are
``{"input_ids": LongTensor[B, T], "labels": LongTensor[B, T]}`` with ``IGNORE_INDEX`` (-100)
marking targets that are not scored (the contract of
:class:`~longnet_lightning.data.LongTextDataModule`). Its neighbours: the metrics in
:mod:`.metrics`, the optimizer pieces in :mod:`.optim`, the checkpoint format in :mod:`.checkpoint`.
"""
from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from . import checkpoint as ckpt_format
from .distributed.strategy import global_mean, sequence_group_of, split_batch
from .metrics import BitsPerByte, TokenNLL, TokenPerplexity
from .model import IGNORE_INDEX, PRESETS, LongNet, LongNetConfig
from .optim import lr_factor, weight_decay_groups


# ----------------------------------------------------------------------------- helpers


def keep_gradient_buffers(parameters) -> None:
    """Give every trainable parameter without one a zero ``.grad`` of its own.

    Autograd adopts the first gradient of a parameter whose ``.grad`` is None as that ``.grad``
    (no copy). Under CUDA graphs that gradient is a replay's output, living in the graphs' memory,
    which the next micro-batch's replay overwrites: an accumulated gradient would be corrupted.
    With a buffer already there, every gradient is added into it in place instead. (LongNet's
    parameters all receive gradients, so the zero buffers change no update.)
    """
    for p in parameters:
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def _data_tokenizer(datamodule: Any):
    """The data module's tokenizer (an object with ``spec()``), or None if it has none."""
    if datamodule is None:
        return None
    try:
        tok = getattr(datamodule, "tokenizer", None)
    except Exception:  # a lazy property that cannot build its tokenizer here
        return None
    return tok if callable(getattr(tok, "spec", None)) else None


def _token_bytes_of(datamodule: Any, tokenizer: Any) -> torch.Tensor | None:
    """``int64 [V]`` bytes per token id from the tokenizer (or the data module), else None."""
    for owner in (tokenizer, datamodule):
        table = getattr(owner, "token_bytes", None) if owner is not None else None
        if table is None:
            continue
        if callable(table):
            table = table()
        return torch.as_tensor(table, dtype=torch.int64)
    return None


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")


# ----------------------------------------------------------------------------- the module


class LongNetLM(L.LightningModule):
    """LongNet causal language model for Lightning (training, evaluation, generation).

    Args:
        model: size preset from ``longnet_lightning.PRESETS``: "tiny", "small", "24M", "125M", "350M",
            "760M" or "2.7B".
        vocab_size: vocabulary size; seq_len: training sequence length (generation keeps at most
            this many tokens of context; None: no limit). Both arrive by one route, as
            hyperparameters: the CLI links them from the data module's ``vocab_size`` /
            ``seq_len``; left None, :meth:`configure_model` reads them from
            ``trainer.datamodule`` and stores them in the hyperparameters, so a checkpoint
            rebuilds the same model (``load_from_checkpoint``) with no other input.
        attention: "dilated" (LongNet) or "dense" (the same model as a plain Transformer
            baseline). None keeps the preset's ("dilated").
        pattern: attention pattern name from ``longnet_lightning.PATTERNS`` ("paper", "paper-8k",
            "small", "tiny"); None keeps the preset's. Ignored when segment_lengths is given.
        segment_lengths: explicit segment lengths w_i (give dilation_rates too).
        dilation_rates: explicit dilation rates r_i, one per segment length.
        position: "xpos", "rope" or "none"; None keeps the default ("xpos").
        activation_checkpointing: recompute each block in the backward to save memory.
        attn_backend: dilated attention kernel backend ("auto" picks the fastest available).
        dropout: dropout probability (None keeps 0.0).
        overrides: any other ``LongNetConfig`` field, e.g. ``{n_layer: 6, n_embd: 384}``.
        lr: peak learning rate (after warm-up).
        min_lr: learning rate at the end of the decay.
        betas: AdamW betas.
        eps: AdamW epsilon.
        weight_decay: AdamW weight decay, applied to weight matrices of linear layers only
            (not to biases, LayerNorms or the token embedding / tied output matrix).
        warmup_steps: linear warm-up from 0 to ``lr`` over this many optimizer steps.
        decay_steps: step at which the polynomial decay reaches ``min_lr``; None uses the
            Trainer's ``max_steps`` (or its estimated total steps for epoch-based runs).
        decay_power: power of the polynomial decay (1.0 = linear).
        compile: ``torch.compile`` the model's loss (training and evaluation).
        cuda_graphs: also replay the compiled loss as CUDA graphs (``torch.compile``'s
            ``mode="reduce-overhead"``), so the host no longer launches each kernel: it bounds
            short-context steps. Needs ``compile``, one CUDA device and fixed batch shapes. The
            parameters' gradient buffers are then kept between steps (zeroed, not freed), so a
            replay never overwrites a gradient being accumulated over micro-batches.
        max_new_tokens: tokens to generate per prompt in ``predict``.
        temperature: sampling temperature; 0 means greedy decoding.
        top_k: sample only among the k most likely tokens (None: all).
        generation_seed: seed of sampling; prompt i uses ``generation_seed + i``.
        stop_at_eos: stop a sample when the end-of-document token is drawn.
    """

    def __init__(
        self,
        model: str = "tiny",
        vocab_size: int | None = None,
        seq_len: int | None = None,
        attention: str | None = None,
        pattern: str | None = None,
        segment_lengths: list[int] | None = None,
        dilation_rates: list[int] | None = None,
        position: str | None = None,
        activation_checkpointing: bool | None = None,
        attn_backend: str | None = None,
        dropout: float | None = None,
        overrides: dict[str, Any] | None = None,
        lr: float = 6e-4,
        min_lr: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        warmup_steps: int = 750,
        decay_steps: int | None = None,
        decay_power: float = 1.0,
        compile: bool = False,
        cuda_graphs: bool = False,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        generation_seed: int = 0,
        stop_at_eos: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        if model not in PRESETS:
            raise ValueError(f"model={model!r} is not a preset; choose one of {list(PRESETS)}")
        if (segment_lengths is None) != (dilation_rates is None):
            raise ValueError("segment_lengths and dilation_rates go together: give both, or neither (use pattern=...)")
        _positive_int("vocab_size", vocab_size, allow_none=True)
        _positive_int("seq_len", seq_len, allow_none=True)
        _positive_int("max_new_tokens", max_new_tokens)
        _positive_int("top_k", top_k, allow_none=True)
        _positive_int("decay_steps", decay_steps, allow_none=True)
        if not (lr > 0 and 0 <= min_lr <= lr):
            bad = f"lr={lr!r} must be > 0" if not lr > 0 else f"min_lr={min_lr!r} must be in [0, lr={lr!r}]"
            raise ValueError(f"{bad} (the peak learning rate and the one at the end of the decay)")
        if warmup_steps < 0 or weight_decay < 0 or decay_power <= 0 or temperature < 0:
            raise ValueError(
                f"warmup_steps={warmup_steps} and weight_decay={weight_decay} must be >= 0, "
                f"decay_power={decay_power} > 0 and temperature={temperature} >= 0"
            )
        if cuda_graphs and not compile:
            raise ValueError("cuda_graphs=True replays the compiled loss: set compile=True too (or cuda_graphs=False)")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas={betas} must be two numbers in [0, 1)")
        self.model_config(vocab_size=vocab_size or 2)  # check the settings now; the model is built later
        self.model: LongNet | None = None  # built by configure_model, the one hook that builds it
        self.tokenizer_spec: dict | None = None  # the data's tokenizer; restored from checkpoints
        self._tokens = 0  # input tokens trained on (see tokens_seen)
        self._tokens_pending: torch.Tensor | None = None  # the part counted on the device, not yet read
        self._tokens_logged: torch.Tensor | None = None  # the running total on the device, for logging
        self._scalars: dict[str, torch.Tensor] = {}  # other logged numbers, on the device (_logged_scalar)
        self._tokenizer = None
        self._loss_fn = None
        self._bpb_note_shown = False
        self.val_nll, self.val_ppl = TokenNLL(), TokenPerplexity()
        self.test_nll, self.test_ppl = TokenNLL(), TokenPerplexity()
        self.val_bpb: BitsPerByte | None = None
        self.test_bpb: BitsPerByte | None = None

    # ------------------------------------------------------------------ building

    def model_config(self, vocab_size: int | None = None) -> LongNetConfig:
        """The ``LongNetConfig`` these hyperparameters describe (see :func:`.checkpoint.config_from_settings`)."""
        hp = dict(self.hparams)
        name, saved_vocab = hp.pop("model"), hp.pop("vocab_size", None)
        return ckpt_format.config_from_settings(name, vocab_size or saved_vocab, **hp)

    def _sizes_from_data(self) -> None:
        """Fill the ``vocab_size`` / ``seq_len`` hyperparameters left None from ``trainer.datamodule``."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        for name in ("vocab_size", "seq_len"):
            value = getattr(dm, name, None)
            if self.hparams.get(name) is None and value is not None:
                self.hparams[name] = int(value)  # saved, so load_from_checkpoint rebuilds the same model

    def configure_model(self) -> None:
        """Build the LongNet (the only place it is built) and compile its loss if asked.

        Lightning calls this hook in ``fit``/``validate``/``test``/``predict`` and in
        ``load_from_checkpoint``, inside the strategy's context (so a sharding strategy can wrap
        the creation); direct use builds it on first need.
        """
        if self.model is None:
            self._sizes_from_data()
            self.model = LongNet(self.model_config())
        if self.hparams.compile and self._loss_fn is None:
            self._loss_fn = torch.compile(self.model.loss, mode="reduce-overhead" if self._graphs else None)

    @property
    def _graphs(self) -> bool:
        return bool(self.hparams.get("cuda_graphs", False))

    def _compiled_loss(self, x: torch.Tensor):
        """The compiled loss, or None; with CUDA graphs, each call starts a new replay (its
        outputs are read before the next one, so they may share the graphs' memory)."""
        if self._loss_fn is None or not self._graphs:
            return self._loss_fn
        world = self._trainer.world_size if self._trainer is not None else 1
        if world > 1:
            raise ValueError(f"model.cuda_graphs=true runs on one device, but this run has {world} processes; "
                             "set model.cuda_graphs=false")
        if x.device.type != "cuda":
            raise ValueError(f"model.cuda_graphs=true needs a CUDA device, but the batch is on {x.device}; "
                             "set model.cuda_graphs=false")
        torch.compiler.cudagraph_mark_step_begin()
        return self._loss_fn

    @property
    def tokens_seen(self) -> int:
        """Input tokens trained on, over all ranks (each token once); kept in checkpoints.

        With several processes the per-step counts stay on the device, so that no training step
        waits for the GPU; reading this property fetches them (one sync)."""
        if self._tokens_pending is not None:
            self._tokens += int(self._tokens_pending.item())
            self._tokens_pending = None
        return self._tokens

    @tokens_seen.setter
    def tokens_seen(self, value: int) -> None:
        self._tokens, self._tokens_pending, self._tokens_logged = int(value), None, None

    def _logged_scalar(self, name: str, value: float) -> torch.Tensor:
        """``value`` in a float64 scalar kept on this module's device and filled in place (a fill
        is a kernel with the number as its argument, not a copy the host waits for)."""
        slot = self._scalars.get(name)
        if slot is None or slot.device != self.device:
            slot = self._scalars[name] = torch.zeros((), dtype=torch.float64, device=self.device)
        return slot.fill_(value)

    def _count_tokens(self, tokens: int | torch.Tensor) -> torch.Tensor:
        """Add one step's global token count (:func:`.distributed.strategy.global_mean`); the
        running total as a float64 scalar on this module's device, for logging. It is kept there
        and added to in place: a tensor made from a host number each step would be a copy to the
        GPU, which waits for it."""
        if self._tokens_logged is None or self._tokens_logged.device != self.device:
            start = torch.zeros((), dtype=torch.float64, device=self.device).add_(self._tokens)
            self._tokens_logged = start if self._tokens_pending is None else start.add_(self._tokens_pending)
        if isinstance(tokens, torch.Tensor):
            self._tokens_pending = tokens if self._tokens_pending is None else self._tokens_pending + tokens
        else:
            self._tokens += int(tokens)
        return self._tokens_logged.add_(tokens)

    @property
    def config(self) -> LongNetConfig:
        self._require_model()
        return self.model.config

    def _require_model(self) -> None:
        if self.model is None and (self.hparams.vocab_size is not None or self._trainer is not None):
            self.configure_model()
        if self.model is None:
            raise RuntimeError(
                "the model is not built yet: vocab_size was None, so it is built when a Trainer starts "
                "(configure_model); pass vocab_size=... to build it at once"
            )

    @property
    def tokenizer(self):
        """The tokenizer of ``tokenizer_spec`` (the training data's, or the checkpoint's)."""
        if self.tokenizer_spec is None:
            return None
        if self._tokenizer is None:
            from .data.tokenizers import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_spec)
        return self._tokenizer

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]`` of token ids ``[B, T]``."""
        self._require_model()
        return self.model(idx)

    def token_nll(self, batch: dict[str, torch.Tensor], group=None, reduction: str = "none") -> torch.Tensor:
        """Per-token NLL ``[B, T]`` (0 where ``labels == IGNORE_INDEX``), chunked over the LM head;
        their sum with ``reduction="sum"`` (one GEMM fewer when trained). With a sequence
        ``group``, ``batch`` is this rank's chunk of each sequence."""
        self._require_model()
        x, y = batch["input_ids"], batch["labels"]
        if group is not None:
            return self.model.loss(x, y, reduction=reduction, group=group)
        fn = self._compiled_loss(x) or self.model.loss
        return fn(x, y, reduction=reduction)

    def _local_batch(self, batch: dict[str, torch.Tensor]):
        """``(this rank's chunk of the batch, sequence group)``: the whole batch without
        sequence parallelism (see :class:`~.distributed.SequenceParallelStrategy`)."""
        group = sequence_group_of(self._trainer) if self._trainer is not None else None
        return split_batch(batch, group), group

    # ------------------------------------------------------------------ data-dependent state

    def _adopt_tokenizer(self, spec: dict | None, source: str, tokenizer: Any = None) -> None:
        """The one tokenizer check: the data's and the checkpoint's tokenizers must agree.

        ``spec``: the tokenizer met now (from the data, or from a checkpoint being restored);
        prediction may use another tokenizer than training (prompts are only text).
        """
        if spec is None:
            return
        predicting = self._trainer is not None and self.trainer.predicting
        if self.tokenizer_spec is not None and spec != self.tokenizer_spec and not predicting:
            raise ValueError(
                f"the {source}'s tokenizer differs from the one this model was trained with; use the "
                "checkpoint's tokenizer for the data (data.tokenizer; LongNetLM.tokenizer_spec holds it)"
            )
        if spec != self.tokenizer_spec:
            self.tokenizer_spec, self._tokenizer = spec, tokenizer

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        tok = _data_tokenizer(dm)
        if tok is not None and (self.tokenizer_spec is None or stage != "predict"):
            self._adopt_tokenizer(tok.spec(), "data", tok)
        if stage in ("fit", "validate", "test"):
            table = _token_bytes_of(dm, tok)
            if table is not None:
                self._sizes_from_data()  # the model itself is built later, in configure_model
                if self.hparams.vocab_size is not None:
                    ckpt_format.check_tokenizer(table.numel(), self.hparams.vocab_size, "the data")
                self.val_bpb, self.test_bpb = BitsPerByte(table), BitsPerByte(table)
            elif not self._bpb_note_shown:
                self._bpb_note_shown = True
                rank_zero_info(
                    "bits per byte is not logged: the data module has no tokenizer with a token_bytes() table"
                )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        version = getattr(sys.modules.get(__package__), "__version__", "unknown")
        self._require_model()
        ckpt_format.mark(checkpoint, self.model.config, version)
        hparams = checkpoint.get("hyper_parameters")
        if isinstance(hparams, dict) and "_class_path" in hparams:  # the defining module, not a re-export
            hparams["_class_path"] = f"{type(self).__module__}.{type(self).__qualname__}"
        checkpoint["tokenizer_spec"] = self.tokenizer_spec
        checkpoint["tokens_seen"] = int(self.tokens_seen)
        self._keep_epoch_open(checkpoint)

    def _keep_epoch_open(self, checkpoint: dict) -> None:
        """A run that stops at ``max_steps`` in mid-epoch saves ``last.ckpt`` after Lightning has
        marked the epoch finished, so resuming it (with a larger max_steps) would start the next
        epoch and draw different batches than an uninterrupted run. Re-open the epoch in the
        saved loop state, so the resumed run continues the same epoch where it stopped (the data
        loader's own state says how many batches it already gave)."""
        trainer = self._trainer
        if trainer is None or not trainer.training or trainer.max_steps is None or trainer.max_steps < 0:
            return
        if trainer.global_step < trainer.max_steps:
            return
        try:
            fit = checkpoint["loops"]["fit_loop"]
            epochs = fit["epoch_progress"]
            if fit["epoch_loop.batch_progress"]["is_last_batch"]:
                return  # the epoch really ended
            if epochs["current"]["completed"] != epochs["current"]["ready"] or epochs["current"]["completed"] < 1:
                return  # still open (a periodic checkpoint)
            for part in ("total", "current"):
                epochs[part]["processed"] -= 1
                epochs[part]["completed"] -= 1
            checkpoint["epoch"] = max(0, checkpoint["epoch"] - 1)
        except (KeyError, TypeError):
            return  # a Lightning version with another loop layout: leave it alone

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._adopt_tokenizer(checkpoint.get("tokenizer_spec"), "checkpoint")
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args: Any, **kwargs: Any):
        """Lightning's ``load_from_checkpoint``, after :func:`.checkpoint.verify_archive` refused
        a truncated or damaged file (for a path; file objects are passed on unchecked)."""
        if isinstance(checkpoint_path, (str, os.PathLike)):
            ckpt_format.verify_archive(checkpoint_path, "checkpoint_path")
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    # ------------------------------------------------------------------ steps

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Mean NLL over every scored token of the global batch (all ranks, each token once)."""
        batch, group = self._local_batch(batch)
        nll_sum = self.token_nll(batch, group, reduction="sum")
        scored = (batch["labels"] != IGNORE_INDEX).sum()
        loss, mean, tokens = global_mean(nll_sum, scored, batch["input_ids"].numel())
        # No prog_bar=True and no host values: Lightning reads progress-bar values with .item()
        # several times per batch, and turns a logged number into a new tensor copied to the GPU;
        # either makes the host wait for the GPU, so it could not queue the next step meanwhile.
        # The CLI's progress bars show train/loss from a copy that does not wait (callbacks.py).
        self.log("train/loss", mean, on_step=True, on_epoch=False)
        self.log("train/lr", self._logged_scalar("lr", self.trainer.optimizers[0].param_groups[0]["lr"]),
                 on_step=True, on_epoch=False)
        self.log("train/tokens", self._count_tokens(tokens), on_step=True, on_epoch=False)
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], prefix: str) -> None:
        batch, group = self._local_batch(batch)  # metrics sum over all ranks: each token once
        nll = self.token_nll(batch, group)
        names = [("loss", f"{prefix}_nll"), ("ppl", f"{prefix}_ppl")]
        if getattr(self, f"{prefix}_bpb") is not None:
            names.append(("bpb", f"{prefix}_bpb"))
        for name, attribute in names:
            metric = getattr(self, attribute)
            metric.update(nll, batch["labels"])
            self.log(f"{prefix}/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "loss",
                     batch_size=batch["input_ids"].shape[0], metric_attribute=attribute)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    # ------------------------------------------------------------------ gradient buffers

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._graphs:
            keep_gradient_buffers(self.parameters())

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        # With CUDA graphs a gradient must never *be* a replay's output (see keep_gradient_buffers).
        optimizer.zero_grad(set_to_none=not self._graphs)

    # ------------------------------------------------------------------ optimizer

    def parameter_groups(self) -> list[dict]:
        """AdamW groups (:func:`.optim.weight_decay_groups`): only linear weight matrices decay."""
        self._require_model()
        return weight_decay_groups(self, self.hparams.weight_decay)

    def lr_schedule(self, decay_steps: int, warmup_steps: int | None = None):
        """``step -> multiplier of lr``: :func:`.optim.lr_factor` with these hyperparameters
        (``warmup_steps`` defaults to the hyperparameter; :meth:`configure_optimizers` passes the
        warm-up shortened to the schedule's length)."""
        hp = self.hparams
        warmup = hp.warmup_steps if warmup_steps is None else warmup_steps
        return partial(lr_factor, warmup_steps=warmup, decay_steps=decay_steps,
                       min_ratio=hp.min_lr / hp.lr, power=hp.decay_power)

    def _schedule_length(self) -> tuple[int, str]:
        """``(steps, where that number came from)``: decay_steps, max_steps or the estimated total."""
        if self.hparams.decay_steps is not None:
            return self.hparams.decay_steps, "model.decay_steps"
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return self.trainer.max_steps, "trainer.max_steps"
        steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(steps):
            raise ValueError(
                "the learning-rate decay needs a length: set trainer.max_steps, trainer.max_epochs "
                "or model.decay_steps"
            )
        return int(steps), "the trainer's estimated total steps"

    def total_decay_steps(self) -> int:
        """``decay_steps``, else the Trainer's max_steps / estimated total optimizer steps."""
        return self._schedule_length()[0]

    def effective_warmup_steps(self, decay_steps: int, source: str = "the schedule") -> int:
        """``warmup_steps``, shortened (with one warning) to ``decay_steps`` when the schedule is
        shorter than the warm-up: a short run (``--trainer.max_steps 3``, ``fast_dev_run``) of a
        recipe warms up over all of its steps instead of failing."""
        warmup = self.hparams.warmup_steps
        if decay_steps >= warmup:
            return warmup
        rank_zero_warn(
            f"model.warmup_steps={warmup} is longer than the schedule ({source} = {decay_steps}); "
            f"warming up over {decay_steps} steps instead (set model.warmup_steps <= {decay_steps} to silence this)"
        )
        return decay_steps

    def configure_optimizers(self):
        hp = self.hparams
        # not fused=True: Lightning refuses gradient clipping (the recipes clip at 2.0) with fused optimizers
        opt = torch.optim.AdamW(self.parameter_groups(), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)
        steps, source = self._schedule_length()
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, self.lr_schedule(steps, self.effective_warmup_steps(steps, source)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate_ids(self, prompt_ids: torch.Tensor, max_new_tokens: int | None = None,
                     temperature: float | None = None, top_k: int | None = None,
                     generator: torch.Generator | None = None, eos_id: int | None = None) -> torch.Tensor:
        """Sample after ``prompt_ids`` ``[1, N]``; returns only the new ids ``[1, n <= max_new_tokens]``.

        The context is cropped to the last ``seq_len`` tokens (the training length) when known.
        """
        self._require_model()
        hp = self.hparams
        out = self.model.generate(
            prompt_ids, hp.max_new_tokens if max_new_tokens is None else max_new_tokens,
            temperature=hp.temperature if temperature is None else temperature,
            top_k=hp.top_k if top_k is None else top_k, generator=generator,
            max_context=hp.seq_len or None, eos_id=eos_id,
        )
        return out[:, prompt_ids.shape[1]:]

    def generate(self, prompts: str | Sequence[str], first_index: int = 0, **settings) -> list[str]:
        """Completions (decoded text, prompt excluded) of one or more prompts, with this model's tokenizer.

        ``settings`` override ``max_new_tokens``, ``temperature``, ``top_k``. Prompt i is sampled
        with seed ``generation_seed + first_index + i``, so results do not depend on batching.
        """
        tok = self.tokenizer
        if tok is None:
            raise ValueError(
                "no tokenizer: generation uses the tokenizer stored in the checkpoint "
                "(pass --ckpt_path of a model trained here) or the training data module's"
            )
        if isinstance(prompts, str):
            prompts = [prompts]
        was_training = self.training
        self.eval()
        out = []
        try:
            for i, prompt in enumerate(prompts):
                ids = [tok.eos_id] + [int(t) for t in tok.encode(prompt)]  # a document starts after EOS
                if self.hparams.seq_len and len(ids) > self.hparams.seq_len:
                    rank_zero_warn(f"prompt {first_index + i} has {len(ids)} tokens; only the last "
                                   f"seq_len={self.hparams.seq_len} are used as context")
                gen = torch.Generator().manual_seed(self.hparams.generation_seed + first_index + i)
                x = torch.tensor([ids], dtype=torch.long, device=self.device)
                eos = tok.eos_id if self.hparams.stop_at_eos else None
                new = self.generate_ids(x, generator=gen, eos_id=eos, **settings)
                out.append(tok.decode(new[0].tolist()))
        finally:
            self.train(was_training)
        return out

    def predict_step(self, batch: list[dict], batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        """``batch``: list of ``{"index", "prompt"}`` → the same with ``"completion"`` added."""
        completions = []
        for item in batch:
            completions.append({**item, "completion": self.generate(item["prompt"], first_index=item["index"])[0]})
        return completions


__all__ = ["LongNetLM"]
