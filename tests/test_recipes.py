"""Every recipe and every size preset parses; the quickstart recipe runs with tiny overrides."""
from __future__ import annotations

import re

import pytest
import yaml
from conftest import REPO, tiny_args

from longnet_lightning.cli import LongNetCLI
from longnet_lightning.lm import LongNetLM
from longnet_lightning.model import PRESETS

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
# A size restated in a comment ("12 layers", "width 768", "FFN 3072", "12 heads"): sizes live in PRESETS only.
RESTATED_SIZE = re.compile(r"#.*(\b\d+ layers\b|\bwidth \d+|\bFFN \d+|\b\d+ heads\b)")


def parsed(capsys, *args: str) -> dict:
    """The resolved config of ``fit <args> --print_config`` (nothing is instantiated)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        LongNetCLI(args=["fit", *args, "--print_config"])
    assert e.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_the_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"quickstart-cpu.yaml", "longnet-125m-32k.yaml", "dense-125m-2k.yaml", "longnet-code-64k.yaml"} <= names
    assert not (REPO / "configs").exists()  # sizes have one home: PRESETS


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_no_file_restates_a_preset_size(path):
    hits = [line for line in path.read_text().splitlines() if RESTATED_SIZE.search(line)]
    assert not hits, f"{path.name} restates model sizes (name the preset instead): {hits}"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_parses(recipe, capsys, monkeypatch):
    monkeypatch.delenv("LONGNET_DATA", raising=False)
    cfg = parsed(capsys, "--config", str(recipe))
    model, data, trainer = cfg["model"]["init_args"], cfg["data"]["init_args"], cfg["trainer"]
    assert model["model"] in PRESETS
    assert trainer["gradient_clip_val"] == 2.0
    assert data["seq_len"] >= 1 and data["batch_size"] >= 1
    cfg_model = LongNetLM(**{k: v for k, v in model.items()}).model_config(vocab_size=300)  # checks, builds nothing
    assert cfg_model.n_layer >= 1
    if recipe.name != "quickstart-cpu.yaml":
        assert trainer["precision"] == "bf16-mixed"
        strategy = trainer.get("strategy")
        sp = strategy["init_args"].get("sequence_parallel_size", 1) if isinstance(strategy, dict) else 1
        devices = trainer["devices"] if isinstance(trainer["devices"], int) else 1
        tokens_per_step = (data["batch_size"] * data["seq_len"] * trainer["accumulate_grad_batches"] * devices
                           // sp)  # over all GPUs; a sequence group reads one batch
        expect = 2**20 if "-1m-" in recipe.name else 64 * 1024 if recipe.name.startswith("repro-") else 512 * 1024
        assert tokens_per_step == expect


def test_recipe_settings(capsys, monkeypatch):
    monkeypatch.setenv("LONGNET_DATA", "/some/corpus")
    dense = parsed(capsys, "--config", str(REPO / "recipes" / "dense-125m-2k.yaml"))
    assert dense["model"]["init_args"]["attention"] == "dense" and dense["data"]["init_args"]["seq_len"] == 2048
    assert dense["data"]["init_args"]["data_path"] == "/some/corpus"
    longnet = parsed(capsys, "--config", str(REPO / "recipes" / "longnet-125m-32k.yaml"))
    assert longnet["model"]["init_args"]["model"] == "125M" and longnet["data"]["init_args"]["seq_len"] == 32768
    code = parsed(capsys, "--config", str(REPO / "recipes" / "longnet-code-64k.yaml"))
    assert code["model"]["init_args"]["activation_checkpointing"] is True
    # a recipe's model file plus a command-line override
    switched = parsed(capsys, "--config", str(REPO / "recipes" / "longnet-125m-32k.yaml"), "--model.attention", "dense")
    assert switched["model"]["init_args"]["attention"] == "dense"


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("attention", [None, "dense"])
def test_every_preset_is_one_command_line_setting(preset, attention, capsys):
    extra = () if attention is None else ("--model.attention", attention)
    init = parsed(capsys, "--model.model", preset, *extra)["model"]["init_args"]
    assert init["model"] == preset and init["attention"] == attention
    cfg = LongNetLM(**init).model_config(vocab_size=300)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.ffn_dim) == tuple(
        PRESETS[preset][k] for k in ("n_layer", "n_embd", "n_head", "ffn_dim"))
    assert cfg.attention == (attention or "dilated")


def test_quickstart_recipe_runs_with_tiny_overrides(tmp_path, tiny_corpus, cache_dir):
    args = tiny_args(tmp_path, tiny_corpus, cache_dir, steps=3,
                     extra=("--trainer.val_check_interval", "3", "--trainer.logger", "false"))
    cli = LongNetCLI(args=["fit", "--config", str(REPO / "recipes" / "quickstart-cpu.yaml"), *args])
    assert cli.trainer.global_step == 3
    assert cli.model.config.n_layer == 4 and cli.model.config.segment_lengths == [64, 128, 256]
    assert "val/ppl" in cli.trainer.callback_metrics
