"""Attention kernels that return the log-sum-exp, and their backward given the *merged* output.

Every kernel takes ``q`` ``[Bt, Lq, G, D]`` and ``k, v`` ``[Bt, Lk, G, D]`` (possibly strided
views; unit stride on D) and computes, independently per batch entry and head, softmax attention
of the queries over the keys:

* ``forward(q, k, v, causal, scale) -> (out [Bt, Lq, G, D], lse [Bt, G, Lq])``
* ``backward(dout, q, k, v, out, lse, causal, scale) -> (dq, dk, dv)``, in ``grad_dtype(q.dtype)``

A causal block may be rectangular (``Lq <= Lk``): the queries are then the *last* ``Lq`` of the
``Lk`` key positions, so query ``i`` sees keys ``0 .. Lk - Lq + i`` (an offset lower-triangular
mask). :func:`attend` and :func:`attend_backward` run any kernel that way: kernels whose own
causal mask is only square get the block as two calls, the keys before the queries without a
mask and the square diagonal block with one, merged by their log-sum-exp (the same exact merge
as the branches'); ``torch`` takes the offset mask directly.

``backward`` is the flash-attention backward: it recomputes ``P = exp(scale*q.k - lse)`` and uses
``rowsum(dout * out)``. Called with the output and log-sum-exp of the *merged* dilated attention,
it returns this branch's exact share of the merged gradient (docs/semantics.md, Eq. 10).

Kernels: ``torch`` (plain tensor ops, chunked; any device and dtype, float64 included),
``sdpa`` (PyTorch's fused flash / memory-efficient kernels through their ATen ops), and
``xformers`` (``xformers.ops.fmha``; CUDA only, imported only when chosen). Each is built from
the :class:`~.settings.AttentionSettings` of the call (:func:`select_kernel`).
"""
from __future__ import annotations

import functools
import warnings

import torch

