"""The LM head and the next-token cross-entropy as one operator: logits never exist for more
than one chunk of tokens, in the forward or the backward.

``linear_cross_entropy(hidden [B, N, E], weight [V, E], labels [B, N], chunk)`` → NLL ``[B, N]``,
or with ``reduction="sum"`` their sum (the training loss).

* Forward, per chunk of ``chunk`` tokens: ``logits = h @ W^T`` in ``h``'s dtype (the rounding
  ``F.linear`` has under autocast), then one pass over each row: its log-sum-exp (float32) and
  ``nll = lse - logit[label]`` (0 where ``label = IGNORE_INDEX``). Only ``lse`` ``[T]`` is kept.
* Backward, per chunk: the logits again, one pass turning them in place into
  ``dlogits = (softmax - onehot) * dnll``, then ``dh = dlogits @ W`` and ``dW += dlogits^T @ h``
  (``dW`` summed in float32 over the chunks).

The summed loss needs one GEMM fewer: its gradient is one scalar times the gradient of the
sum, so the forward computes that gradient at once from the logits it has, per chunk, and the
backward only scales it (``dh`` is kept in ``hidden``'s dtype instead of ``hidden`` itself, and
``dW`` in float32). Three GEMMs per chunk instead of four; the same memory.

The row passes are Triton kernels on CUDA and plain PyTorch elsewhere (the specification the
kernels are tested against). The operator is registered with ``torch.library``, so a compiled
model keeps it as one call (its chunk loop is never unrolled into the graph).
"""
from __future__ import annotations

import warnings

import torch

from .attention.settings import FALLBACKS

try:  # Triton ships with CUDA builds of PyTorch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

IGNORE_INDEX = -100  # a label that is not scored


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Row passes over one chunk of logits [C, V]: PyTorch (any device) and Triton (CUDA)
# ----------------------------------------------------------------------------------------------

def _rows_forward_torch(logits, labels, lse, nll):
    x = logits.to(lse.dtype)
    torch.logsumexp(x, -1, out=lse)
    valid = labels != IGNORE_INDEX
    picked = x.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    nll.copy_(torch.where(valid, lse - picked, torch.zeros_like(lse)))


def _rows_backward_torch(logits, labels, lse, dnll):
    valid = labels != IGNORE_INDEX
    g = torch.where(valid, dnll, torch.zeros_like(dnll))
    p = torch.exp(logits.to(lse.dtype) - lse[:, None]) * g[:, None]
    p.scatter_add_(1, labels.clamp(min=0)[:, None], -g[:, None])
    logits.copy_(p)


