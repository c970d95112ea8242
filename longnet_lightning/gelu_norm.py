"""The feed-forward's GELU and its sub-LayerNorm (MAGNETO) as one operator.

``gelu_layer_norm(h [..., F], weight [F], bias [F], eps)`` → ``LayerNorm(GELU(h))`` ``[..., F]`` in
``h``'s dtype: the exact (erf) GELU and the normalisation computed in float32 (float64 for
float64 inputs), with no rounding between them, the result rounded once.

* Forward, one pass per row: GELU, the row's mean and reciprocal standard deviation (kept for the
  backward, 8 bytes per row), the normalised and scaled output. The GELU output never reaches
  memory.
* Backward, one pass per row: GELU again from ``h``, then ``dh``; each program also sums
  ``dweight`` and ``dbias`` over its rows in float32, and the few programs' partial sums are added
  at the end.

Compiled, the composition ``F.gelu`` then ``F.layer_norm`` becomes separate forward, backward and
weight-gradient kernels that read the ``[N, F]`` activations more often (benchmarks/RESULTS.md
has both timed). On CUDA the passes are Triton kernels; elsewhere (and for float64) plain
PyTorch, the specification the kernels are tested against. The operator is registered with
``torch.library``, so a compiled model keeps it as one call.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention.settings import FALLBACKS

try:  # Triton ships with CUDA builds of PyTorch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# PyTorch (any device, any float dtype): the specification
# ----------------------------------------------------------------------------------------------

def _forward_torch(h, weight, bias, eps):
    """``(y [M, F] in h's dtype, mean [M], rstd [M])`` of rows ``h`` ``[M, F]``."""
    acc = _acc_dtype(h.dtype)
    g = F.gelu(h.to(acc))
    var, mean = torch.var_mean(g, dim=1, correction=0)
    rstd = torch.rsqrt(var + eps)
    y = (g - mean[:, None]) * rstd[:, None] * weight.to(acc) + bias.to(acc)
    return y.to(h.dtype), mean, rstd


def _gelu_grad(x: torch.Tensor) -> torch.Tensor:
    """d GELU(x) / dx for the exact GELU ``x * Phi(x)``: ``Phi(x) + x * phi(x)``."""
    return 0.5 * (1.0 + torch.erf(x * math.sqrt(0.5))) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _backward_torch(dy, h, weight, mean, rstd):
    """``(dh [M, F] in h's dtype, dweight [F], dbias [F] in the accumulation dtype)``."""
    acc = _acc_dtype(h.dtype)
    x, dy = h.to(acc), dy.to(acc)
    xhat = (F.gelu(x) - mean[:, None]) * rstd[:, None]
    wdy = dy * weight.to(acc)
    c1 = (xhat * wdy).mean(1, keepdim=True)
    c2 = wdy.mean(1, keepdim=True)
    dg = (wdy - xhat * c1 - c2) * rstd[:, None]
    return (dg * _gelu_grad(x)).to(h.dtype), (dy * xhat).sum(0), dy.sum(0)


# ----------------------------------------------------------------------------------------------
# Triton (CUDA; CPU through Triton's interpreter in the tests)
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _gelu(x):
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))

    @triton.jit
    def _gln_forward_kernel(H, W, B, Y, MEAN, RSTD, M, NCOL, stride_h, stride_y, eps,
                            ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        in_rows = rows < M
        ok = in_rows[:, None] & (cols[None, :] < NCOL)
        r = rows.to(tl.int64)[:, None]
        x = tl.load(H + r * stride_h + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        g = tl.where(ok, _gelu(x), 0.0)
        mean = tl.sum(g, 1) / NCOL
        d = tl.where(ok, g - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / NCOL + eps)
        w = tl.load(W + cols, mask=cols < NCOL, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=cols < NCOL, other=0.0).to(tl.float32)
        y = d * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(Y + r * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)
        tl.store(MEAN + rows, mean, mask=in_rows)
        tl.store(RSTD + rows, rstd, mask=in_rows)

    @triton.jit
    def _gln_backward_kernel(DY, H, W, MEAN, RSTD, DH, DW, DB, M, NCOL, stride_dy, stride_h, stride_dh,
                             ROWS: tl.constexpr, BLOCK: tl.constexpr):
        pid, programs = tl.program_id(0), tl.num_programs(0)
        cols = tl.arange(0, BLOCK)
        w = tl.load(W + cols, mask=cols < NCOL, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], tl.float32)
        db = tl.zeros([BLOCK], tl.float32)
        for i in range(0, tl.cdiv(tl.cdiv(M, ROWS) - pid, programs)):  # row groups pid, pid + programs, ...
            rows = (pid + i * programs) * ROWS + tl.arange(0, ROWS)
            in_rows = rows < M
            ok = in_rows[:, None] & (cols[None, :] < NCOL)
            r = rows.to(tl.int64)[:, None]
            x = tl.load(H + r * stride_h + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            dy = tl.load(DY + r * stride_dy + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=in_rows, other=0.0)
            rstd = tl.load(RSTD + rows, mask=in_rows, other=0.0)
            cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
            xhat = tl.where(ok, (x * cdf - mean[:, None]) * rstd[:, None], 0.0)
            wdy = dy * w[None, :]
            c1 = tl.sum(xhat * wdy, 1) / NCOL
            c2 = tl.sum(wdy, 1) / NCOL
            dg = (wdy - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            dgelu = cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
            tl.store(DH + r * stride_dh + cols[None, :], (dg * dgelu).to(DH.dtype.element_ty), mask=ok)
            dw += tl.sum(dy * xhat, 0)
            db += tl.sum(dy, 0)
        tl.store(DW + pid.to(tl.int64) * NCOL + cols, dw, mask=cols < NCOL)
        tl.store(DB + pid.to(tl.int64) * NCOL + cols, db, mask=cols < NCOL)


@dataclass
class Launch:
    """How the passes launch (measured on an H200 with ``benchmarks.gelu_norm --sweep``): rows
    per program and warps of the forward; rows per step, warps and programs per SM of the
    backward (each program sums dweight and dbias over its rows)."""

    fwd_rows: int = 2
    fwd_warps: int = 8
    bwd_rows: int = 2
    bwd_warps: int = 16
    bwd_programs_per_sm: int = 1


LAUNCH = Launch()


def _block(f: int) -> int:
    """Elements of one row in a program: the row, padded to a power of two."""
    return max(16, 1 << (f - 1).bit_length())


def _backward_programs(device: torch.device, groups: int) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(groups, LAUNCH.bwd_programs_per_sm * sms))


def _triton_ok(h: torch.Tensor, use_triton: bool) -> bool:
    return use_triton and triton is not None and FALLBACKS.triton is None and h.dtype != torch.float64


def _fell_back(name: str, e: Exception) -> None:
    FALLBACKS.triton = f"{name}: {type(e).__name__}: {str(e).strip()[:300]}"
    warnings.warn(f"longnet_lightning: the Triton kernel {name} failed ({FALLBACKS.triton}); using PyTorch "
                  "from now on (slower)", stacklevel=3)


# ----------------------------------------------------------------------------------------------
# The operator
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("longnet::gelu_layer_norm", mutates_args=())
def _gln_op(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
            use_triton: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``y`` ``[M, F]`` (h's dtype), and per row ``mean``, ``rstd`` ``[M]`` (float32/64)."""
    m, f = h.shape
    if _triton_ok(h, use_triton):
        try:
            y = torch.empty_like(h, memory_format=torch.contiguous_format)
            mean = torch.empty(m, dtype=torch.float32, device=h.device)
            rstd = torch.empty(m, dtype=torch.float32, device=h.device)
            rows = LAUNCH.fwd_rows
            _gln_forward_kernel[(triton.cdiv(m, rows),)](h, weight, bias, y, mean, rstd, m, f, h.stride(0),
                                                         y.stride(0), eps, ROWS=rows, BLOCK=_block(f),
                                                         num_warps=LAUNCH.fwd_warps)
            return y, mean, rstd
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - compilation happens at the first launch
            _fell_back("_gln_forward_kernel", e)
    with torch.autocast(h.device.type, enabled=False):
        return _forward_torch(h, weight, bias, eps)


@_gln_op.register_fake
def _(h, weight, bias, eps, use_triton):
    acc = _acc_dtype(h.dtype)
    m = h.shape[0]
    return (torch.empty_like(h, memory_format=torch.contiguous_format), h.new_empty(m, dtype=acc),
            h.new_empty(m, dtype=acc))


@torch.library.custom_op("longnet::gelu_layer_norm_backward", mutates_args=())
def _gln_backward_op(dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                     rstd: torch.Tensor, use_triton: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dh`` (h's dtype), ``dweight`` and ``dbias`` (weight's dtype, summed in float32/64)."""
    m, f = h.shape
    if _triton_ok(h, use_triton):
        try:
            dy = dy if dy.stride(-1) == 1 else dy.contiguous()
            dh = torch.empty_like(h, memory_format=torch.contiguous_format)
            rows = LAUNCH.bwd_rows
            programs = _backward_programs(h.device, triton.cdiv(m, rows))
            dw = torch.empty(programs, f, dtype=torch.float32, device=h.device)
            db = torch.empty(programs, f, dtype=torch.float32, device=h.device)
            _gln_backward_kernel[(programs,)](dy, h, weight, mean, rstd, dh, dw, db, m, f, dy.stride(0),
                                              h.stride(0), dh.stride(0), ROWS=rows, BLOCK=_block(f),
                                              num_warps=LAUNCH.bwd_warps)
            return dh, dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001
            _fell_back("_gln_backward_kernel", e)
    with torch.autocast(h.device.type, enabled=False):
        dh, dw, db = _backward_torch(dy, h, weight, mean, rstd)
    return dh, dw.to(weight.dtype), db.to(weight.dtype)


@_gln_backward_op.register_fake
def _(dy, h, weight, mean, rstd, use_triton):
    return torch.empty_like(h, memory_format=torch.contiguous_format), torch.empty_like(weight), torch.empty_like(weight)


def _gln_setup(ctx, inputs, output):
    h, weight, _bias, _eps, ctx.use_triton = inputs
    ctx.save_for_backward(h, weight, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _gln_backward(ctx, dy, _dmean, _drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    dh, dw, db = _gln_backward_op(dy, h, weight, mean, rstd, ctx.use_triton)
    return dh, dw, db, None, None


_gln_op.register_autograd(_gln_backward, setup_context=_gln_setup)


def gelu_layer_norm(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                    use_triton: bool | None = None) -> torch.Tensor:
    """``LayerNorm(GELU(h))`` over the last dim of ``h`` ``[..., F]`` with ``weight``, ``bias`` ``[F]``.

    The result has ``h``'s dtype (under autocast: fc1's output dtype, what fc2 reads), computed as
    the module docstring says. ``use_triton``: the Triton passes (default: on CUDA tensors).
    """
    f = h.shape[-1]
    if weight.shape != (f,) or bias.shape != (f,):
        raise ValueError(f"weight {tuple(weight.shape)} and bias {tuple(bias.shape)} must be [{f}] for h "
                         f"{tuple(h.shape)}")
    if h.numel() == 0:
        return torch.empty_like(h)
    rows = h.reshape(-1, f)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y, _, _ = _gln_op(rows, weight, bias, float(eps), h.is_cuda if use_triton is None else bool(use_triton))
    return y.view(h.shape)
