"""The fused LM head + cross-entropy operator, against the unfused PyTorch computation."""
import os

import pytest
import torch
import torch.nn.functional as F

from longnet_lightning import loss as lce
from longnet_lightning.loss import IGNORE_INDEX, linear_cross_entropy

needs_interpreter = pytest.mark.skipif(
    lce.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs Triton with TRITON_INTERPRET=1 (set by conftest on machines without CUDA)",
)


def _reference(h, w, y):
    logits = (h @ w.to(h.dtype).t()).to(torch.float64 if h.dtype == torch.float64 else torch.float32)
    b, n, v = logits.shape
    return F.cross_entropy(logits.view(-1, v), y.view(-1), reduction="none", ignore_index=IGNORE_INDEX).view(b, n)


def _case(seed, dtype, b, n, e, v, ignored=3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, n, e, generator=g, dtype=dtype)
    w = torch.randn(v, e, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    y = torch.randint(0, v, (b, n), generator=g)
    y.view(-1)[torch.randperm(b * n, generator=g)[:ignored]] = IGNORE_INDEX
    return h, w, y, torch.randn(b, n, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("b,n,e,v,chunk", [(2, 37, 16, 11, 8), (1, 5, 8, 3000, 2), (3, 1, 4, 7, 4096),
                                           (1, 64, 12, 257, 64), (2, 9, 6, 5, 1)])
def test_values_and_gradients_equal_the_unfused_computation(b, n, e, v, chunk):
    h, w, y, g = _case(b * n + v, torch.float64, b, n, e, v)
    hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_()
    nll = linear_cross_entropy(hs, ws, y, chunk)
    ref_h, ref_w = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = _reference(ref_h, ref_w, y)
    torch.testing.assert_close(nll, ref, rtol=0, atol=1e-12)
    assert torch.all(nll[y == IGNORE_INDEX] == 0)
    got = torch.autograd.grad((nll * g).sum(), (hs, ws))
    want = torch.autograd.grad((ref * g).sum(), (ref_h, ref_w))
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-12)


@pytest.mark.parametrize("b,n,e,v,chunk", [(2, 37, 16, 11, 8), (1, 5, 8, 3000, 2), (3, 1, 4, 7, 4096),
                                           (1, 64, 12, 257, 64), (2, 9, 6, 5, 1)])
def test_the_sum_computes_its_gradients_in_the_forward_and_equals_the_unfused_sum(b, n, e, v, chunk):
    h, w, y, _ = _case(b * n + v + 1, torch.float64, b, n, e, v)
    hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_()
    total = linear_cross_entropy(hs, ws, y, chunk, reduction="sum")
    assert total.grad_fn is not None and "linear_cross_entropy_sum" in str(total.grad_fn.name())
    ref_h, ref_w = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = _reference(ref_h, ref_w, y).sum()
    torch.testing.assert_close(total, ref, rtol=0, atol=1e-11)
    scale = 0.37  # the upstream gradient (a mean's 1 / count, a loss weight) only scales the kept one
    got = torch.autograd.grad(total * scale, (hs, ws))
    want = torch.autograd.grad(ref * scale, (ref_h, ref_w))
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-12)
    with torch.no_grad():  # no gradient wanted: the per-token operator, summed
        torch.testing.assert_close(linear_cross_entropy(h, w, y, chunk, reduction="sum"), ref.detach(), rtol=0,
                                   atol=1e-11)


def test_the_sum_passes_gradcheck_for_either_input():
    h, w, y, _ = _case(11, torch.float64, 1, 7, 3, 5)
    torch.autograd.gradcheck(lambda a, b: linear_cross_entropy(a, b, y, 3, reduction="sum"),
                             (h.requires_grad_(), w.requires_grad_()))
    only_w = torch.autograd.grad(linear_cross_entropy(h.detach(), w, y, 3, reduction="sum"), w)[0]
    torch.testing.assert_close(only_w, torch.autograd.grad(_reference(h.detach(), w, y).sum(), w)[0])


def test_every_label_ignored_gives_zero_loss_and_zero_gradients():
    h, w, y, _ = _case(0, torch.float64, 2, 6, 4, 9, ignored=0)
    y.fill_(IGNORE_INDEX)
    hs, ws = h.requires_grad_(), w.requires_grad_()
    nll = linear_cross_entropy(hs, ws, y, 4)
    dh, dw = torch.autograd.grad(nll.sum(), (hs, ws))
    assert torch.all(nll == 0) and torch.all(dh == 0) and torch.all(dw == 0)
    total = linear_cross_entropy(hs, ws, y, 4, reduction="sum")
    dh, dw = torch.autograd.grad(total, (hs, ws))
    assert total == 0 and torch.all(dh == 0) and torch.all(dw == 0)


