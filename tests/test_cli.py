"""The command line, run as a user runs it: in a subprocess."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


def run_cli(*arguments: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deepshrink", "--quiet", *arguments],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


@pytest.mark.parametrize("command", [[], ["train"], ["evaluate"], ["reference"], ["info"]])
def test_help_explains_every_command(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0
    assert "usage: deepshrink" in result.stdout


def test_tiny_train_then_evaluate_agree(tmp_path):
    out = tmp_path / "tiny.safetensors"
    trained = run_cli("train", "--model", "lenet-300-100", "--epochs", "1", "--train-subset", "2000", "--out", str(out))
    assert trained.returncode == 0, trained.stderr
    printed = float(re.search(r"test accuracy: ([0-9.]+)", trained.stdout).group(1))
    assert out.is_file() and printed > 0.5
    evaluated = run_cli("evaluate", str(out))
    assert evaluated.returncode == 0, evaluated.stderr
    assert float(re.search(r"test accuracy: ([0-9.]+)", evaluated.stdout).group(1)) == printed


def test_info_lists_models_and_data():
    result = run_cli("info")
    assert result.returncode == 0
    assert "lenet-300-100" in result.stdout and "266,610" in result.stdout and "431,080" in result.stdout


@pytest.mark.parametrize(
    ("arguments", "code", "message"),
    [
        (["train", "--data-dir", "/nonexistent/data"], 4, "no MNIST-format data set found"),
        (["evaluate", "/nonexistent/model.safetensors"], 6, "no such checkpoint file"),
        (["train", "--model", "lenet-7"], 7, "unknown model 'lenet-7'"),
        (["train", "--lr", "-1", "--epochs", "1"], 3, "learning_rate=-1.0"),
        (["train", "--device", "tpu", "--epochs", "1"], 3, "device='tpu'"),
    ],
)
def test_bad_input_gives_one_line_and_a_distinct_exit_code(arguments, code, message):
    result = run_cli(*arguments)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_user_factory_checkpoint_needs_explicit_model(tmp_path):
    """A checkpoint cannot make us import code it names; the user must pass --model."""
    out = tmp_path / "mine.safetensors"
    trained = run_cli(
        "train", "--model", "deepshrink.models:LeNet300100", "--epochs", "1", "--train-subset", "500", "--out", str(out)
    )
    assert trained.returncode == 0, trained.stderr
    refused = run_cli("evaluate", str(out))
    assert refused.returncode == 7 and "--model deepshrink.models:LeNet300100" in refused.stderr
    accepted = run_cli("evaluate", str(out), "--model", "deepshrink.models:LeNet300100")
    assert accepted.returncode == 0, accepted.stderr
