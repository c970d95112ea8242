"""The benchmarks are a package run as ``python -m benchmarks.<name>``: each one imports, prints
its help, and on a machine without CUDA the GPU ones stop with a one-line message."""
import importlib
import pkgutil
import sys

import pytest
import torch

import benchmarks

SCRIPTS = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name != "common")
CPU_SCRIPTS = {"cpu_memory", "reproduce_table2", "sequence_parallel"}  # run on CPU too


def run_main(monkeypatch, name, *argv):
    module = importlib.import_module(f"benchmarks.{name}")
    monkeypatch.setattr(sys, "argv", [f"benchmarks/{name}.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    return exit_info.value


def test_every_script_is_listed():
    assert len(SCRIPTS) >= 10 and "attention" in SCRIPTS


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name, monkeypatch, capsys):
    assert run_main(monkeypatch, name, "--help").code == 0
    assert f"python -m benchmarks.{name}" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
@pytest.mark.parametrize("name", sorted(set(SCRIPTS) - CPU_SCRIPTS))
def test_gpu_scripts_say_they_need_cuda(name, monkeypatch):
    code = run_main(monkeypatch, name).code
    assert isinstance(code, str) and "needs a CUDA GPU" in code and "\n" not in code


def test_paper_pattern_comes_from_the_library():
    from benchmarks.common import PAPER
    from longnet_lightning.model import PATTERNS

    assert (tuple(PAPER.segment_lengths), tuple(PAPER.dilation_rates)) == PATTERNS["paper"]