from .settings import FALLBACKS, AttentionSettings


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class TorchKernel:
    """Plain PyTorch: scores chunk by chunk, so memory stays ``O(L * chunk)`` whatever ``Bt``."""

    name = "torch"
    rectangular_causal = True  # takes the offset causal mask of Lq < Lk directly

    def __init__(self, settings: AttentionSettings | None = None):
        self.chunk_elems = (settings or AttentionSettings()).torch_chunk_elems  # score elements per chunk

    def supports(self, q: torch.Tensor) -> str | None:
        return None

    @staticmethod
    def grad_dtype(dtype: torch.dtype) -> torch.dtype:
        """Its gradients come in float32 (float64 for float64 inputs): accumulated, not rounded."""
        return _lse_dtype(dtype)

    def _chunks(self, bt: int, g: int, length: int, keys: int):
        """Yield ``(batch slice, query slice)`` so that one chunk's scores fit the budget."""
        per_query = max(keys, 1) * g
        rows = max(1, self.chunk_elems // per_query)  # queries per chunk, over all heads
        if rows >= length:  # whole segments per chunk
            per = max(1, rows // length)
            for b0 in range(0, bt, per):
                yield slice(b0, min(bt, b0 + per)), slice(0, length)
        else:
            for b0 in range(bt):
                for i0 in range(0, length, rows):
                    yield slice(b0, b0 + 1), slice(i0, min(length, i0 + rows))

    @staticmethod
    def _scores(q, k, causal, scale, qs):
        """Scores ``[b, G, lq, lk]`` of queries ``qs`` against the keys they may see (causal: query
        ``i`` sits at key position ``i + Lk - Lq``)."""
        off = k.shape[1] - q.shape[1]
        kend = qs.stop + off if causal else k.shape[1]
        acc = _lse_dtype(q.dtype)
        s = torch.einsum("bqgd,bkgd->bgqk", q[:, qs].to(acc), k[:, :kend].to(acc)) * scale
        if causal:
            qi = torch.arange(qs.start + off, qs.stop + off, device=q.device)[:, None]
            ki = torch.arange(kend, device=q.device)[None, :]
            s = s.masked_fill(ki > qi, float("-inf"))
        return s, kend

    def forward(self, q, k, v, causal, scale):
        bt, length, g, d = q.shape
        acc = _lse_dtype(q.dtype)
        out = torch.empty(q.shape[:3] + (v.shape[-1],), dtype=q.dtype, device=q.device)
        lse = torch.empty(bt, g, length, dtype=acc, device=q.device)
        for bs, qs in self._chunks(bt, g, length, k.shape[1]):
            s, kend = self._scores(q[bs], k[bs], causal, scale, qs)
            m = torch.logsumexp(s, dim=-1)  # [b, G, lq]
            p = torch.exp(s - m[..., None])
            out[bs, qs] = torch.einsum("bgqk,bkgd->bqgd", p, v[bs, :kend].to(acc)).to(q.dtype)
            lse[bs, :, qs] = m
        return out, lse

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        acc = _lse_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)
        bt, length, g, _ = q.shape
        for bs, qs in self._chunks(bt, g, length, k.shape[1]):
            s, kend = self._scores(q[bs], k[bs], causal, scale, qs)
            p = torch.exp(s - lse[bs, :, qs, None].to(acc))  # [b, G, lq, lk]
            do = dout[bs, qs].to(acc)  # [b, lq, G, D]
            dp = torch.einsum("bqgd,bkgd->bgqk", do, v[bs, :kend].to(acc))
            delta = (do * out[bs, qs].to(acc)).sum(-1).transpose(1, 2)  # [b, G, lq]
            ds = p * (dp - delta[..., None]) * scale
            dq[bs, qs] += torch.einsum("bgqk,bkgd->bqgd", ds, k[bs, :kend].to(acc))
            dk[bs, :kend] += torch.einsum("bgqk,bqgd->bkgd", ds, q[bs, qs].to(acc))
            dv[bs, :kend] += torch.einsum("bgqk,bqgd->bkgd", p, do)
        return dq, dk, dv


class SDPAKernel:
    """PyTorch's fused attention kernels, reached through the ATen ops that return the LSE.

    CUDA fp16/bf16: cuDNN attention (fastest on Hopper), else flash attention (the setting
    ``sdpa_cuda="flash"`` forces it; a cuDNN failure switches this process to flash once, in
    :data:`~.settings.FALLBACKS`); fp32: memory-efficient attention. CPU: the fused flash kernel
    for CPU (any float dtype). The backward of either CUDA kernel accepts the merged output and
    LSE, so the two can be mixed. Causal masks are square here (see :func:`attend`).
    """

    name = "sdpa"
    rectangular_causal = False

    @staticmethod
    def grad_dtype(dtype: torch.dtype) -> torch.dtype:
        return dtype

    def __init__(self, settings: AttentionSettings | None = None):
        self.cuda_impl = (settings or AttentionSettings()).sdpa_cuda

    def _use_cudnn(self, lq: int, lk: int) -> bool:
        return self.cuda_impl == "cudnn" and FALLBACKS.cudnn is None and min(lq, lk) > 1  # cuDNN rejects L = 1

    @staticmethod
    def _cudnn_failed(e: Exception) -> None:
        FALLBACKS.cudnn = f"{type(e).__name__}: {str(e)[:200]}"
        warnings.warn(f"longnet_lightning: cuDNN attention failed ({FALLBACKS.cudnn}); using flash attention "
                      "from now on", stacklevel=4)

    def supports(self, q: torch.Tensor) -> str | None:
        d = q.shape[-1]
        if q.device.type == "cuda":
            if q.dtype in (torch.float16, torch.bfloat16):
                if d % 8 or d > 256:
                    return f"head dim {d}: flash attention takes multiples of 8 up to 256"
                return None
            if q.dtype == torch.float32:
                if d % 8 or d > 128:  # conservative: the memory-efficient kernel's fast range
                    return f"head dim {d}: memory-efficient attention (fp32) takes multiples of 8 up to 128"
                return None
            return f"dtype {q.dtype}: CUDA fused attention takes float16, bfloat16 or float32"
        if q.device.type == "cpu":
            if not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
                return "this torch has no fused CPU attention"
            return None
        return f"device {q.device.type}: no fused attention kernel"

    def forward(self, q, k, v, causal, scale):
        t = lambda x: x.transpose(1, 2)  # noqa: E731
        if q.device.type == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(t(q), t(k), t(v), 0.0, causal,
                                                                                   scale=scale)
            return t(out), lse
        bt, lq, g, _ = q.shape
        lk = k.shape[1]
        if q.dtype != torch.float32 and self._use_cudnn(lq, lk):
            try:
                out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
                    t(q), t(k), t(v), None, True, 0.0, causal, False, scale=scale
                )
                return t(out), lse.reshape(bt, g, lq)
            except RuntimeError as e:
                self._cudnn_failed(e)
        if q.dtype == torch.float32:
            out, lse, *_ = torch.ops.aten._efficient_attention_forward(
                q, k, v, None, None, None, lq, lk, 0.0, int(causal), True, scale=scale
            )
            return out, lse[..., :lq]
        out, lse, *_ = torch.ops.aten._flash_attention_forward(
            q, k, v, None, None, lq, lk, 0.0, causal, False, scale=scale
        )
        return out, lse

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        t = lambda x: x.transpose(1, 2)  # noqa: E731
        if q.device.type == "cpu":
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                t(dout), t(q), t(k), t(v), t(out), lse.to(q.dtype if q.dtype == torch.float64 else torch.float32),
                0.0, causal, scale=scale,
            )
            return t(dq), t(dk), t(dv)
        bt, lq, g, _ = q.shape
        lk = k.shape[1]
        seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
        offset = torch.zeros((), dtype=torch.uint64, device=q.device)
        if q.dtype == torch.float32:  # its LSE rows are padded to a multiple of 32
            lse_pad = torch.zeros(bt, g, -(-lq // 32) * 32, dtype=torch.float32, device=q.device)
            lse_pad[..., :lq] = lse
            dq, dk, dv, _ = torch.ops.aten._efficient_attention_backward(
                dout, q, k, v, None, out, None, None, lq, lk, lse_pad, 0.0,
                seed, offset, int(causal), False, scale=scale,
            )
            return dq, dk, dv
        lse = lse.float().contiguous()
        if self._use_cudnn(lq, lk):
            try:
                dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                    t(dout), t(q), t(k), t(v), t(out), lse.unsqueeze(-1), seed, offset, None, None, None,
                    lq, lk, 0.0, causal, scale=scale,
                )
                return t(dq), t(dk), t(dv)
            except RuntimeError as e:
                self._cudnn_failed(e)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, lse, None, None, lq, lk, 0.0, causal, seed, offset, scale=scale,
        )
        return dq, dk, dv


