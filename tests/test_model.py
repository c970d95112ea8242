"""The LongNet model: presets, positions, chunked loss, checkpointing, causality, dense baseline."""
import subprocess
import sys

import pytest
import torch

from longnet_lightning import LongNet, LongNetConfig, MultiheadDilatedAttention, PATTERNS, PRESETS
from longnet_lightning.attention.position import Rotary


def _tiny(**kw):
    kw = {"vocab_size": 61, "n_layer": 2, "n_embd": 32, "n_head": 4, "ffn_dim": 64,
          "segment_lengths": [8, 16, 32], "dilation_rates": [1, 2, 4], **kw}
    return LongNetConfig(**kw)


def test_import_is_light_and_never_touches_xformers():
    code = ("import sys, torch, longnet_lightning as ll; "
            "q = torch.randn(1, 40, 2, 8); ll.dilated_attention(q, q, q, [8, 16], [1, 2]); "
            "ll.LongNet(ll.LongNetConfig()); print('xformers' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"
    assert "xformers" not in res.stderr.lower() and "warning" not in res.stderr.lower()


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_configs_with_exact_parameter_counts(name):
    cfg = LongNetConfig.from_name(name, vocab_size=1000)
    assert cfg.segment_lengths == list(PATTERNS[PRESETS[name]["pattern"]][0])
    if name in ("tiny", "small"):
        assert sum(p.numel() for p in LongNet(cfg).parameters()) == cfg.num_params()


def test_paper_sizes():
    base = LongNetConfig.from_name("125M")
    assert (base.n_layer, base.n_embd, base.n_head, base.ffn_dim) == (12, 768, 12, 3072)
    assert LongNetConfig.from_name("2.7B").n_head == 32
    assert LongNetConfig.from_name("125M", vocab_size=50_000).num_params() == pytest.approx(1.24e8, rel=0.02)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(n_embd=30, n_head=4), "multiple of n_head"),
        (dict(attention="sparse"), "'dilated' or 'dense'"),
        (dict(position="alibi"), "'xpos', 'rope' or 'none'"),
        (dict(segment_lengths=[8, 16], dilation_rates=[1]), "same length"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(attn_backend="cuda"), "attn_backend"),
    ],
)
def test_invalid_configs_raise_value_error(kw, match):
    with pytest.raises(ValueError, match=match):
        _tiny(**kw)
    with pytest.raises(ValueError, match="unknown model preset"):
        LongNetConfig.from_name("7B")


@pytest.mark.parametrize("attention", ["dilated", "dense"])
def test_model_is_causal(attention):
    torch.manual_seed(0)
    model = LongNet(_tiny(attention=attention)).double().eval()
    idx = torch.randint(0, 61, (2, 75))
    p = 40
    idx2 = idx.clone()
    idx2[:, p + 1:] = torch.randint(0, 61, (2, 75 - p - 1))
    a, b = model(idx), model(idx2)
    assert torch.equal(a[:, : p + 1], b[:, : p + 1])
    assert not torch.allclose(a[:, p + 1:], b[:, p + 1:])


def test_dilated_with_one_dense_branch_equals_the_dense_model():
    """w >= N, r = 1 is dense attention: same weights, same logits."""
    torch.manual_seed(1)
    dense = LongNet(_tiny(attention="dense", position="rope")).double()
    dil = LongNet(_tiny(segment_lengths=[128], dilation_rates=[1], position="rope")).double()
    dil.load_state_dict(dense.state_dict())
    idx = torch.randint(0, 61, (2, 100))
    assert torch.allclose(dense(idx), dil(idx), atol=1e-10)


