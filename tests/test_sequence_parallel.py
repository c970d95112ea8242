"""Sequence-parallel dilated attention on 2, 3 and 4 gloo processes equals one process.

Every rank holds a contiguous chunk of one sequence (uneven lengths allowed); its output and its
gradients (dq, dk, dv) must equal those rows of the single-process result, in float64, on random
patterns that mix branches inside a chunk, spanning chunks and spanning the whole sequence.
"""
from __future__ import annotations

import random

import pytest
import torch

from longnet_lightning import DilationPattern, dilated_attention, dilated_attention_reference
from multiprocess import run_ranks

TOL = 1e-10


def _case(rng: random.Random, world: int) -> dict:
    n = rng.randint(world, 90)
    cuts = sorted(rng.sample(range(1, n), world - 1)) if n > world else list(range(1, world))
    lengths = [b - a for a, b in zip([0, *cuts], [*cuts, n])]
    m = rng.randint(1, 4)
    ws = [rng.randint(1, max(1, n // 3)) for _ in range(m - 1)] + [rng.randint(n // 2 + 1, n + 9)]
    rs = [rng.randint(1, 6) for _ in range(m)]
    if rng.random() < 0.8:
        rs[0] = 1
    rng.shuffle(ws)
    backend = rng.choice(["torch", "sdpa"])  # torch: offset causal mask; sdpa: split into two calls
    return dict(b=rng.randint(1, 3), n=n, h=rng.randint(1, 6), d=rng.choice([1, 3, 4]),
                dv=rng.choice([None, 2]) if backend == "torch" else None,
                ws=ws, rs=rs, causal=rng.random() < 0.6, lengths=lengths, seed=rng.randrange(2**31), backend=backend)


def _tensors(c):
    g = torch.Generator().manual_seed(c["seed"])
    shape = (c["b"], c["n"], c["h"])
    q, k = (torch.randn(*shape, c["d"], generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(*shape, c["dv"] or c["d"], generator=g, dtype=torch.float64)
    dout = torch.randn(*shape, c["dv"] or c["d"], generator=g, dtype=torch.float64)
    return q, k, v, dout


def _attention_ranks(rank, world, cases):
    import warnings

    import torch.distributed as dist

    results = []
    for c in cases:
        q, k, v, dout = _tensors(c)
        a = sum(c["lengths"][:rank])
        sl = slice(a, a + c["lengths"][rank])
        ql, kl, vl = (t[:, sl].clone().requires_grad_() for t in (q, k, v))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # patterns without r = 1 are drawn on purpose
            out = dilated_attention(ql, kl, vl, c["ws"], c["rs"], causal=c["causal"], backend=c["backend"],
                                    group=dist.group.WORLD)
            grads = torch.autograd.grad(out, (ql, kl, vl), dout[:, sl])
            with torch.no_grad():  # the inference path takes the same plan
                again = dilated_attention(ql, kl, vl, c["ws"], c["rs"], causal=c["causal"], backend=c["backend"],
                                          group=dist.group.WORLD, lengths=c["lengths"])
        results.append((out.detach(), *grads, again))
    return results


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sharded_attention_equals_one_process_outputs_and_grads(world):
    rng = random.Random(1000 + world)
    cases = [_case(rng, world) for _ in range(30)]
    ranks = run_ranks(_attention_ranks, world, cases)
    for i, c in enumerate(cases):
        q, k, v, dout = (t.requires_grad_() for t in _tensors(c))
        with _quiet():
            ref = dilated_attention_reference(q, k, v, DilationPattern(c["ws"], c["rs"]), causal=c["causal"])
        ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
        a = 0
        for rank in range(world):
            sl = slice(a, a + c["lengths"][rank])
            a = sl.stop
            out, dq, dk, dv, again = ranks[rank][i]
            for name, got, want in [("out", out, ref[:, sl]), ("out (no grad)", again, ref[:, sl]),
                                    ("dq", dq, ref_grads[0][:, sl]), ("dk", dk, ref_grads[1][:, sl]),
                                    ("dv", dv, ref_grads[2][:, sl])]:
                err = (got - want).abs().max().item() if got.numel() else 0.0
                assert err < TOL, f"case {i} {c}: rank {rank} {name} differs by {err:.3g}"


def _quiet():
    import warnings

    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore")

    class _Exit:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            ctx.__exit__(*exc)

    return _Exit()


def _model_config(ckpt: bool):
    from longnet_lightning import LongNetConfig

    return LongNetConfig(vocab_size=50, n_layer=2, n_embd=24, n_head=3, ffn_dim=48, segment_lengths=[4, 8, 32],
                         dilation_rates=[1, 2, 3], position="xpos", xpos_scale_base=16.0, attn_backend="torch",
                         activation_checkpointing=ckpt)


def _batch(b=4, n=37):
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, 50, (b, n), generator=g)
    labels = torch.randint(0, 50, (b, n), generator=g)
    labels[0, :5] = -100  # not every target is scored
    return idx, labels


def _model_ranks(rank, world, sp, ckpt):
    import torch.distributed as dist

    from longnet_lightning import LongNet
    from longnet_lightning.distributed.mesh import SequenceMesh, split_sequence

    torch.manual_seed(0)
    model = LongNet(_model_config(ckpt)).double().train()
    mesh = SequenceMesh(sp)
    idx, labels = _batch()
    rows = torch.tensor_split(torch.arange(idx.shape[0]), mesh.data_parallel_size)[mesh.data_parallel_rank]
    idx, labels = (split_sequence(t[rows], sp, mesh.sequence_rank) for t in (idx, labels))
    nll = model.loss(idx, labels, reduction="sum", group=mesh.sequence_group)
    count = (labels != -100).sum()
    dist.all_reduce(count)  # every token counts once over the data x sequence mesh
    loss = nll / count
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = {}
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad)
        grads[name] = p.grad
    return total, grads


@pytest.mark.parametrize("world, sp, ckpt", [(2, 2, False), (3, 3, True), (4, 2, False)])
def test_model_training_step_equals_one_process(world, sp, ckpt):
    """Loss and every parameter gradient of a LongNet step, sequence parallel (and data x sequence
    for 4 = 2 x 2 ranks), equal one process on the global batch."""
    from longnet_lightning import LongNet

    torch.manual_seed(0)
    model = LongNet(_model_config(ckpt)).double().train()
    idx, labels = _batch()
    loss = model.loss(idx, labels)
    loss.backward()
    for total, grads in run_ranks(_model_ranks, world, sp, ckpt):
        assert abs(total.item() - loss.item()) < TOL
        for name, p in model.named_parameters():
            err = (grads[name] - p.grad).abs().max().item()
            assert err < TOL, f"{name}: {err:.3g}"


def _expected_received(lengths, rank, ws, rs, heads, causal, b, d_kv):
    """Elements rank ``rank`` must receive, counted position by position from the definition:
    every (key, head) held by another rank that is selected in a segment where this rank has a
    query selected for that head (and, when causal, lies before this rank's chunk)."""
    starts = [sum(lengths[:j]) for j in range(len(lengths))]
    a, z = starts[rank], starts[rank] + lengths[rank]
    n = sum(lengths)
    total = 0
    for w, r in zip(ws, rs):
        for h in range(heads):
            sel = lambda p: (p - p // w * w) % r == h % r  # noqa: E731
            segs = {p // w for p in range(a, z) if sel(p)}
            total += sum(1 for k in range(n) if not a <= k < z and k // w in segs and sel(k) and (not causal or k < a))
    return total * b * d_kv


def _bytes_ranks(rank, world, cases):
    import torch.distributed as dist

    sent = []
    real = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        sent.append((list(output_split_sizes), list(input_split_sizes)))
        return real(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = counting
    out = []
    for c in cases:
        sent.clear()
        q, k, v, dout = _tensors(c)
        a = sum(c["lengths"][:rank])
        sl = slice(a, a + c["lengths"][rank])
        ql, kl, vl = (t[:, sl].clone().requires_grad_() for t in (q, k, v))
        o = dilated_attention(ql, kl, vl, c["ws"], c["rs"], causal=c["causal"], backend="torch",
                              group=dist.group.WORLD, lengths=c["lengths"])
        o.backward(dout[:, sl])
        out.append([(sum(recv), sum(send)) for recv, send in sent])
    return out


def test_exchanged_elements_follow_the_formula_and_do_not_grow_with_n():
    """One exchange forward and one backward; what a rank receives forward is exactly the key and
    value rows of its spanning segments held by others (counted from the definition), and the
    same for a sequence four times as long (the same boundaries modulo the segment grid)."""
    base = dict(b=2, h=5, d=3, dv=None, ws=[16, 64, 96], rs=[1, 4, 6], seed=3)
    cases = [dict(base, n=2 * 150, lengths=[150, 150], causal=True),
             dict(base, n=2 * 150 + 2 * 192 * 3, lengths=[150 + 192 * 3] * 2, causal=True),
             dict(base, n=2 * 150, lengths=[150, 150], causal=False),
             dict(base, n=120, lengths=[40, 41, 39], causal=True)]
    by_world = {2: cases[:3], 3: cases[3:]}
    for world, cs in by_world.items():
        ranks = run_ranks(_bytes_ranks, world, cs)
        for i, c in enumerate(cs):
            for rank in range(world):
                exchanges = ranks[rank][i]
                assert len(exchanges) == 2, "one exchange forward, one backward"
                (recv, send), (back_recv, back_send) = exchanges
                want = _expected_received(c["lengths"], rank, c["ws"], c["rs"], c["h"], c["causal"], c["b"], 2 * c["d"])
                assert recv == want and back_send == recv and back_recv == send
        if world == 2:
            assert ranks[1][0] == ranks[1][1]  # 4x longer sequence: the same elements
            assert ranks[1][0][0][0] > 0 and ranks[0][0][0][0] == 0  # causal: only later ranks receive


def _mismatch_ranks(rank, world):
    import torch.distributed as dist

    h = 2 if rank == 0 else 3  # the ranks disagree on the number of heads
    q = torch.randn(1, 10, h, 4, dtype=torch.float64)
    try:
        dilated_attention(q, q, q, [4, 16], [1, 2], backend="torch", group=dist.group.WORLD)
    except ValueError as e:
        return str(e)
    return "no error"


def test_ranks_that_disagree_get_the_same_error_instead_of_a_hang():
    msgs = run_ranks(_mismatch_ranks, 2, timeout=60)
    assert msgs[0] == msgs[1] and "disagree on heads ([2, 3] by rank)" in msgs[0]


def test_empty_chunks_and_bad_groups_are_refused():
    from longnet_lightning.attention.plan import SequenceLayout
    from longnet_lightning.distributed.mesh import MeshShape, split_sequence

    with pytest.raises(ValueError, match=r"rank\(s\) \[1\] hold no position"):
        SequenceLayout((4, 0, 3), 0)
    with pytest.raises(ValueError, match="sequence_parallel_size=3 does not divide the world size 4"):
        MeshShape(4, 0, 3)
    with pytest.raises(ValueError, match="cannot be split over a sequence group of 4"):
        split_sequence(torch.zeros(1, 3), 4, 0)
    shape = MeshShape(8, 5, 2)
    assert (shape.data_parallel_size, shape.data_parallel_rank, shape.sequence_rank) == (4, 2, 1)