@functools.lru_cache(maxsize=None)
def xformers_status(force: bool = False) -> str | None:
    """``None`` when xformers' CUDA attention can run here, else the reason (said once).

    The xformers wheel's C++ extension is built for one torch version; under another torch it
    refuses every CUDA operator although its flash and cutlass operators call PyTorch's own
    kernels. ``force`` (the setting ``xformers_force``) lifts that gate, at your own risk.
    """
    if not torch.cuda.is_available():
        return "no CUDA device: xformers has no CPU operator"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import xformers.ops.fmha as fmha
            from xformers.ops.fmha import common
        except Exception as e:  # noqa: BLE001 - any import failure means "unavailable"
            return f"xformers cannot be imported ({type(e).__name__}: {e})"
    if force:
        common._built_with_cuda = True
    q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
    try:
        fmha.memory_efficient_attention_forward_requires_grad(q, q, q)
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return (
            f"xformers {getattr(__import__('xformers'), '__version__', '?')} cannot run on this "
            f"torch {torch.__version__} ({msg}); its C++ extension targets another torch. "
            "Install the xformers build matching your torch, or set the attention setting "
            "xformers_force=true to use its PyTorch-backed operators anyway"
        )
    return None


class XFormersKernel:
    """``xformers.ops.fmha`` memory-efficient attention (CUDA), ``[Bt, L, G, D]`` layout."""

    name = "xformers"
    rectangular_causal = False

    @staticmethod
    def grad_dtype(dtype: torch.dtype) -> torch.dtype:
        return dtype

    def __init__(self, settings: AttentionSettings | None = None):
        self.force = (settings or AttentionSettings()).xformers_force

    def supports(self, q: torch.Tensor) -> str | None:
        if q.device.type != "cuda":
            return "xformers runs on CUDA devices only"
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"dtype {q.dtype}: xformers takes float16, bfloat16 or float32"
        return xformers_status(self.force)

    @staticmethod
    def _bias(causal):
        from xformers.ops.fmha.attn_bias import LowerTriangularMask

        return LowerTriangularMask() if causal else None

    def forward(self, q, k, v, causal, scale):
        from xformers.ops import fmha

        out, lse = fmha.memory_efficient_attention_forward_requires_grad(
            q, k, v, attn_bias=self._bias(causal), scale=scale
        )
        return out, lse[..., : q.shape[1]]

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        from xformers.ops import fmha

        return fmha.memory_efficient_attention_backward(
            dout, out, lse.contiguous(), q, k, v, attn_bias=self._bias(causal), scale=scale
        )


