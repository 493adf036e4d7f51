"""The `anypool` command, run as users run it."""

import subprocess
import sys

import pytest

from anypool import cli


def test_explain(capsys, tmp_path):
    assert cli.main(["explain", "10", "3"]) == 0
    out = capsys.readouterr().out
    assert "10 -> 3" in out and "none" in out
    assert cli.main(["explain", "224x224", "7x7", "--png", str(tmp_path / "w.png")]) == 0
    assert "kernel=32, stride=32" in capsys.readouterr().out
    assert (tmp_path / "w.png").stat().st_size > 1000


@pytest.mark.parametrize("argv", [["explain", "10", "-1"], ["explain", "ten", "3"], ["explain", "0", "3"],
                                  ["frobnicate"], ["check", "--cases", "x"]])
def test_bad_arguments_exit_2_with_one_line(argv):
    proc = subprocess.run([sys.executable, "-m", "anypool.cli", *argv], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "error" in proc.stderr


def test_help():
    proc = subprocess.run([sys.executable, "-m", "anypool.cli", "check", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--cases" in proc.stdout


# check and demo import every installed framework (TensorFlow among them), which must
# not share a process with Triton (their LLVM copies clash): run them as users do.
def _anypool(*argv):
    return subprocess.run([sys.executable, "-m", "anypool.cli", *argv], capture_output=True, text=True)


def test_check_runs_and_reports():
    proc = _anypool("check", "--cases", "20")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all columns agree" in proc.stdout and "torch native" in proc.stdout


def test_demo_writes_picture(tmp_path):
    proc = _anypool("demo", "--output", str(tmp_path / "demo.png"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every backend agrees" in proc.stdout
    assert (tmp_path / "demo.png").stat().st_size > 10000
