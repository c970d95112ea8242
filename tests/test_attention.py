"""Every dilated-attention backend that runs here equals the dense reference of docs/semantics.md."""
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longnet_lightning import DilatedAttention, DilationPattern, dilated_attention, dilated_attention_reference
from longnet_lightning.attention.kernels import KERNELS
from longnet_lightning.attention.plan import packed_plan
from longnet_lightning.attention.settings import AttentionSettings
from longnet_lightning.attention.reference import multiplicity

CPU_BACKENDS = [n for n, k in KERNELS.items() if k().supports(torch.zeros(1, 1, 1, 8, dtype=torch.float64)) is None]
TOL = 1e-10


@st.composite
def configs(draw):
    m = draw(st.integers(1, 4))
    ws = draw(st.lists(st.integers(1, 64), min_size=m, max_size=m))
    rs = draw(st.lists(st.integers(1, 7), min_size=m, max_size=m))
    if draw(st.booleans()):
        rs[0] = 1  # most real patterns have a dense branch; also draw ones that do not
    n = draw(st.one_of(st.integers(1, 300), st.sampled_from([1, 2, 3, 97, 127, 211, 293])))
    return dict(
        b=draw(st.integers(1, 3)), n=n, h=draw(st.integers(1, 7)), d=draw(st.sampled_from([1, 2, 5, 8])),
        ws=ws, rs=rs, causal=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
    )


