"""The Triton data-movement kernels (``attention/fused.py``), run on CPU through Triton's
interpreter, against their PyTorch implementations and the dense reference."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longnet_lightning.attention import fused
from longnet_lightning.attention import DilationPattern, dilated_attention, dilated_attention_reference
from longnet_lightning.attention.pattern import block_view
from longnet_lightning.attention.plan import Chunk, packed_plan, plan_branch
from longnet_lightning.attention.settings import FALLBACKS, AttentionSettings

INTERPRET = AttentionSettings(triton="interpret")

pytestmark = pytest.mark.skipif(
    fused.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs Triton with TRITON_INTERPRET=1 (set by conftest on machines without CUDA)",
)


@pytest.fixture
def triton_only(monkeypatch):
    """PyTorch data movement made to fail, so a silent fallback from the Triton kernels cannot pass."""

    def boom(*a, **k):
        raise AssertionError("the PyTorch fallback ran instead of the Triton kernel")

    for name in ("_pack_torch", "_unpack_merge_torch", "_unpack_accumulate_torch"):
        monkeypatch.setattr(fused, name, boom)


@st.composite
def chunk_cases(draw):
    bsz, heads = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    n, w = draw(st.integers(1, 40)), draw(st.integers(1, 24))
    r = draw(st.integers(1, 6))
    c = Chunk(bsz, n, heads, w, r, 0, bsz * -(-n // w))
    s0 = draw(st.integers(0, c.s1 - 1))
    s1 = draw(st.integers(s0 + 1, c.s1))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return Chunk(bsz, n, heads, w, r, s0, s1), draw(st.integers(1, 9)), dtype, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=chunk_cases())
def test_packed_ops_match_pytorch(monkeypatch, case):
    c, d, dtype, seed = case
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(c.bsz, c.n, c.heads, d, generator=g, dtype=dtype) for _ in range(5)]
    lse = torch.randn(c.bsz, c.n, c.heads, generator=g, dtype=dtype)
    o = torch.randn(c.segments, c.length, c.heads, d, generator=g, dtype=dtype)
    lo = torch.randn(c.segments, c.heads, c.length, generator=g, dtype=dtype)
    results = {}
    for mode in ("0", "interpret"):
        tri = mode == "interpret"
        packed, lp = fused.pack(xs, c, lse, triton=tri)
        acc = [torch.randn(c.bsz, c.n, c.heads, d, generator=torch.Generator().manual_seed(1), dtype=dtype),
               torch.randn(c.bsz, c.n, c.heads, generator=torch.Generator().manual_seed(2), dtype=dtype)]
        merged = []
        for first in (True, False):
            a, la = acc[0].clone(), acc[1].clone()
            fused.unpack_merge_(a, la, o, lo, c, first, triton=tri)
            merged += [a, la]
        grads = [x.clone() for x in xs[:3]]
        fused.unpack_accumulate_(grads, packed[:3], c, first=False, triton=tri)
        results[mode] = (packed, lp, merged, grads)
    for a, b in zip(results["0"], results["interpret"]):
        for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            torch.testing.assert_close(y, x, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-6 if dtype == torch.float32 else 1e-12)
    # padding: zeros in the data, +inf in the log-sum-exp, and no real row lost
    real = fused._flat_slots(c, "cpu") >= 0
    assert torch.isinf(results["interpret"][1].transpose(1, 2).reshape(-1)[~real]).all()
    assert (results["interpret"][0][0].reshape(-1, d)[~real] == 0).all()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 2), n=st.integers(1, 30), h=st.integers(1, 4), d=st.integers(1, 8),
       w=st.integers(1, 12), r=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_view_ops_match_pytorch(b, n, h, d, w, r, seed):
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(b, n, h, d, generator=g, dtype=torch.float64) for _ in range(3)]
    lse0 = torch.randn(b, n, h, generator=g, dtype=torch.float64)
    for blk in plan_branch(n, h, w, r, b):
        o = torch.randn(blk.bt, blk.length, blk.heads, d, generator=g, dtype=torch.float64)
        lo = torch.randn(blk.bt, blk.heads, blk.length, generator=g, dtype=torch.float64)
        out = {}
        for mode in ("0", "interpret"):
            tri = mode == "interpret"
            acc, lse = base[0].clone(), lse0.clone()
            fused.merge_view_(block_view(acc, blk), block_view(lse, blk), o, lo, first=False, triton=tri)
            grads = [x.clone() for x in base]
            fused.accumulate_view_([block_view(x, blk) for x in grads], [o, o, o], first=False, triton=tri)
            out[mode] = (acc, lse, *grads)
        for x, y in zip(out["0"], out["interpret"]):
            torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-12)
        assert not torch.equal(out["0"][0], base[0])  # the merge touched something


@pytest.mark.parametrize("plan_name", ["packed", "strided"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(b=st.integers(1, 2), n=st.integers(1, 70), h=st.integers(1, 5), seed=st.integers(0, 2**31 - 1),
       branches=st.lists(st.tuples(st.integers(1, 32), st.integers(1, 5)), min_size=1, max_size=3))
def test_dilated_attention_with_triton_matches_reference(triton_only, monkeypatch, plan_name, b, n, h, seed, branches):
    s = AttentionSettings(triton="interpret", packed_max_tokens=2**62 if plan_name == "packed" else 0)
    causal = plan_name == "packed" or seed % 2 == 0
    ws, rs = [w for w, _ in branches], [r for _, r in branches]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, h, 4, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = dilated_attention_reference(q, k, v, DilationPattern(ws, rs), causal=causal)
        out = dilated_attention(q, k, v, ws, rs, causal=causal, backend="torch", settings=s)
    dout = torch.randn_like(ref)
    for x, y in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n", [64, 70])
def test_folded_packed_calls_with_triton_match_reference(triton_only, monkeypatch, n):
    s = AttentionSettings(triton="interpret", packed_max_tokens=2**62)
    ws, rs = [8, 16, 32, 12, 24], [1, 2, 4, 3, 6]  # packed lengths 8, 8, 8, 4, 4: two folded calls
    # at n = 64 the r = 1 branch is a plain view (a call of its own, read in place); at 70 it is gathered
    assert [len(call) for call in packed_plan(DilationPattern(ws, rs), 2, n, 6)] == ([1, 2, 2] if n == 64 else [3, 2])
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, n, 6, 4, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    ref = dilated_attention_reference(q, k, v, DilationPattern(ws, rs), causal=True)
    out = dilated_attention(q, k, v, ws, rs, causal=True, backend="torch", settings=s)
    dout = torch.randn_like(ref)
    for x, y in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_a_triton_kernel_that_cannot_build_falls_back_to_pytorch_once(monkeypatch):
    monkeypatch.setattr(FALLBACKS, "triton", None)
    monkeypatch.setitem(fused.LAUNCH, "_unpack_merge_kernel", (3 * 64, 4))  # 3 rows: not a power of 2
    q, k, v = (torch.randn(1, 40, 2, 8, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(3))
    with pytest.warns(UserWarning, match="_unpack_merge_kernel failed.*PyTorch"):
        out = dilated_attention(q, k, v, [8, 16], [1, 2], backend="torch", settings=INTERPRET)
    assert "_unpack_merge_kernel" in FALLBACKS.triton and not fused.use_triton(q, INTERPRET)
    torch.testing.assert_close(out, dilated_attention_reference(q, k, v, DilationPattern([8, 16], [1, 2])))


def test_bad_settings_name_themselves():
    with pytest.raises(ValueError, match="triton='yes'.*'auto', 'off', 'interpret'"):
        AttentionSettings(triton="yes")
    with pytest.raises(ValueError, match="packed_max_tokens=-1"):
        AttentionSettings(packed_max_tokens=-1)
    with pytest.raises(ValueError, match=r"unknown attention settings \['tirton'\]"):
        AttentionSettings.of({"tirton": "off"})


def test_overlap_off_cuda_runs_each_merge_in_place():
    """Off CUDA (or switched off) the second stream is not used: each merge runs at once, in order."""
    from longnet_lightning.attention.fused import Overlap

    seen = []
    for on in (True, False):
        with Overlap(torch.device("cpu"), on) as side:
            assert not side.on
            for i in range(3):
                side(lambda i=i: seen.append(i), torch.zeros(1))
    assert seen == [0, 1, 2, 0, 1, 2]


def test_settings_carry_overlap():
    s = AttentionSettings(overlap=False)
    assert AttentionSettings.from_key(s.key()).overlap is False and AttentionSettings().overlap is True
    with pytest.raises(ValueError, match="overlap='no': use true or false"):
        AttentionSettings(overlap="no")
