"""Data movement around the attention kernels: gathers, merges and gradient accumulation.

Two row maps, each with a Triton implementation (CUDA, one launch per call, bandwidth-bound)
and a plain PyTorch one (any device; the specification the Triton kernels are tested against):

* **views** (strided plan): a kernel call's rows are a strided view ``[A, L, G, D]`` of
  ``[B, N, H, D]`` (:func:`.pattern.block_view`). :func:`merge_view_` folds the call's output
  into the accumulators; :func:`accumulate_view_` adds its gradients into dq, dk, dv.
* **packed** (packed plan): a :class:`.plan.Chunk` of one branch's segments, every head, as a dense
  ``[S, L, H, D]`` block (slot ``(s, j, h)`` holds position ``seg*w + h%r + j*r``; slots past a
  segment or the sequence are padding, always the last rows of their segment). :func:`pack`
  gathers (padding: 0, and ``+inf`` for the log-sum-exp so padded queries send no gradient),
  :func:`unpack_merge_` and :func:`unpack_accumulate_` scatter back.

:class:`Overlap` runs the strided plan's merges and gradient sums on a second CUDA stream, beside
the next call's (compute-bound) kernel.

Merging is online by softmax denominators (paper Eq. 10): ``lse' = logaddexp(lse, lse_i)``,
``out' = out + (out_i - out) * exp(lse_i - lse')``; the first call of a covering branch writes.
Gradients are accumulated in the gradient's dtype with float32 arithmetic.
"""
from __future__ import annotations

import collections
import os
import warnings

import torch

from .plan import Chunk, packed_index
from .settings import FALLBACKS, AttentionSettings

try:  # Triton ships with CUDA builds of PyTorch; without it every op takes the PyTorch path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def use_triton(x: torch.Tensor, settings: AttentionSettings) -> bool:
    """Whether the Triton kernels move ``x``'s rows: CUDA tensors when Triton is installed and
    has not failed here (``settings.triton="off"`` turns them off; ``"interpret"`` also runs
    them on CPU through Triton's interpreter, which is how the CPU tests check them)."""
    if triton is None or settings.triton == "off" or FALLBACKS.triton is not None:
        return False
    return x.is_cuda or (settings.triton == "interpret" and os.environ.get("TRITON_INTERPRET") == "1")


def _tri(flag: bool) -> bool:
    """A caller's Triton choice, unless a kernel failed to build earlier in this process."""
    return flag and triton is not None and FALLBACKS.triton is None


def packed_view(x: torch.Tensor, c: Chunk) -> torch.Tensor:
    """``x`` ``[B, N, H, D]`` as the packed block of an ``is_view`` chunk (no copy)."""
    return x.view(c.bsz * c.nseg, c.length, c.heads, x.shape[-1])[c.s0:c.s1]


# ----------------------------------------------------------------------------------------------
# PyTorch implementations (any device): index maps from pattern.packed_index
# ----------------------------------------------------------------------------------------------

def _flat_slots(c: Chunk, device) -> torch.Tensor:
    """Flat ``[B*N*H]`` index of every slot of ``c`` (``-1`` for padding)."""
    flat, _ = packed_index(c.bsz, c.n, c.heads, c.w, c.r, device)
    per_seg = c.length * c.heads
    return flat[c.s0 * per_seg:c.s1 * per_seg]


def _pack_torch(xs, lse, c: Chunk):
    idx = _flat_slots(c, xs[0].device if xs else lse.device)
    pad, take = idx < 0, idx.clamp(min=0)
    out = []
    for x in xs:
        rows = x.reshape(-1, x.shape[-1]).index_select(0, take).masked_fill_(pad[:, None], 0)
        out.append(rows.view(c.segments, c.length, c.heads, x.shape[-1]))
    lp = None
    if lse is not None:
        lp = lse.reshape(-1).index_select(0, take).to(torch.promote_types(lse.dtype, torch.float32))
        lp.masked_fill_(pad, float("inf"))
        lp = lp.view(c.segments, c.length, c.heads).transpose(1, 2).contiguous()
    return out, lp