def test_loss_reductions_and_activation_checkpointing_agree():
    torch.manual_seed(3)
    cfg = _tiny(loss_chunk_size=7)
    model = LongNet(cfg).double()
    idx = torch.randint(0, 61, (2, 50))
    labels = idx.roll(-1, 1)
    labels[:, -1] = -100
    mean = model.loss(idx, labels)
    assert torch.allclose(mean * 98, model.loss(idx, labels, "sum"))
    assert torch.allclose(model.loss(idx, labels, "none").sum(), model.loss(idx, labels, "sum"))
    g1 = torch.autograd.grad(mean, list(model.parameters()))
    per_token = torch.autograd.grad(model.loss(idx, labels, "none").sum() / 98, list(model.parameters()))
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(g1, per_token))  # the sum's gradient, kept
    with pytest.raises(ValueError, match="reduction='avg'"):
        model.loss(idx, labels, "avg")
    model.config.activation_checkpointing = True
    model.train()
    g2 = torch.autograd.grad(model.loss(idx, labels), list(model.parameters()))
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(g1, g2))


def test_token_ids_outside_the_vocabulary_are_rejected():
    model = LongNet(_tiny())
    with pytest.raises(ValueError, match="vocab_size=61"):
        model(torch.tensor([[1, 2, 61]]))


@pytest.mark.parametrize("xpos", [None, 512.0])
def test_rotary_scores_depend_only_on_relative_position(xpos):
    rot = Rotary(8, xpos_scale_base=xpos, anchor_block=64)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=g, dtype=torch.float64), torch.randn(1, 1, 1, 8, generator=g, dtype=torch.float64)
    def score(n, m):  # q at n, k at m, both in one anchor block
        qq, _ = rot(q, q, start=n)
        _, kk = rot(k, k, start=m)
        return (qq * kk).sum().item()
    assert score(10, 3) == pytest.approx(score(40, 33), rel=1e-9)
    assert score(10, 3) != pytest.approx(score(10, 4), rel=1e-6)


def test_xpos_decays_with_distance_and_guards_its_range():
    rot = Rotary(8, xpos_scale_base=4.0, anchor_block=None)
    one = torch.ones(1, 64, 1, 8, dtype=torch.float64)
    q, k = rot(one, one)
    s = torch.einsum("bnhd,bmhd->nm", q, k)
    assert s[63, 63] > s[63, 0]  # decay with distance (RoPE alone would oscillate)
    with pytest.raises(ValueError, match="position='rope'"):
        Rotary(8, xpos_scale_base=512.0)(torch.ones(1, 80_000, 1, 8), torch.ones(1, 80_000, 1, 8))


def test_multihead_attention_in_a_user_model_and_its_errors():
    torch.manual_seed(4)
    mha = MultiheadDilatedAttention(32, 4, [8, 16], [1, 2], position="xpos").double()
    x = torch.randn(3, 21, 32, dtype=torch.float64, requires_grad=True)
    y = mha(x)
    y.sum().backward()
    assert y.shape == x.shape and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="multiple of num_heads"):
        MultiheadDilatedAttention(30, 4, [8], [1])
    with pytest.raises(ValueError, match=r"x must be \[B, N, 32\]"):
        mha(torch.randn(3, 21, 16, dtype=torch.float64))


def test_generate_appends_tokens_deterministically():
    torch.manual_seed(5)
    model = LongNet(_tiny()).eval()
    idx = torch.randint(0, 61, (2, 9))
    a = model.generate(idx, 6, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(0))
    b = model.generate(idx, 6, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 15) and torch.equal(a, b) and torch.equal(a[:, :9], idx)
    greedy = model.generate(idx, 1, temperature=0)
    assert torch.equal(greedy[:, -1], model(idx)[:, -1].argmax(-1))


def test_position_tables_made_under_inference_mode_do_not_break_training():
    model = LongNet(_tiny())
    idx = torch.randint(0, 61, (1, 40))
    with torch.inference_mode():
        model(idx)  # e.g. trainer.validate before trainer.fit
    model.loss(idx, idx).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("block", [None, 1, 8, 33])
