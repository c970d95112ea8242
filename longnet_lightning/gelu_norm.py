"""The feed-forward's fc1 bias, GELU and sub-LayerNorm (MAGNETO) as one operator.

``gelu_layer_norm(h [..., F], weight [F], bias [F], eps, in_bias [F])`` → ``LayerNorm(GELU(h + in_bias))``
``[..., F]`` in ``h``'s dtype: the bias add, the exact (erf) GELU and the normalisation computed in
float32 (float64 for float64 inputs), with no rounding between them, the result rounded once.
``in_bias`` (optional) is the first linear's bias: the model runs ``fc1`` without it, so its
gradient, the column sums of ``dh``, comes out of the backward pass instead of another pass over ``dh``.

* Forward, one pass per row: the bias add and GELU, the row's mean and reciprocal standard
  deviation (kept for the backward, 8 bytes per row), the normalised and scaled output. The GELU output never reaches
  memory. The erf's instructions, not memory, bound the pass, so a row of 3 x 2^k columns (the
  125M model's 3072) is taken as three unpadded chunks rather than one padded to 4096.
* Backward, one pass per row: GELU again from ``h``, then ``dh``; each program also sums
  ``dweight``, ``dbias`` (and ``d in_bias``) over its rows in float32, and the few programs'
  partial sums are added at the end.

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

def _input(h, in_bias):
    """``h + in_bias`` in the accumulation dtype."""
    x = h.to(_acc_dtype(h.dtype))
    return x if in_bias is None else x + in_bias.to(x.dtype)


def _forward_torch(h, weight, bias, eps, in_bias=None):
    """``(y [M, F] in h's dtype, mean [M], rstd [M])`` of rows ``h`` ``[M, F]``."""
    acc = _acc_dtype(h.dtype)
    g = F.gelu(_input(h, in_bias))
    var, mean = torch.var_mean(g, dim=1, correction=0)
    rstd = torch.rsqrt(var + eps)
    y = (g - mean[:, None]) * rstd[:, None] * weight.to(acc) + bias.to(acc)
    return y.to(h.dtype), mean, rstd


def _gelu_grad(x: torch.Tensor) -> torch.Tensor:
    """d GELU(x) / dx for the exact GELU ``x * Phi(x)``: ``Phi(x) + x * phi(x)``."""
    return 0.5 * (1.0 + torch.erf(x * math.sqrt(0.5))) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _backward_torch(dy, h, weight, mean, rstd, in_bias=None):
    """``(dh [M, F] in h's dtype, dweight [F], dbias [F], d in_bias [F] or None in the accumulation dtype)``."""
    acc = _acc_dtype(h.dtype)
    x, dy = _input(h, in_bias), dy.to(acc)
    xhat = (F.gelu(x) - mean[:, None]) * rstd[:, None]
    wdy = dy * weight.to(acc)
    c1 = (xhat * wdy).mean(1, keepdim=True)
    c2 = wdy.mean(1, keepdim=True)
    dx = (wdy - xhat * c1 - c2) * rstd[:, None] * _gelu_grad(x)
    return dx.to(h.dtype), (dy * xhat).sum(0), dy.sum(0), None if in_bias is None else dx.sum(0)


# ----------------------------------------------------------------------------------------------
# Triton (CUDA; CPU through Triton's interpreter in the tests)
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _cdf_pdf(x):
        """The standard normal CDF and density at ``x`` (float32): ``GELU(x) = x * cdf``."""
        return 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)), tl.exp(-0.5 * x * x) * 0.3989422804014327

    @triton.jit
    def _load(P, r, stride, cols, in_rows, NCOL):
        """One chunk ``[ROWS, CHUNK]`` of rows ``r`` as float32 (0 outside), and its mask."""
        ok = in_rows[:, None] & (cols[None, :] < NCOL)
        return tl.load(P + r * stride + cols[None, :], mask=ok, other=0.0).to(tl.float32), ok

    @triton.jit
    def _input_chunk(H, IB, r, stride_h, cols, in_rows, NCOL, HAS_IB: tl.constexpr):
        """One chunk of ``h + in_bias`` as float32 (0 outside), and its mask; ``in_bias`` is loaded
        here, just before its use (a vector loaded earlier stays live in registers and slows the pass)."""
        x, ok = _load(H, r, stride_h, cols, in_rows, NCOL)
        if HAS_IB:
            x += tl.load(IB + cols, mask=cols < NCOL, other=0.0).to(tl.float32)[None, :]
        return x, ok

    @triton.jit
    def _gelu_chunk(H, IB, r, stride_h, cols, in_rows, NCOL, HAS_IB: tl.constexpr):
        x, ok = _input_chunk(H, IB, r, stride_h, cols, in_rows, NCOL, HAS_IB)
        cdf, _ = _cdf_pdf(x)
        return tl.where(ok, x * cdf, 0.0), ok

    @triton.jit
    def _store_normalised(Y, W, B, r, stride_y, cols, d, rstd, ok, NCOL):
        w = tl.load(W + cols, mask=cols < NCOL, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=cols < NCOL, other=0.0).to(tl.float32)
        y = d * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(Y + r * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)

    @triton.jit
    def _gln_forward_kernel(H, W, B, IB, Y, MEAN, RSTD, M, NCOL, stride_h, stride_y, eps,
                            ROWS: tl.constexpr, CHUNK: tl.constexpr, THREE: tl.constexpr, HAS_IB: tl.constexpr):
        """``ROWS`` rows per program; a row is one chunk of ``CHUNK`` columns, or with ``THREE``
        three (so a width of 3 x 2^k, such as 3072, wastes no lanes on padding)."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        in_rows = rows < M
        r = rows.to(tl.int64)[:, None]
        c0 = tl.arange(0, CHUNK)
        # with three chunks, each row sum adds the chunks elementwise first: one reduction (one
        # pass through shared memory) per statistic, not three
        g0, ok0 = _gelu_chunk(H, IB, r, stride_h, c0, in_rows, NCOL, HAS_IB)
        if THREE:
            g1, ok1 = _gelu_chunk(H, IB, r, stride_h, c0 + CHUNK, in_rows, NCOL, HAS_IB)
            g2, ok2 = _gelu_chunk(H, IB, r, stride_h, c0 + 2 * CHUNK, in_rows, NCOL, HAS_IB)
            mean = tl.sum(g0 + g1 + g2, 1) / NCOL
        else:
            mean = tl.sum(g0, 1) / NCOL
        d0 = tl.where(ok0, g0 - mean[:, None], 0.0)
        if THREE:
            d1 = tl.where(ok1, g1 - mean[:, None], 0.0)
            d2 = tl.where(ok2, g2 - mean[:, None], 0.0)
            var = tl.sum(d0 * d0 + d1 * d1 + d2 * d2, 1)
        else:
            var = tl.sum(d0 * d0, 1)
        rstd = 1.0 / tl.sqrt(var / NCOL + eps)
        _store_normalised(Y, W, B, r, stride_y, c0, d0, rstd, ok0, NCOL)
        if THREE:
            _store_normalised(Y, W, B, r, stride_y, c0 + CHUNK, d1, rstd, ok1, NCOL)
            _store_normalised(Y, W, B, r, stride_y, c0 + 2 * CHUNK, d2, rstd, ok2, NCOL)
        tl.store(MEAN + rows, mean, mask=in_rows)
        tl.store(RSTD + rows, rstd, mask=in_rows)

    @triton.jit
    def _backward_inputs(DY, H, W, IB, r, stride_dy, stride_h, cols, in_rows, mean, rstd, NCOL,
                         HAS_IB: tl.constexpr):
        """One chunk's ``xhat``, ``dy``, ``w * dy`` and ``GELU'(x)``, and its mask."""
        x, ok = _input_chunk(H, IB, r, stride_h, cols, in_rows, NCOL, HAS_IB)
        dy, _ = _load(DY, r, stride_dy, cols, in_rows, NCOL)
        w = tl.load(W + cols, mask=cols < NCOL, other=0.0).to(tl.float32)
        cdf, pdf = _cdf_pdf(x)
        xhat = tl.where(ok, (x * cdf - mean[:, None]) * rstd[:, None], 0.0)
        return xhat, dy, dy * w[None, :], cdf + x * pdf, ok

    @triton.jit
    def _store_dh(DH, r, stride_dh, cols, xhat, wdy, dgelu, c1, c2, rstd, ok):
        """Store one chunk of ``dh``; return it in float32 (0 outside)."""
        dx = tl.where(ok, (wdy - xhat * c1[:, None] - c2[:, None]) * rstd[:, None] * dgelu, 0.0)
        tl.store(DH + r * stride_dh + cols[None, :], dx.to(DH.dtype.element_ty), mask=ok)
        return dx

    @triton.jit
    def _store_partial(P, base, cols, v, NCOL):
        tl.store(P + base + cols, v, mask=cols < NCOL)

    @triton.jit
    def _gln_backward_kernel(DY, H, W, IB, MEAN, RSTD, DH, DW, DB, DIB, M, NCOL, stride_dy, stride_h, stride_dh,
                             ROWS: tl.constexpr, CHUNK: tl.constexpr, THREE: tl.constexpr, HAS_IB: tl.constexpr):
        """Programs loop over groups of ``ROWS`` rows (pid, pid + programs, ...), each summing its
        rows' ``dweight``, ``dbias`` and ``d in_bias`` (float32), stored at ``[pid]``; chunks as forward."""
        pid, programs = tl.program_id(0), tl.num_programs(0)
        c0 = tl.arange(0, CHUNK)
        k1, k2 = c0 + CHUNK, c0 + 2 * CHUNK
        dw0, db0, dib0 = tl.zeros([CHUNK], tl.float32), tl.zeros([CHUNK], tl.float32), tl.zeros([CHUNK], tl.float32)
        if THREE:
            dw1, db1, dib1 = tl.zeros([CHUNK], tl.float32), tl.zeros([CHUNK], tl.float32), tl.zeros([CHUNK], tl.float32)
            dw2, db2, dib2 = tl.zeros([CHUNK], tl.float32), tl.zeros([CHUNK], tl.float32), tl.zeros([CHUNK], tl.float32)
        for i in range(0, tl.cdiv(tl.cdiv(M, ROWS) - pid, programs)):
            rows = (pid + i * programs) * ROWS + tl.arange(0, ROWS)
            in_rows = rows < M
            r = rows.to(tl.int64)[:, None]
            mean = tl.load(MEAN + rows, mask=in_rows, other=0.0)
            rstd = tl.load(RSTD + rows, mask=in_rows, other=0.0)
            xh0, dy0, wdy0, dgelu0, ok0 = _backward_inputs(DY, H, W, IB, r, stride_dy, stride_h, c0, in_rows, mean,
                                                           rstd, NCOL, HAS_IB)
            if THREE:
                xh1, dy1, wdy1, dgelu1, ok1 = _backward_inputs(DY, H, W, IB, r, stride_dy, stride_h, k1, in_rows,
                                                               mean, rstd, NCOL, HAS_IB)
                xh2, dy2, wdy2, dgelu2, ok2 = _backward_inputs(DY, H, W, IB, r, stride_dy, stride_h, k2, in_rows,
                                                               mean, rstd, NCOL, HAS_IB)
                c1 = tl.sum(xh0 * wdy0 + xh1 * wdy1 + xh2 * wdy2, 1) / NCOL
                c2 = tl.sum(wdy0 + wdy1 + wdy2, 1) / NCOL
            else:
                c1 = tl.sum(xh0 * wdy0, 1) / NCOL
                c2 = tl.sum(wdy0, 1) / NCOL
            dx0 = _store_dh(DH, r, stride_dh, c0, xh0, wdy0, dgelu0, c1, c2, rstd, ok0)
            dw0 += tl.sum(dy0 * xh0, 0)
            db0 += tl.sum(dy0, 0)
            if HAS_IB:
                dib0 += tl.sum(dx0, 0)
            if THREE:
                dx1 = _store_dh(DH, r, stride_dh, k1, xh1, wdy1, dgelu1, c1, c2, rstd, ok1)
                dx2 = _store_dh(DH, r, stride_dh, k2, xh2, wdy2, dgelu2, c1, c2, rstd, ok2)
                dw1 += tl.sum(dy1 * xh1, 0)
                db1 += tl.sum(dy1, 0)
                dw2 += tl.sum(dy2 * xh2, 0)
                db2 += tl.sum(dy2, 0)
                if HAS_IB:
                    dib1 += tl.sum(dx1, 0)
                    dib2 += tl.sum(dx2, 0)
        base = pid.to(tl.int64) * NCOL
        _store_partial(DW, base, c0, dw0, NCOL)
        _store_partial(DB, base, c0, db0, NCOL)
        if HAS_IB:
            _store_partial(DIB, base, c0, dib0, NCOL)
        if THREE:
            _store_partial(DW, base, k1, dw1, NCOL)
            _store_partial(DB, base, k1, db1, NCOL)
            _store_partial(DW, base, k2, dw2, NCOL)
            _store_partial(DB, base, k2, db2, NCOL)
            if HAS_IB:
                _store_partial(DIB, base, k1, dib1, NCOL)
                _store_partial(DIB, base, k2, dib2, NCOL)


