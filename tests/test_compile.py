"""``torch.compile`` sees the whole model as one graph: the dilated attention, the rotary tables
and the fused LM head + loss are registered operators with fake implementations. Checked on CPU
with the ``aot_eager`` backend (the same tracing, fake tensors and autograd as inductor, without
code generation), in float64 against eager."""
import pytest
import torch

from longnet_lightning import LongNet, LongNetConfig, dilated_attention
from longnet_lightning.attention.position import Rotary, _factors_op
from longnet_lightning.attention.settings import AttentionSettings


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def test_the_attention_operator_passes_opcheck():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 45, 3, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    settings = AttentionSettings(packed_max_tokens=0, triton="off").key()
    args = (q, k, v, [8, 16], [1, 2], True, 8 ** -0.5, "torch", settings)
    torch.library.opcheck(torch.ops.longnet.dilated_attention.default, args)
    assert AttentionSettings.from_key(settings) == AttentionSettings(packed_max_tokens=0, triton="off")


@pytest.mark.parametrize("causal", [True, False])
def test_dilated_attention_compiles_without_a_break_and_matches_eager(causal):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 70, 4, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    dout = torch.randn(2, 70, 4, 8, generator=g, dtype=torch.float64)

    def fn(q, k, v):
        return dilated_attention(q, k, v, [16, 32, 64], [1, 2, 4], causal=causal, backend="torch")

    eager = fn(q, k, v)
    ge = torch.autograd.grad(eager, (q, k, v), dout)
    comp = _compiled(fn)(q, k, v)
    gc = torch.autograd.grad(comp, (q, k, v), dout)
    torch.testing.assert_close(comp, eager, rtol=0, atol=1e-13)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


@pytest.mark.parametrize("scale_base", [512.0, None])
def test_rotary_tables_in_a_graph_equal_the_cached_ones(scale_base):
    rot = Rotary(16, xpos_scale_base=scale_base, anchor_block=64)
    q, k = torch.randn(2, 100, 3, 16, dtype=torch.float64), torch.randn(2, 100, 3, 16, dtype=torch.float64)
    for a, b in zip(rot(q, k, start=5), _compiled(lambda q, k: rot(q, k, start=5))(q, k)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.library.opcheck(_factors_op, (100, 5, 5, 16, 10000.0, scale_base, 0.4, 64, torch.device("cpu"), torch.float32))


@pytest.mark.parametrize("attention", ["dilated", "dense"])
def test_the_whole_loss_compiles_as_one_graph_and_matches_eager(attention):
    torch.manual_seed(2)
    cfg = LongNetConfig(vocab_size=61, n_layer=2, n_embd=32, n_head=4, ffn_dim=64, attention=attention,
                        segment_lengths=[8, 16, 32], dilation_rates=[1, 2, 4], loss_chunk_size=24)
    model = LongNet(cfg).double()
    idx = torch.randint(0, 61, (2, 50))
    labels = idx.roll(-1, 1)
    labels[:, -1] = -100

    def run(fn):
        model.zero_grad(set_to_none=True)
        loss = fn(idx, labels)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = run(model.loss)
    closs, cgrads = run(_compiled(model.loss))
    torch.testing.assert_close(closs, loss, rtol=0, atol=1e-12)
    for a, b in zip(cgrads, grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
