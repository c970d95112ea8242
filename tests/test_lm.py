"""LongNetLM on its own: causality, metrics, optimizer, schedule, checkpoints, generation, errors."""
from __future__ import annotations

import math
import types

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from longnet_lightning.data import ByteTokenizer, LongTextDataModule
from longnet_lightning.lm import LongNetLM
from longnet_lightning.metrics import BitsPerByte, TokenNLL, TokenPerplexity
from longnet_lightning.optim import lr_factor


def _lm(**kw) -> LongNetLM:
    torch.manual_seed(0)
    return LongNetLM(vocab_size=kw.pop("vocab_size", 257), **kw)


# ----------------------------------------------------------------------------- causality


@pytest.mark.parametrize("attention", ["dilated", "dense"])
def test_whole_model_is_causal(attention):
    """Changing the tokens after position p changes no logit at or before p (and some after)."""
    lm = _lm(attention=attention).eval()  # tiny: segments 32/64/128, rates 1/2/4
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 257, (2, 150), generator=g)  # longer than the largest segment
    with torch.no_grad():
        base = lm(x)
        for p in (0, 31, 32, 63, 64, 100, 127, 128, 148):
            y = x.clone()
            y[:, p + 1:] = torch.randint(0, 257, y[:, p + 1:].shape, generator=g)
            out = lm(y)
            torch.testing.assert_close(out[:, : p + 1], base[:, : p + 1], rtol=0, atol=1e-6)
            assert not torch.allclose(out[:, p + 1:], base[:, p + 1:])


# ----------------------------------------------------------------------------- metrics


def _batch(vocab=257, b=3, t=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (b, t), generator=g)
    labels = torch.randint(0, vocab, (b, t), generator=g)
    labels[0, :7] = -100  # unscored targets
    labels[2, -5:] = -100
    labels[1, 3] = 256  # EOS: scored, worth 0 bytes
    return {"input_ids": x, "labels": labels}


def test_chunked_nll_matches_full_cross_entropy():
    lm = _lm(overrides={"loss_chunk_size": 7})
    batch = _batch()
    nll = lm.token_nll(batch)
    logits = lm(batch["input_ids"])
    ref = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="none")
    torch.testing.assert_close(nll.flatten(), ref, rtol=1e-5, atol=1e-5)
    assert (nll[batch["labels"] == -100] == 0).all()


def test_perplexity_and_bits_per_byte_over_exactly_the_scored_tokens():
    lm = _lm()
    table = torch.from_numpy(ByteTokenizer().token_bytes())
    metrics = {"nll": TokenNLL(), "ppl": TokenPerplexity(), "bpb": BitsPerByte(table)}
    all_nll, all_labels = [], []
    for seed in range(3):
        batch = _batch(seed=seed)
        nll = lm.token_nll(batch).detach()
        for m in metrics.values():
            m.update(nll, batch["labels"])
        all_nll.append(nll.flatten())
        all_labels.append(batch["labels"].flatten())
    nll, labels = torch.cat(all_nll).double(), torch.cat(all_labels)
    scored = labels != -100
    mean = nll[scored].sum() / scored.sum()
    n_bytes = (scored & (labels < 256)).sum()  # bytes 0..255 are 1 byte, EOS 0
    torch.testing.assert_close(metrics["nll"].compute(), mean)
    torch.testing.assert_close(metrics["ppl"].compute(), torch.exp(mean))
    torch.testing.assert_close(metrics["bpb"].compute(), nll[scored].sum() / math.log(2) / n_bytes)
    assert metrics["ppl"].nll_sum.dtype == torch.float64


def test_metric_states_sum_across_devices():
    """Each state reduces by sum, so merging per-device states equals one metric over all data."""
    table = torch.ones(257, dtype=torch.int64)
    whole, dev0, dev1 = BitsPerByte(table), BitsPerByte(table), BitsPerByte(table)
    b0, b1 = _batch(seed=0), _batch(seed=1)
    n0, n1 = torch.rand(b0["labels"].shape), torch.rand(b1["labels"].shape)
    whole.update(n0, b0["labels"])
    whole.update(n1, b1["labels"])
    dev0.update(n0, b0["labels"])
    dev1.update(n1, b1["labels"])
    for name in ("nll_sum", "tokens", "bytes"):
        assert dev0._reductions[name].__name__ == "dim_zero_sum"
    dev0.merge_state(dev1)
    torch.testing.assert_close(dev0.compute(), whole.compute())


# ----------------------------------------------------------------------------- optimizer


