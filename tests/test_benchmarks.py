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


def _report(changes: dict, between: float) -> dict:
    """A report with the paired differences the Table 2 criteria read: changes[(model, protocol, a, b)] = percent
    (interval +-0.5 around it); `between`: LongNet 8K vs Transformer 2K at 2K."""
    iv = lambda p: {"percent": p, "low": p - 0.5, "high": p + 0.5, "excludes_zero": abs(p) > 0.5}  # noqa: E731
    contexts = [{"model": m, "protocol": pr, "from": a, "to": b, **iv(p)} for (m, pr, a, b), p in changes.items()]
    models = [{"protocol": "non-overlapping", "context_length": 2048, "a": "LongNet 8K", "b": "Transformer 2K",
               **iv(between)}]
    return {"comparisons": {"contexts": contexts, "models": models}}


@pytest.mark.parametrize("longnet_sliding, control_sliding, dense2k, verdict", [
    (-3.0, -3.0, (5.0, 20.0), "reproduced"),
    (0.0, 0.0, (5.0, 20.0), "inconclusive"),
    (-3.0, 0.0, (5.0, 20.0), "reproduced"),  # LongNet gains where the dense control does not
    (0.0, -3.0, (5.0, 20.0), "partly reproduced"),
    (0.0, -3.0, (0.1, 20.0), "not reproduced"),
])
def test_table2_verdict(longnet_sliding, control_sliding, dense2k, verdict):
    from benchmarks.reproduce_table2 import criteria

    L, D2, D8, NO, SL = "LongNet 8K", "Transformer 2K", "Transformer 8K", "non-overlapping", "sliding"
    changes = {(L, NO, 2048, 8192): -4.0, (L, NO, 8192, 32768): 1.0, (L, NO, 2048, 32768): -3.0,
               (L, SL, 2048, 8192): longnet_sliding, (D2, NO, 2048, 8192): dense2k[0],
               (D2, NO, 8192, 32768): dense2k[1], (D8, SL, 2048, 8192): control_sliding}
    r, got, why = criteria(_report(changes, between=1.0), 2048, 8192, 32768)
    assert got == verdict, why
    assert r["R1"][0] and r["R2"][0] and r["R4"][0]
    assert r["R5"][0] == (longnet_sliding < -2) and r["R3"][0] == (dense2k[0] > 0.5)
    _, got, _ = criteria(_report(changes, between=5.0), 2048, 8192, 32768)  # R4 fails: 5% apart at 2K
    assert got != "reproduced"


def _kernel(start, end, name="k", annotation=False):
    from types import SimpleNamespace

    return SimpleNamespace(device_type=torch.autograd.DeviceType.CUDA, name=name, is_user_annotation=annotation,
                           time_range=SimpleNamespace(start=start, end=end))


def test_gpu_busy_is_the_union_of_kernel_intervals_over_their_span():
    from types import SimpleNamespace

    from benchmarks.common import gpu_busy

    kernel = _kernel

    host = SimpleNamespace(device_type=torch.autograd.DeviceType.CPU, time_range=SimpleNamespace(start=0, end=99))
    # overlapping (two streams), nested, a gap of 10 us; the last to start is not the last to end
    # a record_function range on the GPU's timeline spans the gap and is not a kernel
    prof = SimpleNamespace(events=lambda: [kernel(0, 10), host, kernel(5, 20), kernel(30, 40), kernel(32, 35),
                                           kernel(0, 45, "Optimizer.step#AdamW.step", annotation=True)])
    got = gpu_busy(prof, micro_batches=2)
    assert got == {"busy_fraction": 30 / 40, "span_ms_per_micro_batch": 40 / 1e3 / 2, "kernels_per_micro_batch": 2.0}


def test_kernel_time_is_grouped_by_kind_per_step():
    from types import SimpleNamespace

    from benchmarks.common import kernel_kind, kernel_time_by_kind

    names = {"cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16": "attention: kernels (cuDNN, flash, xformers)",
             "_pack_kernel": "attention: data movement (ours)", "nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_NNN": "GEMMs (cuBLAS)",
             "_gln_backward_kernel": "GELU + sub-LN (ours)", "triton_per_fused_native_layer_norm_6": "Inductor's fused kernels",
             "void at::native::multi_tensor_apply_kernel<...>": "optimizer", "Memset (Device)": "copies and fills",
             "void at::native::reduce_kernel<128, 4>": "other"}
    assert {n: kernel_kind(n) for n in names} == names
    prof = SimpleNamespace(events=lambda: [_kernel(0, 3000, "_pack_kernel"), _kernel(0, 1000, "nvjet_x"),
                                           _kernel(5000, 6000, "_pack_kernel"), _kernel(0, 9000, "Step", annotation=True)])
    assert kernel_time_by_kind(prof, steps=2) == [("attention: data movement (ours)", 2.0, 1.0), ("GEMMs (cuBLAS)", 0.5, 0.5)]