def test_xpos_range_guard_computes_the_exact_largest_offset(block):
    rot = Rotary(8, xpos_scale_base=512.0, anchor_block=block)
    for start in (0, 5, 8, 63, 100):
        for n in (1, 2, 7, 9, 64):
            pos = torch.arange(start, start + n)
            anchor = torch.full_like(pos, start + n // 2) if block is None else pos // block * block + block // 2
            assert rot._max_offset(start, n) == (pos - anchor).abs().max().item()


@pytest.mark.parametrize("xpos", [None, 16.0])
@pytest.mark.parametrize("origin", [None, 0])
def test_rotary_matches_its_closed_form(xpos, origin):
    """Halves (x1, x2) rotate as x1 + i*x2 by angle n * theta^(-2i/D); XPOS scales q by
    zeta_i^((n - a)/B) and k by its inverse, a being the centre of n's anchor block; blocks
    start at ``origin`` (by default the call's first position)."""
    d, theta, block, start, n = 8, 100.0, 16, 5, 40
    rot = Rotary(d, theta=theta, xpos_scale_base=xpos, anchor_block=block)
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, n, 3, d, generator=g, dtype=torch.float64) for _ in range(2))
    qr, kr = rot(q, k, start=start, origin=origin)
    o = start if origin is None else origin
    pos = torch.arange(start, start + n, dtype=torch.float64)[:, None]
    i = torch.arange(d // 2, dtype=torch.float64)
    turn = torch.polar(torch.ones(n, d // 2, dtype=torch.float64), pos * theta ** (-2 * i / d))[None, :, None]
    scale = torch.ones(n, d // 2, dtype=torch.float64)
    if xpos:
        zeta = (2 * i / d + 0.4) / 1.4
        scale = zeta ** ((pos - (o + (pos - o) // block * block + block // 2)) / xpos)
    for x, y, sgn in ((q, qr, 1), (k, kr, -1)):
        z = torch.complex(x[..., : d // 2], x[..., d // 2:]) * turn * scale[None, :, None] ** sgn
        torch.testing.assert_close(y, torch.cat((z.real, z.imag), -1), rtol=1e-12, atol=1e-12)


def test_layernorm_keeps_half_precision_under_autocast():
    from longnet_lightning.attention.multihead import LayerNorm

    torch.manual_seed(0)
    ln = LayerNorm(24)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 5, 24).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ln(x)
        y32 = ln(x.float())  # float32 input: autocast's usual float32 LayerNorm
    assert y.dtype == torch.bfloat16 and y32.dtype == torch.float32
    expected = torch.nn.functional.layer_norm(x.float(), (24,), ln.weight, ln.bias, ln.eps)
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)  # bf16 rounding of the same values
    torch.testing.assert_close(ln(x.float()), expected)  # no autocast: plain nn.LayerNorm


def test_rotary_tables_are_shared_by_layers_and_bounded():
    from longnet_lightning.attention import position

    a, b = Rotary(8, xpos_scale_base=512.0, anchor_block=64), Rotary(8, xpos_scale_base=512.0, anchor_block=64)
    ta = a.factors(100, 0, "cpu", torch.float32)
    assert all(x is y for x, y in zip(ta, b.factors(100, 0, "cpu", torch.float32)))  # one copy for all layers
    for n in range(1, 10):
        a.factors(n, 0, "cpu", torch.float32)
    assert len(position._FACTORS) <= position._FACTORS_KEPT


@pytest.mark.parametrize("start", [0, 5, 37, 1000])
def test_xpos_at_any_start_position_is_exact(start):
    """XPOS anchored per block (the lcm of the segments) equals XPOS with one anchor for the whole
    sequence, for every pair dilated attention computes, wherever the call starts."""
    from longnet_lightning import MultiheadDilatedAttention, dilated_attention_reference
    from longnet_lightning.attention.position import Rotary

    torch.manual_seed(start)
    mha = MultiheadDilatedAttention(16, 4, segment_lengths=[4, 6], dilation_rates=[1, 2], position="xpos",
                                    xpos_scale_base=8.0, sub_layernorm=False, backend="torch").double()
    x = torch.randn(2, 29, 16, dtype=torch.float64)
    got = mha(x, start_pos=start)
    shape = (2, 29, 4, 4)
    q, k, v = (proj(x).view(shape) for proj in (mha.q_proj, mha.k_proj, mha.v_proj))
    q, k = Rotary(4, xpos_scale_base=8.0, anchor_block=None)(q, k, start=start)  # one anchor: plain XPOS
    want = mha.out_proj(dilated_attention_reference(q, k, v, mha.pattern).reshape(2, 29, 16))
    assert (got - want).abs().max().item() < 1e-10