def _merge2(o1, l1, o2, l2):
    """Two partial results over disjoint key sets merged by their LSE (``[Bt, L, G, D]``, ``[Bt, G, L]``)."""
    lse = torch.logaddexp(l1, l2)
    ct = torch.promote_types(o1.dtype, torch.float32)
    w1, w2 = (torch.exp(x - lse).transpose(1, 2)[..., None].to(ct) for x in (l1, l2))
    return (o1.to(ct) * w1 + o2.to(ct) * w2).to(o1.dtype), lse


def attend(kernel, q, k, v, causal: bool, scale: float):
    """``kernel.forward`` for any block, rectangular causal ones included (module docstring)."""
    lq, lk = q.shape[1], k.shape[1]
    if not causal or lq == lk or kernel.rectangular_causal:
        return kernel.forward(q, k, v, causal, scale)
    if lq > lk:
        raise ValueError(f"a causal block needs at least as many keys as queries, got {lq} queries and {lk} keys")
    off = lk - lq
    o1, l1 = kernel.forward(q, k[:, :off], v[:, :off], False, scale)  # keys before the queries: all visible
    o2, l2 = kernel.forward(q, k[:, off:], v[:, off:], True, scale)  # the square diagonal block
    return _merge2(o1, l1, o2, l2)


def attend_backward(kernel, dout, q, k, v, out, lse, causal: bool, scale: float):
    """``kernel.backward`` for any block: ``(dq [Bt, Lq, G, D], dk, dv [Bt, Lk, G, D])``."""
    lq, lk = q.shape[1], k.shape[1]
    if not causal or lq == lk or kernel.rectangular_causal:
        return kernel.backward(dout, q, k, v, out, lse, causal, scale)
    off = lk - lq
    dq1, dk1, dv1 = kernel.backward(dout, q, k[:, :off], v[:, :off], out, lse, False, scale)
    dq2, dk2, dv2 = kernel.backward(dout, q, k[:, off:], v[:, off:], out, lse, True, scale)
    return dq1 + dq2, torch.cat((dk1, dk2), 1), torch.cat((dv1, dv2), 1)


KERNELS = {k.name: k for k in (TorchKernel, SDPAKernel, XFormersKernel)}
BACKENDS = ("auto", "reference", *KERNELS)
_warned: set[str] = set()


def select_kernel(backend: str, q: torch.Tensor, settings: AttentionSettings | None = None):
    """The kernel for ``backend`` on ``q``'s device and dtype, built with ``settings``.

    ``auto``: ``sdpa`` where it supports the input (fastest measured on CUDA and CPU), else
    ``xformers`` on CUDA, else ``torch``. An explicitly named backend that cannot run raises.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {list(BACKENDS)}")
    settings = settings or AttentionSettings()
    if backend != "auto":
        kernel = KERNELS[backend](settings)
        reason = kernel.supports(q)
        if reason:
            raise ValueError(f"backend={backend!r} cannot run this input: {reason}. Use backend='auto' or 'torch'.")
        return kernel
    for name in ("sdpa", "xformers") if q.device.type == "cuda" else ("sdpa",):
        kernel = KERNELS[name](settings)
        reason = kernel.supports(q)
        if reason is None:
            return kernel
        if name == "xformers" and name not in _warned:
            _warned.add(name)
            warnings.warn(f"longnet_lightning: falling back from xformers: {reason}", stacklevel=3)
    return KERNELS["torch"](settings)