if triton is not None:

    @triton.jit
    def _ce_forward_kernel(X, Y, LSE, NLL, V, stride, IGNORE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = X + row.to(tl.int64) * stride
        cols = tl.arange(0, BLOCK)
        m = tl.full([BLOCK], -1e30, tl.float32)  # finite: masked lanes give exp(-inf) = 0, never nan
        s = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
            m = m_new
        mx = tl.max(m, 0)
        lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), 0))
        y = tl.load(Y + row)
        ok = y != IGNORE
        picked = tl.load(base + tl.where(ok, y, 0)).to(tl.float32)
        tl.store(LSE + row, lse)
        tl.store(NLL + row, tl.where(ok, lse - picked, 0.0))

    @triton.jit
    def _ce_backward_kernel(X, Y, LSE, G, V, stride, IGNORE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = X + row.to(tl.int64) * stride
        cols = tl.arange(0, BLOCK)
        y = tl.load(Y + row)
        lse = tl.load(LSE + row)
        g = tl.where(y != IGNORE, tl.load(G + row), 0.0)
        for start in range(0, V, BLOCK):
            c = start + cols
            x = tl.load(base + c, mask=c < V, other=0.0).to(tl.float32)
            p = tl.exp(x - lse) * g
            p = tl.where(c == y, p - g, p)
            tl.store(base + c, p.to(X.dtype.element_ty), mask=c < V)


_BLOCK, _WARPS = 2048, 8  # elements of a row per step and warps per row


def _rows(kernel, torch_fn, logits, labels, lse, other, use_triton: bool) -> None:
    """One row pass over ``logits`` ``[C, V]``: ``kernel`` (Triton) where asked and it builds,
    else ``torch_fn``."""
    if use_triton and triton is not None and FALLBACKS.triton is None and logits.dtype != torch.float64:
        try:
            kernel[(logits.shape[0],)](logits, labels, lse, other, logits.shape[1], logits.stride(0),
                                       IGNORE=IGNORE_INDEX, BLOCK=_BLOCK, num_warps=_WARPS)
            return
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - compilation happens at the first launch
            FALLBACKS.triton = f"{kernel.__name__}: {type(e).__name__}: {str(e).strip()[:300]}"
            warnings.warn(f"longnet_lightning: the Triton kernel {kernel.__name__} failed ({FALLBACKS.triton}); "
                          "using PyTorch from now on (slower)", stacklevel=3)
    torch_fn(logits, labels, lse, other)


def _forward_rows(logits, labels, lse, nll, use_triton):
    _rows(_ce_forward_kernel if triton is not None else None, _rows_forward_torch, logits, labels, lse, nll,
          use_triton)


def _backward_rows(logits, labels, lse, dnll, use_triton):
    _rows(_ce_backward_kernel if triton is not None else None, _rows_backward_torch, logits, labels, lse, dnll,
          use_triton)


# ----------------------------------------------------------------------------------------------
# The operator
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("longnet::linear_cross_entropy", mutates_args=())
def _lce_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
            use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL ``[T]`` and log-sum-exp ``[T]`` (float32; float64 for float64 inputs)."""
    t, acc = hidden.shape[0], _acc_dtype(hidden.dtype)
    nll = torch.empty(t, dtype=acc, device=hidden.device)
    lse = torch.empty(t, dtype=acc, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(hidden.dtype)
        for i in range(0, t, chunk):
            j = min(t, i + chunk)
            _forward_rows(hidden[i:j] @ w.t(), labels[i:j], lse[i:j], nll[i:j], use_triton)
    return nll, lse


@_lce_op.register_fake
def _(hidden, weight, labels, chunk, use_triton):
    acc = _acc_dtype(hidden.dtype)
    return hidden.new_empty(hidden.shape[0], dtype=acc), hidden.new_empty(hidden.shape[0], dtype=acc)


def _gradient_buffers(hidden, weight) -> tuple[torch.Tensor, torch.Tensor]:
    """``dhidden`` (hidden's dtype, written per chunk) and ``dweight`` (zeros, float32/64, summed)."""
    return (torch.empty_like(hidden, memory_format=torch.contiguous_format),
            torch.zeros(weight.shape, dtype=_acc_dtype(weight.dtype), device=weight.device))


def _chunk_gradients(h, w, dlogits, labels, lse, dnll, dh, dw, use_triton) -> None:
    """Turn one chunk's logits ``dlogits`` ``[C, V]`` into their gradient in place, then write
    ``dh`` ``[C, E]`` and add the chunk's share to ``dw`` ``[V, E]``."""
    _backward_rows(dlogits, labels, lse, dnll, use_triton)
    torch.mm(dlogits, w, out=dh)
    dw += dlogits.t() @ h


@torch.library.custom_op("longnet::linear_cross_entropy_backward", mutates_args=())
def _lce_backward_op(dnll: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                     lse: torch.Tensor, chunk: int, use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``dhidden`` (hidden's dtype) and ``dweight`` (weight's dtype, summed in float32/64)."""
    t = hidden.shape[0]
    dnll = dnll.to(lse.dtype).contiguous()
    dh, dw = _gradient_buffers(hidden, weight)
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(hidden.dtype)
        for i in range(0, t, chunk):
            j = min(t, i + chunk)
            h = hidden[i:j]
            _chunk_gradients(h, w, h @ w.t(), labels[i:j], lse[i:j], dnll[i:j], dh[i:j], dw, use_triton)
    return dh, dw.to(weight.dtype)


@_lce_backward_op.register_fake
def _(dnll, hidden, weight, labels, lse, chunk, use_triton):
    return torch.empty_like(hidden, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _lce_setup(ctx, inputs, output):
    hidden, weight, labels, ctx.chunk, ctx.use_triton = inputs
    ctx.save_for_backward(hidden, weight, labels, output[1])
    ctx.mark_non_differentiable(output[1])


def _lce_backward(ctx, dnll, _dlse):
    hidden, weight, labels, lse = ctx.saved_tensors
    dh, dw = _lce_backward_op(dnll, hidden, weight, labels, lse, ctx.chunk, ctx.use_triton)
    return dh, dw, None, None, None


_lce_op.register_autograd(_lce_backward, setup_context=_lce_setup)


@torch.library.custom_op("longnet::linear_cross_entropy_sum", mutates_args=())
def _lce_sum_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                use_triton: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The summed NLL ``[]`` (float32/64), and its gradients: ``dhidden`` ``[T, E]`` (hidden's
    dtype) and ``dweight`` ``[V, E]`` (summed in float32/64), computed in the same chunk loop."""
    t, acc = hidden.shape[0], _acc_dtype(hidden.dtype)
    nll = torch.empty(t, dtype=acc, device=hidden.device)
    lse = torch.empty(t, dtype=acc, device=hidden.device)
    ones = torch.ones(min(t, chunk), dtype=acc, device=hidden.device)
    dh, dw = _gradient_buffers(hidden, weight)
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(hidden.dtype)
        for i in range(0, t, chunk):
            j = min(t, i + chunk)
            h, logits = hidden[i:j], hidden[i:j] @ w.t()
            _forward_rows(logits, labels[i:j], lse[i:j], nll[i:j], use_triton)
            _chunk_gradients(h, w, logits, labels[i:j], lse[i:j], ones[: j - i], dh[i:j], dw, use_triton)
    return nll.sum(), dh, dw


@_lce_sum_op.register_fake
def _(hidden, weight, labels, chunk, use_triton):
    acc = _acc_dtype(hidden.dtype)
    return (hidden.new_empty((), dtype=acc), torch.empty_like(hidden, memory_format=torch.contiguous_format),
            weight.new_empty(weight.shape, dtype=_acc_dtype(weight.dtype)))


def _lce_sum_setup(ctx, inputs, output):
    ctx.weight_dtype = inputs[1].dtype
    ctx.save_for_backward(output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _lce_sum_backward(ctx, dtotal, _dh, _dw):
    dh, dw = ctx.saved_tensors
    scale = dtotal.to(_acc_dtype(dh.dtype))
    return (dh * scale).to(dh.dtype), (dw * scale).to(ctx.weight_dtype), None, None, None


_lce_sum_op.register_autograd(_lce_sum_backward, setup_context=_lce_sum_setup)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                         use_triton: bool | None = None, reduction: str = "none") -> torch.Tensor:
    """Per-token NLL ``[B, N]`` of ``hidden`` ``[B, N, E]`` under the head ``weight`` ``[V, E]``;
    with ``reduction="sum"`` its sum ``[]``.

    ``labels`` ``[B, N]`` (``IGNORE_INDEX``: NLL 0, no gradient). Under autocast the head runs in
    the autocast dtype, as ``F.linear`` would. At most ``chunk x V`` logits exist at any time.
    ``use_triton``: the Triton row passes (default: on CUDA tensors). The sum, when a gradient is
    wanted, takes one GEMM fewer (the module docstring says how); its ``dhidden`` is rounded
    twice in bf16 (once kept, once scaled), where the per-token path rounds it once.
    """
    b, n, e = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != e:
        raise ValueError(f"weight {tuple(weight.shape)} must be [V, {e}] for hidden {tuple(hidden.shape)}")
    if labels.shape != (b, n):
        raise ValueError(f"labels {tuple(labels.shape)} must be [B, N] = {(b, n)}")
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be a positive number of tokens")
    if reduction not in ("none", "sum"):
        raise ValueError(f"reduction={reduction!r} is not one of 'none', 'sum'")
    if b * n == 0:
        nll = hidden.new_zeros(b, n, dtype=_acc_dtype(hidden.dtype))
        return nll.sum() if reduction == "sum" else nll
    device = hidden.device.type
    if torch.is_autocast_enabled(device) and hidden.dtype == torch.float32:
        hidden = hidden.to(torch.get_autocast_dtype(device))
    triton_ok = hidden.is_cuda if use_triton is None else use_triton
    rows, flat = hidden.reshape(b * n, e), labels.reshape(b * n)
    if reduction == "sum" and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _lce_sum_op(rows, weight, flat, chunk, triton_ok)[0]
    nll, _ = _lce_op(rows, weight, flat, chunk, triton_ok)
    return nll.sum() if reduction == "sum" else nll.view(b, n)
