"""The checkpoint module: the model config as plain data, load_model, and every damaged file refused."""
from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from conftest import tiny_args
from test_evaluation_golden import fixed_checkpoint

from longnet_lightning import checkpoint as ck
from longnet_lightning.cli import CLIError, LongNetCLI
from longnet_lightning.evaluation.command import main as evaluate_main
from longnet_lightning.lm import LongNetLM
from longnet_lightning.model import LongNet, LongNetConfig

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    _, path = fixed_checkpoint(root)
    return path


def _overwritten(src, dst):
    data = bytearray(src.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(64)  # zeros over weights in the middle: a valid zip, wrong bytes
    dst.write_bytes(bytes(data))


def _truncated(src, dst):
    dst.write_bytes(src.read_bytes()[: src.stat().st_size * 2 // 3])


def _foreign_class(src, dst):
    raw = torch.load(src, map_location="cpu", weights_only=True)
    raw["hyper_parameters"]["_class_path"] = "some_untrusted_module.Model"
    torch.save(raw, dst)


def _not_a_checkpoint(src, dst):
    dst.write_text("hello, not a checkpoint\n" * 40)


DAMAGE = {
    "overwritten": (_overwritten, "fails its CRC-32 check"),
    "truncated": (_truncated, "is truncated"),
    "not-a-checkpoint": (_not_a_checkpoint, "is not a PyTorch checkpoint"),
}


# ----------------------------------------------------------------------------- the format


def test_checkpoint_carries_the_config_and_rebuilds_the_model_alone(saved):
    raw = ck.read_checkpoint(saved)
    stored = raw[ck.MARK]["config"]
    assert isinstance(stored, dict) and set(stored) == set(ck.CONFIG_FIELDS)
    assert all(isinstance(v, (int, float, str, bool, list, dict)) for v in stored.values())  # plain data
    net = ck.load_model(saved)
    assert isinstance(net, LongNet) and not net.training
    assert net.config == LongNetConfig.from_name("tiny", vocab_size=257)
    lm = LongNetLM.load_from_checkpoint(saved)
    for k, v in net.state_dict().items():
        assert torch.equal(v, lm.model.state_dict()[k]), k
    x = torch.randint(0, 257, (1, 40))
    torch.testing.assert_close(net(x), lm(x), rtol=0, atol=0)


def test_checkpoint_without_a_stored_config_is_rebuilt_from_its_hyperparameters(saved, tmp_path):
    raw = torch.load(saved, map_location="cpu", weights_only=True)
    del raw[ck.MARK]["config"]  # as written before the config was stored
    torch.save(raw, tmp_path / "old.ckpt")
    old, new = ck.load_model(tmp_path / "old.ckpt"), ck.load_model(saved)
    assert old.config == new.config
    assert all(torch.equal(v, new.state_dict()[k]) for k, v in old.state_dict().items())


def test_the_settings_mapping_covers_every_config_field():
    """Derived from dataclasses.fields: every field given directly reaches the config."""
    target = LongNetConfig(vocab_size=300, n_layer=3, n_embd=96, n_head=6, ffn_dim=200, attention="dense",
                           segment_lengths=[16, 32], dilation_rates=[1, 2], position="rope", rope_theta=500.0,
                           xpos_scale_base=64.0, sub_layernorm=False, bias=False, dropout=0.1, norm_eps=1e-6,
                           tie_embeddings=False, activation_checkpointing=True, loss_chunk_size=128)
    settings = target.to_dict()
    assert set(settings) == {f.name for f in dataclasses.fields(LongNetConfig)} == set(ck.CONFIG_FIELDS)
    vocab = settings.pop("vocab_size")
    assert ck.config_from_settings("tiny", vocab, **settings) == target
    assert ck.config_from_dict(target.to_dict()) == target
    assert set(ck.architecture_keys()) >= {"model", "pattern", "overrides", "attention", "position", "n_layer"}
    assert not set(ck.architecture_keys()) & ck.RUNTIME_FIELDS
    with pytest.raises(ck.CheckpointError, match=r"\['n_expert'\]"):
        ck.config_from_dict({**target.to_dict(), "n_expert": 4})


def test_a_class_path_is_imported_only_if_ours_or_named():
    assert ck.check_class_path("longnet_lightning.lm.LongNetLM") == "longnet_lightning.lm.LongNetLM"
    assert ck.check_class_path("my_plugins.MyLM", named="my_plugins.MyLM") == "my_plugins.MyLM"
    with pytest.raises(ck.CheckpointError, match="--model.class_path my_plugins.MyLM"):
        ck.check_class_path("my_plugins.MyLM", named="longnet_lightning.lm.LongNetLM")
    with pytest.raises(ck.CheckpointError, match="outside longnet_lightning"):
        ck.check_class_path("longnet_lightning_evil.Model")


# ----------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_files_are_refused_before_any_weight_is_used(saved, tmp_path, kind):
    make, needle = DAMAGE[kind]
    bad = tmp_path / f"{kind}.ckpt"
    make(saved, bad)
    with pytest.raises(ck.CheckpointError, match=needle) as e:
        ck.load_model(bad)
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg
    others = [n for k, (_, n) in DAMAGE.items() if k != kind]
    assert not any(n in msg for n in others)  # each damage has its own message
    with pytest.raises(ck.CheckpointError, match=needle):
        LongNetLM.load_from_checkpoint(bad)


def test_overwritten_bytes_would_otherwise_load(saved, tmp_path):
    """Without the CRC check torch loads the overwritten archive silently: the check is what refuses it."""
    bad = tmp_path / "bad.ckpt"
    _overwritten(saved, bad)
    raw = ck.read_checkpoint(bad, verify=False)
    assert "state_dict" in raw


@pytest.mark.parametrize("kind", [*DAMAGE, "foreign-class"])
def test_cli_and_evaluate_refuse_damaged_checkpoints_in_one_line(saved, tmp_path, tiny_corpus, cache_dir, capsys,
                                                                  kind):
    make, needle = DAMAGE.get(kind, (_foreign_class, "class_path='some_untrusted_module.Model', which is outside"))
    bad = tmp_path / f"{kind}.ckpt"
    make(saved, bad)
    with pytest.raises(CLIError, match=needle):
        LongNetCLI(args=["validate", *tiny_args(tmp_path, tiny_corpus, cache_dir), "--ckpt_path", str(bad)])
    if kind == "foreign-class":
        return  # evaluate never imports a class: it rebuilds the LongNet from the stored config
    capsys.readouterr()
    code = evaluate_main(["--no_progress", "--ckpt_path", str(bad), "--data_path", str(tiny_corpus),
                          "--context_lengths", "16", "--out_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_good_copy_still_loads(saved, tmp_path):
    shutil.copy(saved, tmp_path / "copy.ckpt")
    assert ck.verify_archive(tmp_path / "copy.ckpt") == tmp_path / "copy.ckpt"