def _inputs(b, n, h, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, h, d, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


def _max_err(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def plan(name: str, **settings) -> AttentionSettings:
    """Settings that force the packed plan (one gathered call per branch) or the strided one (views)."""
    return AttentionSettings(packed_max_tokens=2**62 if name == "packed" else 0, **settings)


@pytest.mark.parametrize("plan_name", ["packed", "strided"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs())
def test_backend_matches_reference_outputs_and_grads(backend, plan_name, cfg):
    q, k, v = _inputs(cfg["b"], cfg["n"], cfg["h"], cfg["d"], cfg["seed"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # patterns without r = 1 warn; they are drawn on purpose
        ref = dilated_attention_reference(q, k, v, DilationPattern(cfg["ws"], cfg["rs"]), causal=cfg["causal"])
        out = dilated_attention(q, k, v, cfg["ws"], cfg["rs"], causal=cfg["causal"], backend=backend,
                                settings=plan(plan_name))
        grad = torch.randn_like(ref)
        g_ref = torch.autograd.grad(ref, (q, k, v), grad)
        g_out = torch.autograd.grad(out, (q, k, v), grad)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _max_err([out], [ref]) < TOL
    assert _max_err(g_out, g_ref) < TOL


def test_reference_matches_hand_computed_branch_mix():
    """Eq. 10 (docs/semantics.md) by hand for N=4, one head: branches (2,1) and (4,2)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 1, 3, dtype=torch.float64) for _ in range(3))
    s = (q[0, :, 0] @ k[0, :, 0].T) / math.sqrt(3)  # [4, 4]
    e = torch.exp(s)
    out = dilated_attention_reference(q, k, v, DilationPattern([2, 4], [1, 2]), causal=True)[0, :, 0]
    # branch (2,1): segments {0,1},{2,3}; branch (4,2), offset 0: {0,2}
    z1 = [e[0, :1].sum(), e[1, :2].sum(), e[2, 2:3].sum(), e[3, 2:4].sum()]
    o1 = [e[0, :1] @ v[0, :1, 0], e[1, :2] @ v[0, :2, 0], e[2, 2:3] @ v[0, 2:3, 0], e[3, 2:4] @ v[0, 2:4, 0]]
    z2 = {0: e[0, 0], 2: e[2, 0] + e[2, 2]}
    o2 = {0: e[0, 0] * v[0, 0, 0], 2: e[2, 0] * v[0, 0, 0] + e[2, 2] * v[0, 2, 0]}
    for p in range(4):
        num, den = o1[p], z1[p]
        if p in z2:
            num, den = num + o2[p], den + z2[p]
        assert torch.allclose(out[p], num / den, atol=1e-12)


def test_multiplicity_counts_shared_keys_twice():
    m = multiplicity(8, 2, DilationPattern([4, 8], [1, 2]), causal=False)
    assert m[0, 0, 2] == 2  # same segment in both branches, head 0 offset 0 selects 0 and 2
    assert m[1, 1, 3] == 2 and m[1, 0, 2] == 1  # head 1 uses offset 1 in the r = 2 branch
    assert m[0, 0, 5] == 0  # odd position: not head 0's in the r = 2 branch; other w = 4 segment
    assert m[0, 0, 4] == 1 and m[0, 0, 6] == 1  # only the (8, 2) branch spans both


@pytest.mark.filterwarnings("ignore:dilation pattern")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_every_head_runs_every_branch_with_its_own_offset(backend, causal):
    """Head h with r=2 must see the positions with the parity of h, in every branch."""
    q, k, v = _inputs(1, 16, 4, 4, 0)
    v = torch.zeros_like(v)
    v[:, 1::2] = 1.0  # odd positions carry 1, even ones 0
    out = dilated_attention(q, k, v, [16], [2], causal=causal, backend=backend)
    assert torch.allclose(out[0, :, 1::2][1::2], torch.ones(8, 2, 4, dtype=out.dtype))  # odd heads, odd rows
    assert torch.allclose(out[0, :, 0::2][0::2], torch.zeros(8, 2, 4, dtype=out.dtype))  # even heads, even rows
    assert torch.all(out[0, 1::2, 0::2] == 0)  # rows not selected for a head get nothing


@pytest.mark.parametrize("plan_name", ["packed", "strided"])
@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
def test_causality_of_attention(backend, plan_name):
    q, k, v = _inputs(2, 101, 3, 8, 1)
    p = 57
    q2, k2, v2 = (t.detach().clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, p + 1:] = torch.randn_like(t[:, p + 1:]) * 5
    s = plan(plan_name)
    out = dilated_attention(q, k, v, [16, 32, 64], [1, 2, 4], causal=True, backend=backend, settings=s)
    out2 = dilated_attention(q2, k2, v2, [16, 32, 64], [1, 2, 4], causal=True, backend=backend, settings=s)
    assert torch.equal(out[:, : p + 1], out2[:, : p + 1])
    assert not torch.allclose(out[:, p + 1:], out2[:, p + 1:])


def test_no_dense_branch_warns_and_leaves_uncovered_rows_zero():
    q, k, v = _inputs(1, 8, 1, 4, 2)
    with pytest.warns(UserWarning, match="no branch with dilation rate 1"):
        out = dilated_attention(q, k, v, [8], [2], backend="torch")
    assert torch.all(out[0, 1::2] == 0) and torch.all(out[0, 0::2] != 0)


def test_strided_inputs_from_a_fused_projection():
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 50, 3, 4, 8, generator=g, dtype=torch.float64)
    q, k, v = qkv.unbind(2)
    ref = dilated_attention_reference(q, k, v, DilationPattern([8, 24], [1, 3]))
    for backend in CPU_BACKENDS:
        assert _max_err([dilated_attention(q, k, v, [8, 24], [1, 3], backend=backend)], [ref]) < TOL


def test_module_and_scale():
    q, k, v = _inputs(1, 40, 2, 4, 4)
    mod = DilatedAttention([8, 16], [1, 2], causal=False, scale=0.3, backend="torch")
    ref = dilated_attention_reference(q, k, v, DilationPattern([8, 16], [1, 2]), causal=False, scale=0.3)
    assert _max_err([mod(q, k, v)], [ref]) < TOL
    assert "w=[8, 16]" in repr(mod)


@pytest.mark.parametrize(
    "ws, rs, match",
    [
        ([], [], "segment_lengths is empty"),
        ([8, 16], [1], "same length"),
        ([0], [1], "positive integers"),
        ([8], [-1], "positive integers"),
        ([8.5], [1], "positive integers"),
        (None, [1], "segment_lengths must be a list"),
    ],
)
def test_invalid_patterns_raise_value_error_naming_the_setting(ws, rs, match):
    q, k, v = _inputs(1, 8, 1, 4, 0)
    with pytest.raises(ValueError, match=match):
        dilated_attention(q, k, v, ws, rs)


def test_invalid_inputs_and_backends_raise_value_error():
    q, k, v = _inputs(1, 8, 2, 4, 0)
    with pytest.raises(ValueError, match="backend='nope'"):
        dilated_attention(q, k, v, [8], [1], backend="nope")
    with pytest.raises(ValueError, match=r"\[B, N, H, D\]"):
        dilated_attention(q[0], k[0], v[0], [8], [1])
    with pytest.raises(ValueError, match="must share"):
        dilated_attention(q, k[:, :4], v, [8], [1])
    with pytest.raises(ValueError, match="xformers runs on CUDA devices only"):
        dilated_attention(q, k, v, [8], [1], backend="xformers")


def test_flops_follow_spec_convention():
    p = DilationPattern([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12])
    assert p.flops(1_048_576, 12, 64) == pytest.approx(6.87e12, rel=1e-3)
    assert p.flops(100, 1, 1, causal=False) == 2 * p.flops(100, 1, 1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kernel_calls_split_into_small_pieces_still_match(backend):
    s = plan("strided", max_rows_per_call=7)  # many tiny calls, batch folded across rows
    q, k, v = _inputs(2, 96, 3, 4, 5)
    pattern = DilationPattern([32, 8, 48], [2, 1, 3])  # r = 1 not first: the plan reorders
    ref = dilated_attention_reference(q, k, v, pattern)
    out = dilated_attention(q, k, v, pattern, backend=backend, settings=s)
    grad = torch.randn_like(ref)
    assert _max_err([out], [ref]) < TOL
    assert _max_err(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)) < TOL


def test_backends_name_head_dims_and_dtypes_they_cannot_take():
    from types import SimpleNamespace

    def fake(d, dtype, device="cuda"):
        return SimpleNamespace(shape=(1, 8, 2, d), dtype=dtype, device=SimpleNamespace(type=device))

    sdpa, xf = KERNELS["sdpa"](), KERNELS["xformers"]()
    assert sdpa.supports(fake(64, torch.bfloat16)) is None
    assert "head dim 12" in sdpa.supports(fake(12, torch.bfloat16))
    assert "up to 256" in sdpa.supports(fake(512, torch.float16))
    assert "float64" in sdpa.supports(fake(64, torch.float64))
    assert "CUDA devices only" in xf.supports(fake(64, torch.bfloat16, "cpu"))


def test_packed_plan_folds_branches_of_equal_length():
    """The paper pattern at 32K: r = 1 is a call of its own, read in place (its rows are written,
    not merged); r = 2, 4 (L = 2048) and r = 6, 12 (L = 2731) are packed into one call each."""
    calls = packed_plan(DilationPattern((2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12)), 1, 32768, 12)
    assert [[(c.w, c.r, first) for first, c in call] for call in calls] == [
        [(2048, 1, True)], [(4096, 2, False), (8192, 4, False)], [(16384, 6, False), (32768, 12, False)]]
    assert calls[0][0][1].is_view


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("max_rows", [2**19, 100])  # 100: most branches split into chunks, which never fold
@pytest.mark.parametrize("n", [64, 70, 5])
def test_folded_calls_match_reference(fold, max_rows, n):
    s = plan("packed", packed_fold=fold, max_rows_per_call=max_rows)
    ws, rs = [8, 16, 32, 12, 24], [1, 2, 4, 3, 6]  # packed lengths 8, 8, 8, 4, 4
    q, k, v = _inputs(2, n, 6, 4, seed=n)
    ref = dilated_attention_reference(q, k, v, DilationPattern(ws, rs), causal=True)
    out = dilated_attention(q, k, v, ws, rs, causal=True, backend="torch", settings=s)
    dout = torch.randn_like(ref)
    assert _max_err([out], [ref]) < TOL
    assert _max_err(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)) < TOL


@pytest.mark.parametrize("plan_name", ["packed", "strided"])
def test_bf16_merges_stay_within_bf16_error(plan_name):
    """forward_acc='input' (bf16 merges, the default) and 'float32' both match the float64
    reference to bf16 accuracy, and to each other up to a few bf16 roundings."""
    q, k, v = _inputs(1, 200, 4, 16, seed=3)
    pattern = DilationPattern([16, 32, 64], [1, 2, 4])
    ref = dilated_attention_reference(q, k, v, pattern)
    outs = {}
    for acc in ("input", "float32"):
        outs[acc] = dilated_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), pattern, backend="torch",
                                      settings=plan(plan_name, forward_acc=acc))
        assert outs[acc].dtype == torch.bfloat16
        rel = ((outs[acc].double() - ref).norm() / ref.norm()).item()
        assert rel < 1e-2
    assert not torch.equal(outs["input"], outs["float32"])  # the modes really differ
    torch.testing.assert_close(outs["input"], outs["float32"], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lq, lk", [(1, 1), (1, 7), (5, 5), (3, 11), (6, 7), (4, 40)])
def test_rectangular_blocks_match_dense_attention_with_offset_mask(backend, causal, lq, lk):
    """``attend`` on ``Lq`` queries that are the last ``Lq`` of ``Lk`` key positions: dense
    softmax attention with the offset causal mask, outputs, LSE and gradients."""
    from longnet_lightning.attention.kernels import attend, attend_backward

    g = torch.Generator().manual_seed(lq * 100 + lk)
    q = torch.randn(2, lq, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, lk, 3, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.5
    if causal:
        allowed = torch.arange(lk)[None, :] <= torch.arange(lk - lq, lk)[:, None]
        s = s.masked_fill(~allowed, float("-inf"))
    ref = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v)
    kernel = KERNELS[backend]()
    out, lse = attend(kernel, q, k, v, causal, 0.5)
    assert _max_err([out, lse], [ref, torch.logsumexp(s, -1)]) < TOL
    dout = torch.randn_like(ref)
    grads = attend_backward(kernel, dout, q, k, v, ref.detach(), lse, causal, 0.5)
    assert _max_err(grads, torch.autograd.grad(ref, (q, k, v), dout)) < TOL


@pytest.mark.parametrize("plan_name", ["packed", "strided"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_heads_major_inputs_and_output_gradient_match_reference(backend, plan_name):
    """Views of ``[B, H, N, D]`` tensors (as from a heads-first projection) as q, k, v and as the
    output gradient: the same outputs and gradients as contiguous ones."""
    q, k, v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
               for t in _inputs(2, 53, 4, 8, seed=11))
    ref = dilated_attention_reference(q, k, v, DilationPattern([8, 16], [1, 2]))
    out = dilated_attention(q, k, v, [8, 16], [1, 2], backend=backend, settings=plan(plan_name, triton="off"))
    dout = torch.randn(2, 4, 53, 8, dtype=torch.float64).transpose(1, 2)
    assert _max_err([out], [ref]) < TOL
    assert _max_err(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)) < TOL


@pytest.mark.parametrize("plan_name", ["packed", "strided"])
@pytest.mark.parametrize("b, n, adopted", [(2, 64, True), (1, 5, True), (2, 70, False)])
def test_covering_branch_output_and_gradients_are_used_in_place(monkeypatch, plan_name, b, n, adopted):
    """When the r = 1 branch is one plain view of the input (N a multiple of w, or N <= w), its
    kernel output is the accumulator and its gradients are dq, dk, dv: nothing is written
    ("first") into fresh buffers. Otherwise they are copied. The result is exact either way."""
    from longnet_lightning.attention import dilated

    import inspect

    firsts = []

    def recording(real):
        sig = inspect.signature(real)

        def op(*args, **kwargs):
            firsts.append(sig.bind(*args, **kwargs).arguments["first"])
            return real(*args, **kwargs)
        return op

    for name in ("merge_view_", "unpack_merge_", "accumulate_view_", "unpack_accumulate_"):
        monkeypatch.setattr(dilated, name, recording(getattr(dilated, name)))
    ws, rs = [8, 16, 32], [1, 2, 4]
    q, k, v = _inputs(b, n, 4, 3, seed=n)
    ref = dilated_attention_reference(q, k, v, DilationPattern(ws, rs))
    out = dilated_attention(q, k, v, ws, rs, backend="torch", settings=plan(plan_name))
    dout = torch.randn_like(ref)
    assert _max_err([out], [ref]) < TOL
    assert _max_err(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)) < TOL
    assert firsts and (True in firsts) != adopted


@pytest.mark.parametrize("plan_name", ["packed", "strided"])
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_covering_branch_is_one_call_unless_its_backward_is_split(monkeypatch, plan_name, split, dtype):
    """A covering r = 1 branch too large for one call of ``max_rows_per_call`` still runs as one
    call: its output is the accumulator (nothing written "first" in the forward) and its
    gradients are dq, dk, dv. ``split_first_backward`` splits its backward, whose gradients are
    then copied in; so does a kernel whose gradients come in another dtype (the torch kernel's
    float32 for bf16 inputs). The result is exact every way."""
    from longnet_lightning.attention import dilated

    firsts = {"merge": [], "accumulate": []}

    def recording(real, kind, at):
        def op(*args, **kwargs):
            firsts[kind].append(kwargs["first"] if "first" in kwargs else args[at])
            return real(*args, **kwargs)
        return op

    for name, kind, at in [("merge_view_", "merge", 4), ("unpack_merge_", "merge", 5),
                           ("accumulate_view_", "accumulate", 2), ("unpack_accumulate_", "accumulate", 3)]:
        monkeypatch.setattr(dilated, name, recording(getattr(dilated, name), kind, at))
    ws, rs = [8, 16, 32], [1, 2, 4]
    q, k, v = _inputs(2, 64, 4, 3, seed=5)
    ref = dilated_attention_reference(q, k, v, DilationPattern(ws, rs))
    x = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    s = plan(plan_name, max_rows_per_call=40, split_first_backward=split)  # r = 1 alone is 512 rows x heads
    out = dilated_attention(*x, ws, rs, backend="torch", settings=s)
    dout = torch.randn_like(ref)
    tol = TOL if dtype == torch.float64 else 5e-2
    assert _max_err([out], [ref]) < tol
    assert _max_err(torch.autograd.grad(out, x, dout.to(dtype)), torch.autograd.grad(ref, (q, k, v), dout)) < tol
    assert firsts["merge"] and True not in firsts["merge"]
    copied = split or dtype == torch.bfloat16
    assert firsts["accumulate"] and (True in firsts["accumulate"]) == copied