def test_weight_decay_only_on_linear_weight_matrices():
    lm = _lm()
    decay, keep = lm.parameter_groups()
    names = {id(p): n for n, p in lm.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in keep["params"]}
    assert decay["weight_decay"] == 0.01 and keep["weight_decay"] == 0.0
    assert "model.embed.weight" in kept  # tied with the output matrix
    assert all(n.endswith(".weight") and "norm" not in n for n in decayed)
    assert any(n.endswith("q_proj.weight") for n in decayed) and any(n.endswith("fc2.weight") for n in decayed)
    assert any(n.endswith(".bias") for n in kept) and any("norm" in n for n in kept)
    assert len(decayed) + len(kept) == len(list(lm.parameters()))


def test_warmup_then_linear_decay_to_min_lr():
    lm = _lm(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    f = lm.lr_schedule(110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


@pytest.mark.parametrize("power", [0.5, 1.0, 2.0])
def test_lr_factor_is_a_pure_function_of_the_step(power):
    kw = dict(warmup_steps=4, decay_steps=20, min_ratio=0.25, power=power)
    assert [lr_factor(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # linear warm-up
    assert lr_factor(4, **kw) == 1.0 and lr_factor(20, **kw) == lr_factor(99, **kw) == 0.25
    assert lr_factor(12, **kw) == pytest.approx(0.25 + 0.75 * 0.5**power)  # half-way through the decay
    decay = [lr_factor(s, **kw) for s in range(4, 21)]
    assert decay == sorted(decay, reverse=True)  # never rises after the warm-up
    assert lr_factor(0, warmup_steps=0, decay_steps=10) == 1.0  # no warm-up: starts at the peak


def test_paper_optimizer_defaults():
    hp = _lm().hparams
    assert (hp.lr, tuple(hp.betas), hp.eps, hp.weight_decay, hp.warmup_steps, hp.decay_power) == (
        6e-4, (0.9, 0.98), 1e-6, 0.01, 750, 1.0)


# ----------------------------------------------------------------------------- configuration


def test_one_setting_switches_to_the_dense_baseline():
    lm = LongNetLM(model="125M", attention="dense")  # vocab unknown: nothing is built
    assert lm.model is None
    assert _lm().model is None  # even with vocab_size: built by configure_model, the one hook
    cfg = lm.model_config(vocab_size=32768)
    assert (cfg.attention, cfg.n_layer, cfg.n_embd) == ("dense", 12, 768)
    assert LongNetLM(model="125M").model_config(vocab_size=32768).segment_lengths[-1] == 32768


def test_overrides_and_pattern():
    cfg = LongNetLM(model="tiny", pattern="small", overrides={"n_layer": 3}).model_config(vocab_size=300)
    assert cfg.n_layer == 3 and cfg.segment_lengths == [256, 512, 1024, 2048]


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(model="huge"), "model='huge'"),
        (dict(segment_lengths=[8, 16]), "dilation_rates"),
        (dict(vocab_size=0), "vocab_size=0"),
        (dict(min_lr=1.0), "min_lr"),
        (dict(attention="sparse", vocab_size=257), "attention='sparse'"),
        (dict(overrides={"n_layers": 3}, vocab_size=257), "n_layers"),
        (dict(overrides={"attention": "dense"}, attention="dense", vocab_size=257), "overrides"),
    ],
)
def test_bad_settings_name_the_setting(kw, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        LongNetLM(**kw)


def test_unbuilt_model_says_why():
    with pytest.raises(RuntimeError, match="vocab_size"):
        LongNetLM()(torch.zeros(1, 4, dtype=torch.long))


# ----------------------------------------------------------------------------- with a Trainer


def _trainer(tmp_path, steps):
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                     limit_val_batches=2, default_root_dir=tmp_path)


def test_checkpoint_round_trip_without_other_input(tmp_path, tiny_corpus, cache_dir):
    """vocab_size left to the data: the model is built by the Trainer and still reloads alone."""
    dm = LongTextDataModule(str(tiny_corpus), seq_len=64, batch_size=4, val_fraction=0.2, test_fraction=0.2,
                            cache_dir=str(cache_dir))
    torch.manual_seed(0)
    lm = LongNetLM(warmup_steps=1, dropout=0.0)
    trainer = _trainer(tmp_path, 3)
    trainer.fit(lm, datamodule=dm)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    back = LongNetLM.load_from_checkpoint(path)
    assert back.hparams.vocab_size == 257 and back.hparams.seq_len == 64
    assert back.tokenizer_spec == {"kind": "byte"} and back.tokens_seen == 3 * 4 * 64
    for k, v in lm.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    assert isinstance(back.generate("ab", max_new_tokens=3)[0], str)


def test_generation_is_seeded_and_respects_settings():
    lm = _lm(seq_len=16, max_new_tokens=12, temperature=1.0, top_k=5, stop_at_eos=False)
    lm.tokenizer_spec = {"kind": "byte"}
    a, b = lm.generate(["x", "yz"]), lm.generate(["x", "yz"])
    assert a == b and len(a) == 2
    assert lm.generate("yz", first_index=1) == [a[1]]  # prompt i is seeded by its index, not its batch
    new = lm.generate_ids(torch.tensor([[256, 120]]), max_new_tokens=20, temperature=0)
    assert new.shape == (1, 20)  # context cropped to seq_len=16 without failing
    out = lm.predict_step([{"index": 0, "prompt": "x"}], 0)
    assert out[0]["completion"] == a[0] and out[0]["prompt"] == "x"


def test_generation_without_tokenizer_is_an_error():
    with pytest.raises(ValueError, match="tokenizer"):
        _lm().generate("hi")


def test_training_step_trains_on_the_summed_loss_operator(monkeypatch):
    """A Lightning training batch backpropagates through the summed loss (its gradient from the
    forward, one GEMM fewer), and its loss is the mean NLL of the per-token path."""
    from longnet_lightning import loss as lce

    calls = []
    original = lce._lce_sum_op
    monkeypatch.setattr(lce, "_lce_sum_op", lambda *a: calls.append(1) or original(*a))
    lm = _lm()
    batch = _batch()
    seen = {}

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen["loss"] = outputs["loss"].detach()

    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Probe()])
    with torch.no_grad():
        scored = (batch["labels"] != -100).sum()
        want = lm.token_nll(batch).sum() / scored
    trainer.fit(lm, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    assert calls == [1]
    torch.testing.assert_close(seen["loss"], want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- CUDA graphs


def _replayed_gradients(module: torch.nn.Module) -> None:
    """Make every parameter's gradient arrive as a CUDA-graph replay's would: a fresh tensor on a
    static buffer that the next backward overwrites."""
    def hook(p):
        static = torch.zeros_like(p)
        return lambda g: static.copy_(g).view_as(static)

    for p in module.parameters():
        p.register_hook(hook(p))


def _fit_accumulating(lm: LongNetLM, static: bool) -> dict[str, torch.Tensor]:
    lm.configure_model()
    if static:
        _replayed_gradients(lm.model)
    batches = [_batch(b=3, t=24, seed=s) for s in range(6)]
    trainer = L.Trainer(max_steps=2, accumulate_grad_batches=3, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(lm, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return {k: v.clone() for k, v in lm.state_dict().items()}


def test_cuda_graphs_keep_gradient_buffers_so_accumulation_survives_replays(monkeypatch):
    """Gradients accumulated over micro-batches are exact even when each backward's gradients live
    in memory the next one overwrites (CUDA graphs): with ``cuda_graphs`` every ``.grad`` is a buffer
    of its own, added into, never the replay's output itself. Without it they would be corrupted."""
    monkeypatch.setattr(LongNetLM, "_compiled_loss", lambda self, x: None)  # the CPU runs the eager loss
    want = _fit_accumulating(_lm(warmup_steps=0, lr=1e-2), static=False)
    graphs = _fit_accumulating(_lm(warmup_steps=0, lr=1e-2, compile=True, cuda_graphs=True), static=True)
    broken = _fit_accumulating(_lm(warmup_steps=0, lr=1e-2), static=True)
    for k, v in want.items():
        torch.testing.assert_close(graphs[k], v, rtol=1e-6, atol=1e-7, msg=k)
    assert any(not torch.allclose(broken[k], v) for k, v in want.items())


def test_keep_gradient_buffers_allocates_only_missing_trainable_gradients():
    from longnet_lightning.lm import keep_gradient_buffers

    a, b, frozen = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(
        torch.ones(1), requires_grad=False)
    b.grad = g = torch.full((2,), 5.0)
    keep_gradient_buffers([a, b, frozen])
    assert torch.equal(a.grad, torch.zeros(3)) and b.grad is g and frozen.grad is None


def test_cuda_graphs_settings_say_what_they_need():
    with pytest.raises(ValueError, match="compile=True"):
        LongNetLM(cuda_graphs=True)
    lm = _lm(compile=True, cuda_graphs=True)
    with pytest.raises(ValueError, match="needs a CUDA device.*cuda_graphs=false"):
        lm.token_nll(_batch())
    lm._trainer = types.SimpleNamespace(world_size=2)  # what a DDP run's trainer says
    with pytest.raises(ValueError, match="one device, but this run has 2 processes"):
        lm.token_nll(_batch())