def _merge_math(acc, lacc, o, lo, first: bool):
    """Torch reference of the merge: returns the new (acc, lse) rows."""
    if first:
        return o.to(acc.dtype), lo.to(lacc.dtype)
    ct = torch.promote_types(acc.dtype, torch.float32)
    new = torch.logaddexp(lacc, lo.to(lacc.dtype))
    wgt = torch.exp(lo.to(lacc.dtype) - new)[..., None].to(ct)
    return (acc.to(ct) + (o.to(ct) - acc.to(ct)) * wgt).to(acc.dtype), new


def _add_math(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` in ``a``'s dtype, with at least float32 arithmetic."""
    acc = torch.promote_types(a.dtype, torch.float32)
    return (a.to(acc) + b.to(acc)).to(a.dtype)


def _unpack_merge_torch(acc, lacc, o, lo, c: Chunk, first: bool):
    idx = _flat_slots(c, acc.device)
    keep = (idx >= 0).nonzero().squeeze(1)
    dst = idx.index_select(0, keep)
    a, la = acc.view(-1, acc.shape[-1]), lacc.view(-1)
    orow = o.reshape(-1, o.shape[-1]).index_select(0, keep)
    lorow = lo.transpose(1, 2).reshape(-1).index_select(0, keep)
    new_a, new_l = _merge_math(a.index_select(0, dst), la.index_select(0, dst), orow, lorow, first)
    a.index_copy_(0, dst, new_a)
    la.index_copy_(0, dst, new_l)


def _unpack_accumulate_torch(dsts, grads, c: Chunk, first: bool):
    idx = _flat_slots(c, dsts[0].device)
    keep = (idx >= 0).nonzero().squeeze(1)
    dst = idx.index_select(0, keep)
    for buf, g in zip(dsts, grads):
        flat = buf.view(-1, buf.shape[-1])
        rows = g.reshape(-1, g.shape[-1]).index_select(0, keep)
        if not first:  # a branch selects each (position, head) at most once: no clashes
            rows = _add_math(flat.index_select(0, dst), rows)
        flat.index_copy_(0, dst, rows.to(buf.dtype))


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _slot(rows, s0, nseg, L, H, W, R, N):
        """Packed slot ids -> (batch row, position, head, is real)."""
        h = rows % H
        t = rows // H
        j = t % L
        s = t // L + s0
        inseg = h % R + j * R
        pos = (s % nseg) * W + inseg
        return s // nseg, pos, h, (inseg < W) & (pos < N)

    @triton.jit
    def _merge(a, la, x, lx):
        m = tl.maximum(la, lx)  # lx is finite (a query always sees itself); la may be -inf
        new = m + tl.log(tl.exp(la - m) + tl.exp(lx - m))
        return a + (x - a) * tl.exp(lx - new)[:, None], new

    @triton.jit
    def _merge_store(OUT, LSE, a_off, l_off, m, ok, x, lx, FIRST: tl.constexpr, CT: tl.constexpr):
        """Merge rows ``x`` (LSE ``lx``) into ``OUT``/``LSE`` at the given offsets (write if FIRST)."""
        if FIRST:
            a, la = x, lx
        else:
            a, la = _merge(tl.load(OUT + a_off, mask=m, other=0.0).to(CT), tl.load(LSE + l_off, mask=ok, other=0.0),
                           x, lx)
        tl.store(OUT + a_off, a.to(OUT.dtype.element_ty), mask=m)
        tl.store(LSE + l_off, la, mask=ok)

    @triton.jit
    def _move(src, dst, sb, sn, sh, b, pos, h, d_off, m_in, d, m_out):
        x = tl.load(src + (b * sb + pos * sn + h * sh)[:, None] + d[None, :], mask=m_in, other=0.0)
        tl.store(dst + d_off[:, None] + d[None, :], x, mask=m_out)

    @triton.jit
    def _pack_kernel(X0, X1, X2, X3, X4, Y0, Y1, Y2, Y3, Y4, LSE, LY, s0b, s0n, s0h, s1b, s1n, s1h, s2b, s2n, s2h,
                     s3b, s3n, s3h, s4b, s4n, s4h, slb, sln, slh, n_rows, s0, nseg, L, H, W, R, N,
                     NT: tl.constexpr, HAS_LSE: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                     BLOCK: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = rows < n_rows
        b, pos, h, real = _slot(rows, s0, nseg, L, H, W, R, N)
        d = tl.arange(0, BD)
        dm = d < D
        m_in = (live & real)[:, None] & dm[None, :]
        m_out = live[:, None] & dm[None, :]
        dst = rows * D
        if NT > 0:
            _move(X0, Y0, s0b, s0n, s0h, b, pos, h, dst, m_in, d, m_out)
        if NT > 1:
            _move(X1, Y1, s1b, s1n, s1h, b, pos, h, dst, m_in, d, m_out)
        if NT > 2:
            _move(X2, Y2, s2b, s2n, s2h, b, pos, h, dst, m_in, d, m_out)
        if NT > 3:
            _move(X3, Y3, s3b, s3n, s3h, b, pos, h, dst, m_in, d, m_out)
        if NT > 4:
            _move(X4, Y4, s4b, s4n, s4h, b, pos, h, dst, m_in, d, m_out)
        if HAS_LSE:
            lv = tl.load(LSE + b * slb + pos * sln + h * slh, mask=live & real, other=float("inf"))
            lv = tl.where(real, lv, float("inf"))
            j = (rows // H) % L
            sl = rows // (H * L)
            tl.store(LY + (sl * H + h) * L + j, lv, mask=live)

    @triton.jit
    def _unpack_merge_kernel(OUT, LSE, O, LO, sab, san, sah, slb, sln, slh, sos, sol, soh,
                             n_rows, s0, nseg, L, H, W, R, N,
                             FIRST: tl.constexpr, CT: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                             BLOCK: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        b, pos, h, real = _slot(rows, s0, nseg, L, H, W, R, N)
        ok = (rows < n_rows) & real
        j = (rows // H) % L
        sl = rows // (H * L)
        d = tl.arange(0, BD)
        m = ok[:, None] & (d < D)[None, :]
        x = tl.load(O + (sl * sos + j * sol + h * soh)[:, None] + d[None, :], mask=m, other=0.0).to(CT)
        lx = tl.load(LO + (sl * H + h) * L + j, mask=ok, other=0.0)
        a_off = (b * sab + pos * san + h * sah)[:, None] + d[None, :]
        l_off = b * slb + pos * sln + h * slh
        _merge_store(OUT, LSE, a_off, l_off, m, ok, x, lx, FIRST, CT)

    @triton.jit
    def _add(dst, src, d_off, s_off, m, FIRST: tl.constexpr, ACC: tl.constexpr):
        g = tl.load(src + s_off, mask=m, other=0.0).to(ACC)
        if not FIRST:
            g += tl.load(dst + d_off, mask=m, other=0.0).to(ACC)
        tl.store(dst + d_off, g.to(dst.dtype.element_ty), mask=m)

    @triton.jit
    def _add3(D0, D1, D2, G0, G1, G2, d_off, s_off, m, NT: tl.constexpr, FIRST: tl.constexpr, ACC: tl.constexpr):
        _add(D0, G0, d_off, s_off, m, FIRST, ACC)
        if NT > 1:
            _add(D1, G1, d_off, s_off, m, FIRST, ACC)
        if NT > 2:
            _add(D2, G2, d_off, s_off, m, FIRST, ACC)

    @triton.jit
    def _unpack_acc_kernel(D0, D1, D2, G0, G1, G2, sdb, sdn, sdh, sgs, sgl, sgh,
                           n_rows, s0, nseg, L, H, W, R, N,
                           NT: tl.constexpr, FIRST: tl.constexpr, ACC: tl.constexpr, D: tl.constexpr,
                           BD: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        b, pos, h, real = _slot(rows, s0, nseg, L, H, W, R, N)
        ok = (rows < n_rows) & real
        j = (rows // H) % L
        sl = rows // (H * L)
        d = tl.arange(0, BD)
        m = ok[:, None] & (d < D)[None, :]
        d_off = (b * sdb + pos * sdn + h * sdh)[:, None] + d[None, :]
        s_off = (sl * sgs + j * sgl + h * sgh)[:, None] + d[None, :]
        _add3(D0, D1, D2, G0, G1, G2, d_off, s_off, m, NT, FIRST, ACC)

    @triton.jit
    def _view_rows(rows, L, G, s0, s1, s2):
        g = rows % G
        t = rows // G
        return (t // L) * s0 + (t % L) * s1 + g * s2

    @triton.jit
    def _merge_view_kernel(OUT, LSE, O, LO, sa0, sa1, sa2, sl0, sl1, sl2, so0, so1, so2, sx0, sx1, sx2,
                           n_rows, L, G, FIRST: tl.constexpr, CT: tl.constexpr, D: tl.constexpr,
                           BD: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = rows < n_rows
        d = tl.arange(0, BD)
        m = ok[:, None] & (d < D)[None, :]
        x = tl.load(O + _view_rows(rows, L, G, so0, so1, so2)[:, None] + d[None, :], mask=m, other=0.0).to(CT)
        lx = tl.load(LO + _view_rows(rows, L, G, sx0, sx1, sx2), mask=ok, other=0.0)
        a_off = _view_rows(rows, L, G, sa0, sa1, sa2)[:, None] + d[None, :]
        l_off = _view_rows(rows, L, G, sl0, sl1, sl2)
        _merge_store(OUT, LSE, a_off, l_off, m, ok, x, lx, FIRST, CT)

    @triton.jit
    def _acc_view_kernel(D0, D1, D2, G0, G1, G2, sd0, sd1, sd2, sg0, sg1, sg2, n_rows, L, G,
                         NT: tl.constexpr, FIRST: tl.constexpr, ACC: tl.constexpr, D: tl.constexpr,
                         BD: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = rows < n_rows
        d = tl.arange(0, BD)
        m = ok[:, None] & (d < D)[None, :]
        d_off = _view_rows(rows, L, G, sd0, sd1, sd2)[:, None] + d[None, :]
        s_off = _view_rows(rows, L, G, sg0, sg1, sg2)[:, None] + d[None, :]
        _add3(D0, D1, D2, G0, G1, G2, d_off, s_off, m, NT, FIRST, ACC)


# Elements (rows x padded head dim) per program and warps, per kernel; measured on an H200
# (benchmarks/tune_fused.py, which edits this table in its own process to compare settings).
LAUNCH = {"default": (8192, 4), "_merge_view_kernel": (2048, 4), "_pack_kernel": (1024, 2),
          "_unpack_merge_kernel": (1024, 2), "_unpack_acc_kernel": (4096, 8)}


def _launch(kernel, n_rows: int, d: int, *args, **meta) -> bool:
    """Launch ``kernel`` over ``n_rows`` rows; False (said once) if Triton cannot build it here
    (no C compiler, an unsupported GPU, ...), after which every op takes the PyTorch path."""
    bd = triton.next_power_of_2(d)
    elems, warps = LAUNCH.get(kernel.__name__, LAUNCH["default"])
    block = max(1, elems // bd)
    try:
        kernel[(triton.cdiv(n_rows, block),)](*args, **meta, D=d, BD=bd, BLOCK=block, num_warps=warps)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - compilation happens at the first launch
        FALLBACKS.triton = f"{kernel.__name__}: {type(e).__name__}: {str(e).strip()[:300]}"  # once per process
        warnings.warn(f"longnet_lightning: the Triton kernel {kernel.__name__} failed ({FALLBACKS.triton}); "
                      "using PyTorch data movement "
                      "from now on (slower). Set the attention setting triton='off' to choose that explicitly.",
                      stacklevel=3)
        return False
    return True


def _acc(t: torch.Tensor):
    """Triton arithmetic type for ``t``'s dtype: float32, or float64 for float64."""
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _geometry(c: Chunk):
    return (c.rows, c.s0, c.nseg, c.length, c.heads, c.w, c.r, c.n)


def _same_rows(ts) -> bool:
    """Same shape and dtype (strides may differ: each tensor's are passed)."""
    return all(t.shape == ts[0].shape and t.dtype == ts[0].dtype for t in ts)


def _same_layout(ts) -> bool:
    return all(t.shape == ts[0].shape and t.stride() == ts[0].stride() and t.dtype == ts[0].dtype for t in ts)


# ----------------------------------------------------------------------------------------------
# Overlap: data movement on a second stream, beside the next kernel call
# ----------------------------------------------------------------------------------------------

class Overlap:
    """Runs the data movement of each kernel call (merges, gradient sums) on a second CUDA stream
    while the main stream goes on to the next call's kernel.

    ``with Overlap(device, on) as side: ... side(fn, *tensors)`` runs ``fn`` after everything the
    main stream has queued so far; ``tensors`` (kernel outputs that ``fn`` reads) are kept alive
    until the main stream has waited for it, so their memory is never reused under it. The main
    stream waits for call ``i - depth`` before it queues more work, which bounds the kernel
    outputs waiting to be merged to ``depth`` calls; leaving the block joins the two streams.
    The side stream has the higher priority, so its short kernels start as soon as SMs free up.
    Off (or not on CUDA), ``fn`` simply runs in place: the same operations in the same order.
    """

    _streams: dict = {}

    def __init__(self, device: torch.device, on: bool = True, depth: int = 2):
        self.on = on and device.type == "cuda"
        if self.on:
            self.main = torch.cuda.current_stream(device)
            key = (device, self.main.stream_id)
            if key not in self._streams:
                self._streams[key] = torch.cuda.Stream(device, priority=-1)
            self.side, self.depth, self.waiting = self._streams[key], depth, collections.deque()

    def __enter__(self) -> "Overlap":
        return self

    def __call__(self, fn, *tensors) -> None:
        if not self.on:
            fn()
            return
        while len(self.waiting) >= self.depth:
            self.main.wait_event(self.waiting.popleft()[0])
        self.side.wait_stream(self.main)
        with torch.cuda.stream(self.side):
            fn()
            done = torch.cuda.Event()
            done.record(self.side)
        self.waiting.append((done, tensors))

    def __exit__(self, *exc) -> None:
        if self.on:
            self.main.wait_stream(self.side)
            self.waiting.clear()


# ----------------------------------------------------------------------------------------------
# Public ops: Triton where it runs, else PyTorch
# ----------------------------------------------------------------------------------------------

def pack(xs, c: Chunk, lse: torch.Tensor | None = None, out=None, *, triton: bool = False):
    """Gather ``xs`` (each ``[B, N, H, *]``) into packed blocks ``[S, L, H, *]`` (padding 0),
    and ``lse`` ``[B, N, H]`` into ``[S, H, L]`` float32 (padding ``+inf``).

    ``out``: ``(blocks, lse block)`` to write into (contiguous, e.g. slices of a larger batch)
    instead of new tensors. Returns ``(blocks, lse block)``.
    """
    xs = list(xs)
    ref = xs[0] if xs else lse
    if out is None:
        f32 = None if lse is None else torch.promote_types(lse.dtype, torch.float32)
        out = ([torch.empty(c.segments, c.length, c.heads, x.shape[-1], dtype=x.dtype, device=x.device) for x in xs],
               None if lse is None else torch.empty(c.segments, c.heads, c.length, dtype=f32, device=lse.device))
    ys, ly = list(out[0]), out[1]
    if _tri(triton) and all(x.stride(-1) == 1 for x in xs):
        if len(xs) > 5 or not _same_rows(xs):  # e.g. v with its own head dim: one launch per tensor
            for x, y in zip(xs, ys):
                pack([x], c, out=([y], None), triton=triton)
            if lse is not None:
                pack([], c, lse, out=([], ly), triton=triton)
            return ys, ly
        xp = xs + [ref] * (5 - len(xs))
        yp = ys + [ly if ly is not None else ref] * (5 - len(ys))
        sx = [st for x in xs for st in x.stride()[:3]] + [0] * 3 * (5 - len(xs))
        sl = lse.stride() if lse is not None else (0, 0, 0)
        if _launch(_pack_kernel, c.rows, xs[0].shape[-1] if xs else 1, *xp, *yp, lse if lse is not None else ref,
                   ly if ly is not None else ref, *sx, *sl, *_geometry(c), NT=len(xs), HAS_LSE=lse is not None):
            return ys, ly
    got, lp = _pack_torch(xs, lse, c)
    for y, g in zip(ys, got):
        y.copy_(g)
    if ly is not None:
        ly.copy_(lp)
    return ys, ly


def unpack_merge_(acc: torch.Tensor, lacc: torch.Tensor, o: torch.Tensor, lo: torch.Tensor, c: Chunk, first: bool,
                  *, triton: bool = False):
    """Merge a packed kernel output ``o`` ``[S, L, H, Dv]``, ``lo`` ``[S, H, L]`` into the
    accumulators ``acc`` ``[B, N, H, Dv]`` and ``lacc`` ``[B, N, H]`` (float32/64), in place."""
    if _tri(triton) and o.stride(-1) == 1:
        lo_c = lo.reshape(c.segments, c.heads, c.length).to(lacc.dtype).contiguous()
        if _launch(_unpack_merge_kernel, c.rows, acc.shape[-1], acc, lacc, o, lo_c, *acc.stride()[:3], *lacc.stride(),
                   *o.stride()[:3], *_geometry(c), FIRST=first, CT=_acc(lacc)):
            return
    _unpack_merge_torch(acc, lacc, o, lo, c, first)


def unpack_accumulate_(dsts, grads, c: Chunk, first: bool, *, triton: bool = False):
    """Add packed gradients ``grads`` (each ``[S, L, H, *]``) into ``dsts`` (``[B, N, H, *]``), in
    place (``first``: write instead of add)."""
    dsts, grads = list(dsts), list(grads)
    if _tri(triton) and grads[0].stride(-1) == 1:
        if len(dsts) > 1 and not (_same_layout(dsts) and _same_layout(grads)):  # e.g. v's own head dim
            for dst, g in zip(dsts, grads):
                unpack_accumulate_([dst], [g], c, first, triton=triton)
            return
        dp, gp = dsts + [dsts[0]] * (3 - len(dsts)), grads + [grads[0]] * (3 - len(grads))
        if _launch(_unpack_acc_kernel, c.rows, dsts[0].shape[-1], *dp, *gp, *dsts[0].stride()[:3],
                   *grads[0].stride()[:3], *_geometry(c), NT=len(dsts), FIRST=first, ACC=_acc(dsts[0])):
            return
    _unpack_accumulate_torch(dsts, grads, c, first)


def merge_view_(acc_v: torch.Tensor, lacc_v: torch.Tensor, o: torch.Tensor, lo: torch.Tensor, first: bool,
                *, triton: bool = False):
    """Strided plan: merge ``o`` ``[A, L, G, Dv]`` and ``lo`` ``[A, G, L]`` into the accumulator
    views ``acc_v`` ``[A, L, G, Dv]`` and ``lacc_v`` ``[A, L, G]``, in place."""
    lo_v = lo.transpose(1, 2)  # [A, L, G]
    if _tri(triton) and o.stride(-1) == 1 and acc_v.stride(-1) == 1:
        a, length, g, d = acc_v.shape
        if _launch(_merge_view_kernel, a * length * g, d, acc_v, lacc_v, o, lo_v, *acc_v.stride()[:3],
                   *lacc_v.stride(), *o.stride()[:3], *lo_v.stride(), a * length * g, length, g, FIRST=first,
                   CT=_acc(lacc_v)):
            return
    new_a, new_l = _merge_math(acc_v, lacc_v, o, lo_v, first)
    acc_v.copy_(new_a)
    lacc_v.copy_(new_l)


def accumulate_view_(dsts, grads, first: bool, *, triton: bool = False):
    """Strided plan: ``dst (+)= g`` for views ``dst`` and kernel gradients ``g`` ``[A, L, G, *]``."""
    dsts, grads = list(dsts), list(grads)
    if _tri(triton) and grads[0].stride(-1) == 1 and dsts[0].stride(-1) == 1:
        if len(dsts) > 1 and not (_same_layout(dsts) and _same_layout(grads)):
            for dst, g in zip(dsts, grads):
                accumulate_view_([dst], [g], first, triton=triton)
            return
        a, length, g, d = dsts[0].shape
        dp, gp = dsts + [dsts[0]] * (3 - len(dsts)), grads + [grads[0]] * (3 - len(grads))
        if _launch(_acc_view_kernel, a * length * g, d, *dp, *gp, *dsts[0].stride()[:3], *grads[0].stride()[:3],
                   a * length * g, length, g, NT=len(dsts), FIRST=first, ACC=_acc(dsts[0])):
            return
    for dst, g in zip(dsts, grads):
        dst.copy_(g if first else _add_math(dst, g))


__all__ = ["Overlap", "packed_view", "pack", "unpack_merge_", "unpack_accumulate_", "merge_view_",
           "accumulate_view_", "use_triton"]
