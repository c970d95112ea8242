"""The fused GELU + sub-LayerNorm operator (``gelu_norm.py``): its PyTorch specification against
autograd in float64, its Triton kernels (through Triton's interpreter on CPU) against float64, the
operator's registration, and the feed-forward block that uses it."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longnet_lightning import gelu_norm
from longnet_lightning.attention.settings import FALLBACKS
from longnet_lightning.gelu_norm import gelu_layer_norm
from longnet_lightning.model import FeedForward, LongNetConfig

needs_interpreter = pytest.mark.skipif(
    gelu_norm.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs Triton with TRITON_INTERPRET=1 (set by conftest on machines without CUDA)",
)


def _inputs(m, f, dtype=torch.float64, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(m, f, generator=g, dtype=torch.float64) * scale).to(dtype)
    w = (1 + 0.5 * torch.randn(f, generator=g, dtype=torch.float64)).to(dtype)
    b = (0.5 * torch.randn(f, generator=g, dtype=torch.float64)).to(dtype)
    return h, w, b


def _reference(h, w, b, eps=1e-5):
    return F.layer_norm(F.gelu(h), (h.shape[-1],), w, b, eps)


def _rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp_min(1e-30))


def test_pytorch_path_is_gelu_then_layer_norm_with_exact_gradients():
    h, w, b = (t.requires_grad_() for t in _inputs(5, 12))
    assert torch.allclose(gelu_layer_norm(h, w, b, use_triton=False), _reference(h, w, b), atol=1e-12)
    assert torch.autograd.gradcheck(lambda *a: gelu_layer_norm(*a, use_triton=False), (h, w, b))
    ib = torch.randn(12, dtype=torch.float64, requires_grad=True)
    got = gelu_layer_norm(h, w, b, use_triton=False, in_bias=ib)
    assert torch.allclose(got, _reference(h + ib, w, b), atol=1e-12)
    assert torch.autograd.gradcheck(lambda h, w, b, ib: gelu_layer_norm(h, w, b, use_triton=False, in_bias=ib),
                                    (h, w, b, ib))


@pytest.mark.parametrize("with_in_bias", [False, True])
def test_operator_registration(with_in_bias):
    h, w, b = (t.requires_grad_() for t in _inputs(6, 10, torch.float32))
    ib = torch.randn(10, requires_grad=True) if with_in_bias else None
    torch.library.opcheck(gelu_norm._gln_op, (h, w, b, ib, 1e-5, False))


def test_any_leading_shape_and_strided_rows():
    h, w, b = _inputs(24, 7)
    x = h.view(2, 3, 4, 7)
    assert torch.allclose(gelu_layer_norm(x, w, b, use_triton=False), _reference(x, w, b), atol=1e-12)
    wide = torch.randn(6, 14, dtype=torch.float64)[:, ::2]  # last dim not unit-stride
    assert torch.allclose(gelu_layer_norm(wide, w, b, use_triton=False), _reference(wide, w, b), atol=1e-12)
    assert gelu_layer_norm(h[:0], w, b).shape == (0, 7)


def test_bad_shapes_name_the_mismatch():
    h, w, b = _inputs(4, 8)
    with pytest.raises(ValueError, match=r"weight \(7,\) must be \[8\] for h \(4, 8\)"):
        gelu_layer_norm(h, w[:7], b)
    with pytest.raises(ValueError, match=r"in_bias \(9,\) must be \[8\]"):
        gelu_layer_norm(h, w, b, in_bias=torch.zeros(9, dtype=h.dtype))


def _kernels_and_float64(m, f, seed, scale=3.0, in_bias=False):
    """``(y, y64, (dh, dw, db[, d in_bias]), their float64 reference)``: the Triton path in float32
    and float64 autograd of the composition on the same inputs and output gradient."""
    g = torch.Generator().manual_seed(seed + 1)
    ins64 = list(_inputs(m, f, seed=seed, scale=scale)) + ([torch.randn(f, dtype=torch.float64, generator=g)]
                                                           if in_bias else [])
    ins64 = [t.requires_grad_() for t in ins64]
    h64, w64, b64 = ins64[:3]
    y64 = _reference(h64 + ins64[3] if in_bias else h64, w64, b64)
    dy = torch.randn(m, f, dtype=torch.float64, generator=g)
    ref = torch.autograd.grad(y64, ins64, dy)
    ins = [t.detach().float().requires_grad_() for t in ins64]
    y = gelu_layer_norm(*ins[:3], use_triton=True, in_bias=ins[3] if in_bias else None)
    return y, y64, torch.autograd.grad(y, ins, dy.float()), ref


@pytest.fixture
def triton_only(monkeypatch):
    """The PyTorch passes made to fail, so a silent fallback from the kernels cannot pass."""

    def boom(*a, **k):
        raise AssertionError("the PyTorch pass ran instead of the Triton kernel")

    monkeypatch.setattr(gelu_norm, "_forward_torch", boom)
    monkeypatch.setattr(gelu_norm, "_backward_torch", boom)
    FALLBACKS.reset()
    yield
    FALLBACKS.reset()


@needs_interpreter
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(m=st.integers(1, 40), f=st.integers(1, 300), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([0.1, 1.0, 4.0]), fwd_rows=st.sampled_from([1, 2, 4]),
       bwd_rows=st.sampled_from([1, 2, 4]), per_sm=st.sampled_from([1, 2]), three=st.booleans(),
       in_bias=st.booleans())
def test_triton_kernels_match_float64(triton_only, monkeypatch, m, f, seed, scale, fwd_rows, bwd_rows, per_sm,
                                      three, in_bias):
    """Forward and all three gradients of the kernels (float32) against float64 autograd, on any
    row length (powers of two or not, 1 included), row count (fewer rows than programs too) and
    launch shape (rows per program, programs of the backward)."""
    monkeypatch.setattr(gelu_norm, "LAUNCH", gelu_norm.Launch(fwd_rows=fwd_rows, bwd_rows=bwd_rows,
                                                               bwd_programs_per_sm=per_sm, fwd_three=three,
                                                               bwd_three=not three))
    y, y64, got, ref = _kernels_and_float64(m, f, seed, scale, in_bias)
    tol = 2e-5 if f > 1 else 1e-3  # one column: the output is the bias, and its dh is ~0 (cancellation)
    assert _rel(y, y64) < tol
    for name, g, r in zip(("dh", "dweight", "dbias", "d in_bias"), got, ref):
        if r.norm() > 1e-6:
            assert _rel(g, r) < tol * 10, name
        else:
            assert g.abs().max() < 1e-4, name


def test_rows_of_three_by_a_power_of_two_are_three_chunks_without_padding():
    assert gelu_norm._layout(3072) == (1024, True) and gelu_norm._layout(3000) == (1024, True)
    assert gelu_norm._layout(4096) == (4096, False) and gelu_norm._layout(3073) == (4096, False)
    assert gelu_norm._layout(2049) == (1024, True)
    assert gelu_norm._layout(48) == (16, True) and gelu_norm._layout(5) == (16, False)


@needs_interpreter
@pytest.mark.parametrize("m,f", [(3, 3072), (5, 3000), (2, 6144), (7, 96), (4, 100)])
@pytest.mark.parametrize("three", [True, False])
def test_triton_kernels_match_float64_on_model_widths(triton_only, monkeypatch, m, f, three):
    """The widths a model uses (3072 = 4 x 768: three chunks), one with a ragged last chunk, and
    one that stays a single padded chunk; both passes in either layout."""
    monkeypatch.setattr(gelu_norm, "LAUNCH", gelu_norm.Launch(fwd_three=three, bwd_three=three))
    y, y64, got, ref = _kernels_and_float64(m, f, seed=f, in_bias=three)
    assert _rel(y, y64) < 2e-6
    for name, g, r in zip(("dh", "dweight", "dbias", "d in_bias"), got, ref):
        assert _rel(g, r) < 2e-6, name


def test_feed_forward_uses_the_fused_operator_and_matches_the_composition():
    cfg = LongNetConfig(vocab_size=16, n_layer=1, n_embd=8, n_head=2, ffn_dim=24)
    ffn = FeedForward(cfg).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    n = ffn.inner_norm
    with torch.no_grad():
        ffn.fc1.bias.normal_()  # fc1's bias goes into the operator: its gradient comes out of it
    expected = ffn.fc2(F.layer_norm(F.gelu(ffn.fc1(x)), (24,), n.weight, n.bias, n.eps))
    got = ffn(x)
    assert torch.allclose(got, expected, atol=1e-12)
    wrt = (x, n.weight, n.bias, ffn.fc1.weight, ffn.fc1.bias)
    for g, e in zip(torch.autograd.grad(got.sum(), wrt), torch.autograd.grad(expected.sum(), wrt)):
        assert torch.allclose(g, e, atol=1e-10)
    calls = []
    original = gelu_norm._gln_op
    try:
        gelu_norm._gln_op = lambda *a: calls.append(1) or original(*a)
        ffn(x)
    finally:
        gelu_norm._gln_op = original
    assert calls == [1]