@dataclass
class Launch:
    """How the passes launch (measured on an H200 with ``benchmarks.gelu_norm --sweep``): rows
    per program and warps of the forward; rows per step, warps and programs per SM of the
    backward (each program sums dweight and dbias over its rows); ``*_three``: whether a pass
    takes a row of 3 x 2^k columns as three unpadded chunks (see ``_layout``)."""

    fwd_rows: int = 1
    fwd_warps: int = 4
    fwd_three: bool = True
    bwd_rows: int = 2
    bwd_warps: int = 16
    bwd_programs_per_sm: int = 1
    bwd_three: bool = False


LAUNCH = Launch()


def _layout(f: int, three: bool = True) -> tuple[int, bool]:
    """``(CHUNK, THREE)``: a row of ``f`` columns as three chunks of a power of two when allowed
    and that pads less than one power-of-two chunk (3072 = 3 x 1024 pads nothing; one chunk of
    4096 would compute 1024 padding lanes)."""
    p = max(16, 1 << (f - 1).bit_length())
    return (p // 4, True) if three and p >= 64 and 4 * f <= 3 * p else (p, False)


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
def _gln_op(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, in_bias: torch.Tensor | None, eps: float,
            use_triton: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``y`` ``[M, F]`` (h's dtype), and per row ``mean``, ``rstd`` ``[M]`` (float32/64)."""
    m, f = h.shape
    if _triton_ok(h, use_triton):
        try:
            y = torch.empty_like(h, memory_format=torch.contiguous_format)
            mean = torch.empty(m, dtype=torch.float32, device=h.device)
            rstd = torch.empty(m, dtype=torch.float32, device=h.device)
            rows = LAUNCH.fwd_rows
            chunk, three = _layout(f, LAUNCH.fwd_three)
            _gln_forward_kernel[(triton.cdiv(m, rows),)](h, weight, bias, weight if in_bias is None else in_bias, y,
                                                         mean, rstd, m, f, h.stride(0), y.stride(0), eps, ROWS=rows,
                                                         CHUNK=chunk, THREE=three, HAS_IB=in_bias is not None,
                                                         num_warps=LAUNCH.fwd_warps)
            return y, mean, rstd
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - compilation happens at the first launch
            _fell_back("_gln_forward_kernel", e)
    with torch.autocast(h.device.type, enabled=False):
        return _forward_torch(h, weight, bias, eps, in_bias)


@_gln_op.register_fake
def _(h, weight, bias, in_bias, eps, use_triton):
    acc = _acc_dtype(h.dtype)
    m = h.shape[0]
    return (torch.empty_like(h, memory_format=torch.contiguous_format), h.new_empty(m, dtype=acc),
            h.new_empty(m, dtype=acc))


@torch.library.custom_op("longnet::gelu_layer_norm_backward", mutates_args=())
def _gln_backward_op(dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, in_bias: torch.Tensor | None,
                     mean: torch.Tensor, rstd: torch.Tensor,
                     use_triton: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dh`` (h's dtype), ``dweight``, ``dbias`` (weight's dtype) and ``d in_bias`` (its dtype; empty
    without one), the last three summed in float32/64."""
    m, f = h.shape
    if _triton_ok(h, use_triton):
        try:
            dy = dy if dy.stride(-1) == 1 else dy.contiguous()
            dh = torch.empty_like(h, memory_format=torch.contiguous_format)
            rows = LAUNCH.bwd_rows
            programs = _backward_programs(h.device, triton.cdiv(m, rows))
            dw, db, dib = torch.empty(3, programs, f, dtype=torch.float32, device=h.device).unbind(0)
            chunk, three = _layout(f, LAUNCH.bwd_three)
            _gln_backward_kernel[(programs,)](dy, h, weight, weight if in_bias is None else in_bias, mean, rstd, dh,
                                              dw, db, dib, m, f, dy.stride(0), h.stride(0), dh.stride(0), ROWS=rows,
                                              CHUNK=chunk, THREE=three, HAS_IB=in_bias is not None,
                                              num_warps=LAUNCH.bwd_warps)
            dib = h.new_empty(0) if in_bias is None else dib.sum(0).to(in_bias.dtype)
            return dh, dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype), dib
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001
            _fell_back("_gln_backward_kernel", e)
    with torch.autocast(h.device.type, enabled=False):
        dh, dw, db, dib = _backward_torch(dy, h, weight, mean, rstd, in_bias)
    dib = h.new_empty(0) if in_bias is None else dib.to(in_bias.dtype)
    return dh, dw.to(weight.dtype), db.to(weight.dtype), dib


@_gln_backward_op.register_fake
def _(dy, h, weight, in_bias, mean, rstd, use_triton):
    dib = h.new_empty(0) if in_bias is None else torch.empty_like(in_bias)
    return (torch.empty_like(h, memory_format=torch.contiguous_format), torch.empty_like(weight),
            torch.empty_like(weight), dib)


def _gln_setup(ctx, inputs, output):
    h, weight, _bias, in_bias, _eps, ctx.use_triton = inputs
    ctx.has_in_bias = in_bias is not None
    ctx.save_for_backward(h, weight, in_bias, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _gln_backward(ctx, dy, _dmean, _drstd):
    h, weight, in_bias, mean, rstd = ctx.saved_tensors
    dh, dw, db, dib = _gln_backward_op(dy, h, weight, in_bias, mean, rstd, ctx.use_triton)
    return dh, dw, db, dib if ctx.has_in_bias else None, None, None


_gln_op.register_autograd(_gln_backward, setup_context=_gln_setup)


def gelu_layer_norm(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                    use_triton: bool | None = None, in_bias: torch.Tensor | None = None) -> torch.Tensor:
    """``LayerNorm(GELU(h + in_bias))`` over the last dim of ``h`` ``[..., F]`` with ``weight``,
    ``bias`` (and the optional ``in_bias``) ``[F]``.

    The result has ``h``'s dtype (under autocast: fc1's output dtype, what fc2 reads), computed as
    the module docstring says. ``use_triton``: the Triton passes (default: on CUDA tensors).
    """
    f = h.shape[-1]
    for name, t in (("weight", weight), ("bias", bias), ("in_bias", in_bias)):
        if t is not None and t.shape != (f,):
            raise ValueError(f"{name} {tuple(t.shape)} must be [{f}] for h {tuple(h.shape)}")
    if h.numel() == 0:
        return torch.empty_like(h)
    rows = h.reshape(-1, f)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y, _, _ = _gln_op(rows, weight, bias, in_bias, float(eps), h.is_cuda if use_triton is None else bool(use_triton))
    return y.view(h.shape)
