"""How dilated attention runs: one typed settings object, and the fallbacks taken at run time.

:class:`AttentionSettings` holds every knob of the attention's execution (never its result: any
two settings compute the same function, up to floating-point rounding). The model config carries
one, so a run's ``config.yaml`` and its checkpoints record how it ran. Nothing here is read from
environment variables.

:data:`FALLBACKS` is the one place where a process records that a fast path could not run here
(a Triton kernel that did not build, cuDNN attention that refused an input). Fallbacks change
which kernel computes a block, never the plan: the kernel calls, their order and every collective
depend on the pattern, the shapes and the settings only, so all ranks of a group take the same
plan whatever each one's fallbacks.
"""
from __future__ import annotations

import ast
import functools
from dataclasses import asdict, dataclass, fields

@dataclass(frozen=True)
class AttentionSettings:
    """Execution settings of :func:`~longnet_lightning.attention.dilated_attention`.

    Args:
        packed_max_tokens: causal inputs of at most this many tokens (``B * N``) take the packed
            plan (each branch gathered into dense blocks, few large kernel calls); longer ones
            the strided plan (copy-free views). Crossover measured on an H200.
        packed_fold: whole branches whose packed blocks have the same length share one call.
        forward_acc: ``"input"`` merges half-precision outputs in their own dtype (each merge
            computed in float32), ``"float32"`` in a float32 buffer (one rounding, more traffic).
        triton: ``"auto"`` (fused Triton data movement on CUDA when Triton builds), ``"off"``
            (PyTorch data movement everywhere) or ``"interpret"`` (also on CPU, through Triton's
            interpreter when ``TRITON_INTERPRET=1`` was set before Triton was imported: tests).
        sdpa_cuda: the ``sdpa`` backend's CUDA half-precision kernel: ``"cudnn"`` or ``"flash"``.
        torch_chunk_elems: score elements one chunk of the plain ``torch`` kernel may hold.
        xformers_force: use xformers' PyTorch-backed operators even when its C++ extension was
            built for another torch (at your own risk).
        max_rows_per_call: rows x heads per kernel call; bounds the transient per-call outputs
            (64 MiB per bf16 tensor at head dim 64) whatever N is. A covering ``r = 1`` branch
            whose results are the output buffer and the gradients is one call whatever its size.
        overlap: strided plan on CUDA: merge each kernel call's results (and sum its gradients)
            on a second stream while the next call's kernel runs (the kernels are compute-bound,
            the merges memory-bound). Same operations in the same order either way.
        split_first_backward: split the backward of a covering ``r = 1`` branch into calls of
            ``max_rows_per_call``, each call's gradients copied into dq, dk, dv. By default that
            branch runs as one call whose gradients *are* dq, dk, dv (nothing copied),
            while cuDNN holds a float32 dq of the whole input (a quarter of q, k, v, out, dout,
            dq, dk, dv together). Splitting saves that memory (at 1M tokens, 12.8 instead of
            15.2 GiB) and costs time (about 5% of the attention's forward+backward there).
    """

    packed_max_tokens: int = 2**17
    packed_fold: bool = True
    forward_acc: str = "input"
    triton: str = "auto"
    sdpa_cuda: str = "cudnn"
    torch_chunk_elems: int = 64 * 2**20
    xformers_force: bool = False
    max_rows_per_call: int = 2**19
    overlap: bool = True
    split_first_backward: bool = False

    def __post_init__(self):
        choices = {"forward_acc": ("input", "float32"), "triton": ("auto", "off", "interpret"),
                   "sdpa_cuda": ("cudnn", "flash")}
        for name, ok in choices.items():
            if getattr(self, name) not in ok:
                raise ValueError(f"attention setting {name}={getattr(self, name)!r}: use one of {list(ok)}")
        for name in ("packed_max_tokens", "torch_chunk_elems", "max_rows_per_call"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "packed_max_tokens" else 1):
                raise ValueError(f"attention setting {name}={v!r}: use a non-negative integer"
                                 if name == "packed_max_tokens" else
                                 f"attention setting {name}={v!r}: use a positive integer")
        for name in ("packed_fold", "xformers_force", "overlap", "split_first_backward"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"attention setting {name}={getattr(self, name)!r}: use true or false")

    @classmethod
    def of(cls, value: "AttentionSettings | dict | None") -> "AttentionSettings":
        """``value`` as settings: ``None`` gives the defaults, a dict its named fields."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(f"unknown attention settings {sorted(unknown)}; valid: {[f.name for f in fields(cls)]}")
            return cls(**value)
        raise ValueError(f"attention settings must be AttentionSettings or a dict, got {type(value).__name__}")

    def to_dict(self) -> dict:
        return asdict(self)

    def key(self) -> str:
        """These settings as one string, what the attention operator receives (:meth:`from_key`
        reads it back). Plain attribute reads, so ``torch.compile`` traces it to a constant."""
        return ";".join(f"{name}={getattr(self, name)!r}" for name in _NAMES)

    @staticmethod
    @functools.lru_cache(maxsize=32)
    def from_key(key: str) -> "AttentionSettings":
        return AttentionSettings(**{n: ast.literal_eval(v) for n, v in (p.split("=", 1) for p in key.split(";"))})


_NAMES = tuple(f.name for f in fields(AttentionSettings))


@dataclass
class Fallbacks:
    """Fast paths this process found it cannot run (``None``: not seen failing). Each is set once,
    with the reason, and said once as a warning."""

    triton: str | None = None  # a Triton kernel failed to build: PyTorch data movement from now on
    cudnn: str | None = None  # cuDNN attention raised: flash attention from now on

    def reset(self) -> None:
        self.triton = self.cudnn = None


FALLBACKS = Fallbacks()