def test_bf16_under_autocast_is_as_close_to_float64_as_the_unfused_head():
    """The fused head rounds as ``F.linear`` under autocast does; its weight gradient is summed
    in float32, so it is at least as close to the float64 truth."""
    h, w, y, g = _case(5, torch.float32, 2, 40, 32, 300)
    truth_h, truth_w = h.double().requires_grad_(), w.double().requires_grad_()
    truth = torch.autograd.grad((_reference(truth_h, truth_w, y) * g.double()).sum(), (truth_h, truth_w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_()
        fused = torch.autograd.grad((linear_cross_entropy(hs, ws, y, 16) * g).sum(), (hs, ws))
        hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
        logits = F.linear(hr, wr).float()
        ref = F.cross_entropy(logits.view(-1, 300), y.view(-1), reduction="none", ignore_index=IGNORE_INDEX)
        unfused = torch.autograd.grad((ref.view(2, 40) * g).sum(), (hr, wr))
    for f, u, t in zip(fused, unfused, truth):
        err = lambda x: ((x.double() - t).norm() / t.norm()).item()  # noqa: E731
        assert err(f) <= 1.05 * err(u) + 1e-6, (err(f), err(u))


def test_bf16_sum_rounds_dhidden_once_more_and_stays_as_close_as_the_unfused_head():
    """The summed loss keeps its ``dhidden`` in bf16 and rounds it again when scaled: up to about
    6% more relative error than one rounding (measured over seeds), the same order as the unfused
    head; ``dweight`` is scaled in float32."""
    h, w, y, _ = _case(6, torch.float32, 2, 40, 32, 300)
    scale = 1 / 77
    truth_h, truth_w = h.double().requires_grad_(), w.double().requires_grad_()
    truth = torch.autograd.grad(_reference(truth_h, truth_w, y).sum() * scale, (truth_h, truth_w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_()
        fused = torch.autograd.grad(linear_cross_entropy(hs, ws, y, 16, reduction="sum") * scale, (hs, ws))
        hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
        ref = F.cross_entropy(F.linear(hr, wr).float().view(-1, 300), y.view(-1), reduction="sum",
                              ignore_index=IGNORE_INDEX)
        unfused = torch.autograd.grad(ref * scale, (hr, wr))
    for f, u, t, slack in zip(fused, unfused, truth, (1.15, 1.05)):
        err = lambda x: ((x.double() - t).norm() / t.norm()).item()  # noqa: E731
        assert err(f) <= slack * err(u) + 1e-6, (err(f), err(u))


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_row_passes_equal_the_pytorch_ones(dtype):
    h, w, y, g = _case(7, dtype, 2, 13, 8, 2500)  # V > one block of the kernel
    out = {}
    for tri in (False, True):
        hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_()
        nll = linear_cross_entropy(hs, ws, y, 8, use_triton=tri)
        out[tri] = (nll, *torch.autograd.grad((nll * g).sum(), (hs, ws)))
        hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_()
        total = linear_cross_entropy(hs, ws, y, 8, use_triton=tri, reduction="sum")
        out[tri] += (total, *torch.autograd.grad(total, (hs, ws)))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(out[False], out[True]):
        torch.testing.assert_close(a.float(), b.float(), **tol)


def test_the_operators_pass_opcheck():
    h, w, y, _ = _case(3, torch.float64, 1, 10, 4, 6)
    args = (h.view(10, 4).requires_grad_(), w.requires_grad_(), y.view(10), 3, False)
    torch.library.opcheck(torch.ops.longnet.linear_cross_entropy.default, args)
    torch.library.opcheck(torch.ops.longnet.linear_cross_entropy_sum.default, args)


def test_bad_shapes_are_one_line_errors():
    h, w, y, _ = _case(1, torch.float64, 1, 4, 4, 5)
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(h, w[:, :3], y, 2)
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h, w, y[:, :3], 2)
    with pytest.raises(ValueError, match="chunk=0"):
        linear_cross_entropy(h, w, y, 0)
    with pytest.raises(ValueError, match="reduction='mean'"):
        linear_cross_entropy(h, w, y, 2, reduction="mean")
