"""Attention kernels that return the log-sum-exp, and their backward given the *merged* output.

Every kernel takes ``q, k, v`` ``[Bt, L, G, D]`` (possibly strided views; unit stride on D) and
computes, independently per batch entry and head, softmax attention of the L queries over the
L keys (lower-triangular when causal):

* ``forward(q, k, v, causal, scale) -> (out [Bt, L, G, D], lse [Bt, G, L])``
* ``backward(dout, q, k, v, out, lse, causal, scale) -> (dq, dk, dv)``

``backward`` is the flash-attention backward: it recomputes ``P = exp(scale*q.k - lse)`` and uses
``rowsum(dout * out)``. Called with the output and log-sum-exp of the *merged* dilated attention,
it returns this branch's exact share of the merged gradient (SPEC.md, Eq. 10).

Kernels: ``torch`` (plain tensor ops, chunked; any device and dtype, float64 included),
``sdpa`` (PyTorch's fused flash / memory-efficient kernels through their ATen ops), and
``xformers`` (``xformers.ops.fmha``; CUDA only, imported only when chosen).
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

# Score elements one chunk of the plain kernel may hold (float32: 256 MiB per temporary).
_TORCH_CHUNK_ELEMS = int(os.environ.get("LONGNET_TORCH_CHUNK", 64 * 2**20))


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class TorchKernel:
    """Plain PyTorch: scores chunk by chunk, so memory stays ``O(L * chunk)`` whatever ``Bt``."""

    name = "torch"

    def supports(self, q: torch.Tensor) -> str | None:
        return None

    @staticmethod
    def _chunks(bt: int, g: int, length: int):
        """Yield ``(batch slice, query slice)`` so that one chunk's scores fit the budget."""
        per_query = max(length, 1) * g
        rows = max(1, _TORCH_CHUNK_ELEMS // per_query)  # queries per chunk, over all heads
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
        """Scores ``[b, G, lq, lk]`` of queries ``qs`` against the keys they may see."""
        kend = qs.stop if causal else k.shape[1]
        acc = _lse_dtype(q.dtype)
        s = torch.einsum("bqgd,bkgd->bgqk", q[:, qs].to(acc), k[:, :kend].to(acc)) * scale
        if causal:
            qi = torch.arange(qs.start, qs.stop, device=q.device)[:, None]
            ki = torch.arange(kend, device=q.device)[None, :]
            s = s.masked_fill(ki > qi, float("-inf"))
        return s, kend

    def forward(self, q, k, v, causal, scale):
        bt, length, g, d = q.shape
        acc = _lse_dtype(q.dtype)
        out = torch.empty(q.shape[:3] + (v.shape[-1],), dtype=q.dtype, device=q.device)
        lse = torch.empty(bt, g, length, dtype=acc, device=q.device)
        for bs, qs in self._chunks(bt, g, length):
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
        for bs, qs in self._chunks(bt, g, length):
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

    CUDA fp16/bf16: cuDNN attention (fastest on Hopper), else flash attention (set
    ``LONGNET_SDPA_CUDA=flash`` to force it); fp32: memory-efficient attention. CPU: the fused
    flash kernel for CPU (any float dtype). The backward of either CUDA kernel accepts the
    merged output and LSE, so the two can be mixed.
    """

    name = "sdpa"

    def __init__(self):
        self.cuda_impl = os.environ.get("LONGNET_SDPA_CUDA", "cudnn")

    def _cudnn_failed(self, e: Exception) -> None:
        warnings.warn(f"longnet_lightning: cuDNN attention failed ({type(e).__name__}: {str(e)[:200]}); "
                      "using flash attention from now on", stacklevel=4)
        self.cuda_impl = "flash"

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
        if q.device.type == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, scale=scale
            )
            return out.transpose(1, 2), lse
        bt, length, g, _ = q.shape
        if q.dtype != torch.float32 and self.cuda_impl == "cudnn" and length > 1:  # cuDNN rejects L = 1
            t = lambda x: x.transpose(1, 2)  # noqa: E731
            try:
                out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
                    t(q), t(k), t(v), None, True, 0.0, causal, False, scale=scale
                )
                return t(out), lse.reshape(bt, g, length)
            except RuntimeError as e:
                self._cudnn_failed(e)
        if q.dtype == torch.float32:
            out, lse, *_ = torch.ops.aten._efficient_attention_forward(
                q, k, v, None, None, None, length, length, 0.0, int(causal), True, scale=scale
            )
            return out, lse[..., :length]
        out, lse, *_ = torch.ops.aten._flash_attention_forward(
            q, k, v, None, None, length, length, 0.0, causal, False, scale=scale
        )
        return out, lse

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        if q.device.type == "cpu":
            t = lambda x: x.transpose(1, 2)  # noqa: E731
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                t(dout), t(q), t(k), t(v), t(out), lse.to(q.dtype if q.dtype == torch.float64 else torch.float32),
                0.0, causal, scale=scale,
            )
            return t(dq), t(dk), t(dv)
        bt, length, g, _ = q.shape
        seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
        offset = torch.zeros((), dtype=torch.uint64, device=q.device)
        if q.dtype == torch.float32:  # its LSE rows are padded to a multiple of 32
            lse_pad = torch.zeros(bt, g, -(-length // 32) * 32, dtype=torch.float32, device=q.device)
            lse_pad[..., :length] = lse
            dq, dk, dv, _ = torch.ops.aten._efficient_attention_backward(
                dout, q, k, v, None, out, None, None, length, length, lse_pad, 0.0,
                seed, offset, int(causal), False, scale=scale,
            )
            return dq, dk, dv
        lse = lse.float().contiguous()
        if self.cuda_impl == "cudnn" and length > 1:
            t = lambda x: x.transpose(1, 2)  # noqa: E731
            try:
                dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                    t(dout), t(q), t(k), t(v), t(out), lse.unsqueeze(-1), seed, offset, None, None, None,
                    length, length, 0.0, causal, scale=scale,
                )
                return t(dq), t(dk), t(dv)
            except RuntimeError as e:
                self._cudnn_failed(e)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, lse, None, None, length, length, 0.0, causal, seed, offset, scale=scale,
        )
        return dq, dk, dv


@functools.lru_cache(maxsize=None)
def xformers_status() -> str | None:
    """``None`` when xformers' CUDA attention can run here, else the reason (said once).

    The xformers wheel's C++ extension is built for one torch version; under another torch it
    refuses every CUDA operator although its flash and cutlass operators call PyTorch's own
    kernels. ``LONGNET_XFORMERS_FORCE=1`` lifts that gate (at your own risk).
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
    if os.environ.get("LONGNET_XFORMERS_FORCE") == "1":
        common._built_with_cuda = True
    q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
    try:
        fmha.memory_efficient_attention_forward_requires_grad(q, q, q)
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return (
            f"xformers {getattr(__import__('xformers'), '__version__', '?')} cannot run on this "
            f"torch {torch.__version__} ({msg}); its C++ extension targets another torch. "
            "Install the xformers build matching your torch, or set LONGNET_XFORMERS_FORCE=1 to "
            "use its PyTorch-backed operators anyway"
        )
    return None


class XFormersKernel:
    """``xformers.ops.fmha`` memory-efficient attention (CUDA), ``[Bt, L, G, D]`` layout."""

    name = "xformers"

    def supports(self, q: torch.Tensor) -> str | None:
        if q.device.type != "cuda":
            return "xformers runs on CUDA devices only"
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"dtype {q.dtype}: xformers takes float16, bfloat16 or float32"
        return xformers_status()

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


KERNELS = {k.name: k for k in (TorchKernel(), SDPAKernel(), XFormersKernel())}
BACKENDS = ("auto", "reference", *KERNELS)
_warned: set[str] = set()


def select_kernel(backend: str, q: torch.Tensor):
    """The kernel for ``backend`` on ``q``'s device and dtype.

    ``auto``: ``sdpa`` where it supports the input (fastest measured on CUDA and CPU), else
    ``xformers`` on CUDA, else ``torch``. An explicitly named backend that cannot run raises.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {list(BACKENDS)}")
    if backend != "auto":
        kernel = KERNELS[backend]
        reason = kernel.supports(q)
        if reason:
            raise ValueError(f"backend={backend!r} cannot run this input: {reason}. Use backend='auto' or 'torch'.")
        return kernel
    for name in ("sdpa", "xformers") if q.device.type == "cuda" else ("sdpa",):
        reason = KERNELS[name].supports(q)
        if reason is None:
            return KERNELS[name]
        if name == "xformers" and name not in _warned:
            _warned.add(name)
            warnings.warn(f"longnet_lightning: falling back from xformers: {reason}", stacklevel=3)
    return KERNELS["torch"]
