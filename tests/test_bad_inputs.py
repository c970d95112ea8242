"""Every row of docs/bad-inputs.md: the command fails with exit status 2 and exactly the one
``error:`` line the table shows (so the document cannot drift from the code)."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO

from longnet_lightning.cli import cli_main
from longnet_lightning.evaluation.command import main as evaluate_main

TABLE = REPO / "docs" / "bad-inputs.md"
ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(fit|validate|test|predict|evaluate)\s*\|\s*`(.*?)`\s*\|\s*`` (.*) ``\s*\|\s*$")
DEBUG_HINT = "  (set LONGNET_DEBUG=1 for the traceback)"


def table_rows() -> list[tuple[str, str, str, str]]:
    """(number, command, arguments, message) of every row of the table."""
    rows = [ROW.match(line) for line in TABLE.read_text(encoding="utf-8").splitlines()]
    return [m.groups() for m in rows if m]


@pytest.fixture(scope="module")
def places(tmp_path_factory, tiny_corpus, cache_dir):
    """What the table's placeholders stand for."""
    from test_evaluation_golden import fixed_checkpoint

    root = tmp_path_factory.mktemp("bad-inputs")
    _, ckpt = fixed_checkpoint(root)
    notckpt = root / "notes.ckpt"
    notckpt.write_text("not a checkpoint")
    return {"corpus": str(tiny_corpus), "ckpt": str(ckpt), "notckpt": str(notckpt), "cache": str(cache_dir)}


def run_case(command: str, words: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        if command == "evaluate":
            code = evaluate_main(["--no_progress", *words])
        else:
            cli_main([command, *words, "--trainer.enable_progress_bar", "false"])
            code = 0
    except SystemExit as e:  # argument errors exit from the parser
        code = e.code
    return code, capsys.readouterr().err


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_the_table_has_at_least_25_cases_across_the_commands():
    rows = table_rows()
    assert len(rows) >= 25
    assert [r[0] for r in rows] == [str(i) for i in range(1, len(rows) + 1)]
    assert {"fit", "validate", "predict", "evaluate"} <= {r[1] for r in rows}


@pytest.mark.parametrize("number, command, arguments, message", table_rows(), ids=lambda v: str(v)[:40])
def test_bad_input_gives_its_one_line(number, command, arguments, message, places, tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # nothing lands in the repository; {cwd} is this empty folder
    monkeypatch.setenv("LONGNET_CACHE", places["cache"])
    monkeypatch.delenv("LONGNET_DEBUG", raising=False)
    fill = {**places, "cwd": str(cwd)}
    words = [w.format(**fill) for w in shlex.split(arguments)]
    code, stderr = run_case(command, words, capsys)
    lines = error_lines(stderr)
    assert code == 2 and len(lines) == 1, stderr
    got = lines[0][len("error: "):]
    if got.endswith(DEBUG_HINT.strip()):
        got = got[: -len(DEBUG_HINT.strip())].rstrip()
    assert got == message.format(**fill)
    assert "Traceback" not in stderr


def test_a_bad_input_is_one_line_and_status_2_from_the_shell(tmp_path, tiny_corpus):
    """The real entry point, as a subprocess: exactly one line on stderr for a bad setting."""
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "LONGNET_CACHE": str(tmp_path / "cache"),
           "HOME": str(tmp_path)}
    for words in (["fit", "--data.data_path", str(tiny_corpus), "--model.segment_lengths", "[8,16]",
                   "--model.dilation_rates", "[1]", "--trainer.logger", "false"],
                  ["evaluate", "--ckpt_path", str(tmp_path / "none.ckpt"), "--context_lengths", "0"]):
        proc = subprocess.run([sys.executable, "-m", "longnet_lightning", *words], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=120)
        errors = error_lines(proc.stderr)
        assert proc.returncode == 2 and len(errors) == 1, proc.stderr
        assert "Traceback" not in proc.stderr and "Union" not in proc.stderr
