"""The command line. Each file a command writes is evaluated again by a new process (`deepshrink
evaluate` in a subprocess, as a user runs it), so that it stands on its own; the commands that
make the files, and the checks of parsing and error messages, run in this process (a new
interpreter costs seconds per call, importing torch)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from deepshrink.cli import main


def run_cli(*arguments: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deepshrink", "--quiet", *arguments],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["train"],
        ["evaluate"],
        ["reference"],
        ["info"],
        ["run"],
        ["lowrank"],
        ["predict"],
        ["bench"],
        ["prune"],
        ["sensitivity"],
        ["quantize"],
        ["encode"],
        ["decode"],
        ["inspect"],
    ],
)
def test_help_explains_every_command(cli, command):
    result = cli(*command, "--help")
    assert result.returncode == 0
    assert "usage: deepshrink" in result.stdout


def test_tiny_train_then_evaluate_agree(cli, tmp_path):
    out = tmp_path / "tiny.safetensors"
    trained = cli("train", "--model", "lenet-300-100", "--epochs", "1", "--train-subset", "2000", "--out", str(out))
    assert trained.returncode == 0, trained.stderr
    printed = float(re.search(r"test top-1 accuracy: ([0-9.]+)", trained.stdout).group(1))
    assert out.is_file() and printed > 0.5
    evaluated = run_cli("evaluate", str(out))
    assert evaluated.returncode == 0, evaluated.stderr
    assert float(re.search(r"test top-1 accuracy: ([0-9.]+)", evaluated.stdout).group(1)) == printed


def test_info_lists_models_and_data(cli):
    result = cli("info")
    assert result.returncode == 0
    assert "lenet-300-100" in result.stdout and "266,610" in result.stdout and "431,080" in result.stdout


@pytest.mark.parametrize(
    ("arguments", "code", "message"),
    [
        (["train", "--data-dir", "/nonexistent/data"], 4, "no MNIST-format data set found"),
        (["evaluate", "/nonexistent/model.safetensors"], 6, "no such checkpoint file"),
        (["train", "--model", "lenet-7"], 7, "unknown model 'lenet-7'"),
        # Option values out of range are usage errors (exit 2).
        (["train", "--lr", "-1", "--epochs", "1"], 2, "argument --lr: -1 should be above 0"),
        (["train", "--device", "tpu", "--epochs", "1"], 2, "argument --device: 'tpu' is not a device"),
    ],
)
def test_bad_input_gives_one_line_and_a_distinct_exit_code(cli, arguments, code, message):
    result = cli(*arguments)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_user_factory_checkpoint_needs_explicit_model(cli, tmp_path):
    """A checkpoint cannot make us import code it names; the user must pass --model."""
    out = tmp_path / "mine.safetensors"
    trained = cli(
        "train", "--model", "deepshrink.models:LeNet300100", "--epochs", "1", "--train-subset", "500", "--out", str(out)
    )
    assert trained.returncode == 0, trained.stderr
    refused = cli("evaluate", str(out))
    assert refused.returncode == 7 and "--model deepshrink.models:LeNet300100" in refused.stderr
    accepted = run_cli("evaluate", str(out), "--model", "deepshrink.models:LeNet300100")
    assert accepted.returncode == 0, accepted.stderr


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    assert main(["--quiet", "train", "--epochs", "1", "--train-subset", "3000", "--out", str(out)]) == 0
    return out


def test_prune_writes_a_pruned_checkpoint_that_evaluates_as_printed(cli, tiny_checkpoint, tmp_path):
    out = tmp_path / "pruned.safetensors"
    pruned = cli(
        "prune",
        str(tiny_checkpoint),
        "--sparsity",
        "fc1=0.9",
        "--sparsity",
        "fc[23]=0.5",
        "--rounds",
        "1",
        "--retrain-epochs",
        "0",
        "--out",
        str(out),
        "--report-dir",
        str(tmp_path),
    )
    assert pruned.returncode == 0, pruned.stderr
    assert re.search(r"fc1\s+235,200\s+10\.00%", pruned.stdout)
    printed = float(re.search(r"before, ([0-9.]+) after", pruned.stdout).group(1))
    evaluated = run_cli("evaluate", str(out))
    assert float(re.search(r"test top-1 accuracy: ([0-9.]+)", evaluated.stdout).group(1)) == printed
    assert (tmp_path / "prune.md").is_file() and (tmp_path / "prune.json").is_file()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--sparsity", "fc1:0.9"], "should look like LAYER_PATTERN=NUMBER"),
        (["--sparsity", "fc9=0.9"], "matches no layer"),
        (["--sparsity", "fc1=1.5"], "sparsity=1.5"),
        (["--sparsity", "fc1=0.5", "--global-sparsity", "0.5"], "exactly one of"),
    ],
)
def test_bad_prune_options_are_clean_errors(cli, tiny_checkpoint, tmp_path, arguments, message):
    result = cli(
        "prune",
        str(tiny_checkpoint),
        *arguments,
        "--rounds",
        "1",
        "--retrain-epochs",
        "0",
        "--out",
        str(tmp_path / "x.safetensors"),
    )
    assert result.returncode == 3, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_prune_never_overwrites_its_input(cli, tiny_checkpoint):
    before = tiny_checkpoint.read_bytes()
    result = cli(
        "prune",
        str(tiny_checkpoint),
        "--sparsity",
        "fc1=0.5",
        "--rounds",
        "1",
        "--retrain-epochs",
        "0",
        "--out",
        str(tiny_checkpoint),
    )
    assert result.returncode == 3 and "also an input" in result.stderr
    assert tiny_checkpoint.read_bytes() == before


def test_sensitivity_prints_a_table_a_suggestion_and_draws_a_plot(cli, tiny_checkpoint, tmp_path):
    result = cli("sensitivity", str(tiny_checkpoint), "--layers", "fc3", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "--sparsity fc3=" in result.stdout
    assert (tmp_path / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"


def test_quantize_shares_weights_and_evaluates_as_printed(cli, tiny_checkpoint, tmp_path):
    pruned = tmp_path / "pruned.safetensors"
    result = cli(
        "prune",
        str(tiny_checkpoint),
        "--sparsity",
        "fc*=0.8",
        "--rounds",
        "1",
        "--retrain-epochs",
        "0",
        "--out",
        str(pruned),
    )
    assert result.returncode == 0, result.stderr
    shared = tmp_path / "shared.safetensors"
    result = cli(
        "quantize",
        str(pruned),
        "--bits",
        "fc*=4",
        "--finetune-epochs",
        "1",
        "--out",
        str(shared),
        "--report-dir",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    for layer in ("fc1", "fc2", "fc3"):
        distinct = int(re.search(rf"^{layer}\s+[\d,]+\s+[\d.]+%\s+4\s+(\d+)\s+16$", result.stdout, re.M).group(1))
        assert distinct <= 16
    printed = float(re.search(r"before, ([0-9.]+) after", result.stdout).group(1))
    evaluated = run_cli("evaluate", str(shared))
    assert float(re.search(r"test top-1 accuracy: ([0-9.]+)", evaluated.stdout).group(1)) == printed
    assert (tmp_path / "codebooks.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(("bits", "message"), [("fc1=17", "bits=17"), ("fc1=4.5", "whole numbers"), ("fc9=4", "fc9")])
def test_bad_quantize_bits_are_clean_errors(cli, tiny_checkpoint, tmp_path, bits, message):
    result = cli(
        "quantize",
        str(tiny_checkpoint),
        "--bits",
        bits,
        "--finetune-epochs",
        "0",
        "--out",
        str(tmp_path / "x.safetensors"),
    )
    assert result.returncode == 3, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_encode_inspect_decode_round_trip(cli, tiny_checkpoint, tmp_path):
    pruned, shared, packed = (tmp_path / name for name in ("pruned.safetensors", "shared.safetensors", "m.dcz"))
    assert (
        cli(
            "prune",
            str(tiny_checkpoint),
            "--sparsity",
            "fc*=0.9",
            "--rounds",
            "1",
            "--retrain-epochs",
            "0",
            "--out",
            str(pruned),
        ).returncode
        == 0
    )
    assert cli("quantize", str(pruned), "--finetune-epochs", "0", "--out", str(shared)).returncode == 0
    compressed = cli("encode", str(shared), "--out", str(packed), "--report-dir", str(tmp_path))
    assert compressed.returncode == 0, compressed.stderr
    size = int(re.search(r"\(([\d,]+) bytes", compressed.stdout).group(1).replace(",", ""))
    assert size == packed.stat().st_size
    printed = float(re.search(r"decoded file: ([0-9.]+)", compressed.stdout).group(1))
    inspected = cli("inspect", str(packed))
    assert inspected.returncode == 0 and "fc1.weight" in inspected.stdout and f"{size:,}" in inspected.stdout
    restored = tmp_path / "restored.safetensors"
    assert cli("decode", str(packed), "--out", str(restored)).returncode == 0
    evaluated = run_cli("evaluate", str(restored))
    assert float(re.search(r"test top-1 accuracy: ([0-9.]+)", evaluated.stdout).group(1)) == printed
    assert (tmp_path / "encode.md").is_file() and (tmp_path / "distributions.png").is_file()
    assert (tmp_path / "distributions.png").read_bytes()[:4] == b"\x89PNG"


def test_the_stage_commands_run_without_data(cli, tiny_checkpoint, tmp_path):
    """`--data none`: prune and share without retraining, and encode a checkpoint as it is, the
    same tensors as with data (LeNet has no BatchNorm to fold; the data adds its input shape
    to the header), measuring nothing; lowrank, which measures and fine-tunes, says it needs data."""
    import torch

    from deepshrink.compressed import read_state_dict

    pruned, shared = tmp_path / "pruned.safetensors", tmp_path / "shared.safetensors"
    none = ("--data", "none")
    done = cli("prune", str(tiny_checkpoint), "--sparsity", "fc*=0.9", "--out", str(pruned), *none)
    assert done.returncode == 0 and "nothing was measured: no data (--data none)" in done.stdout, done.stderr
    assert cli("quantize", str(pruned), "--bits", "*=4", "--out", str(shared), *none).returncode == 0
    alone = cli("encode", str(shared), "--out", str(tmp_path / "alone.dcz"), "--report-dir", str(tmp_path), *none)
    assert alone.returncode == 0 and "nothing was measured" in alone.stdout, alone.stderr
    assert cli("encode", str(shared), "--out", str(tmp_path / "measured.dcz")).returncode == 0
    (alone_state, alone_metadata), (measured_state, measured_metadata) = (
        read_state_dict(tmp_path / name) for name in ("alone.dcz", "measured.dcz")
    )
    assert alone_state.keys() == measured_state.keys()
    assert all(torch.equal(alone_state[key], measured_state[key]) for key in alone_state)
    assert "input_shape" not in alone_metadata and measured_metadata["input_shape"] == [1, 28, 28]
    refused = cli("lowrank", str(tiny_checkpoint), "--out", str(tmp_path / "factored.safetensors"), *none)
    assert refused.returncode == 3 and "it needs data" in refused.stderr


def test_sensitivity_of_data_without_targets_measures_agreement_and_evaluate_names_what_is_missing(
    cli, tiny_checkpoint, tmp_path
):
    """Inputs alone: sensitivity measures each pruned layer against the original's own outputs
    (the baseline agrees fully), as run and prune do, where both commands failed with advice
    for the Python API; evaluate, which has nothing to score against, says so and what runs."""
    import json

    import numpy as np

    images = np.random.default_rng(0).normal(size=(400, 1, 28, 28)).astype(np.float32)
    np.savez(tmp_path / "unlabelled.npz", x=images)
    data = ("--data", str(tmp_path / "unlabelled.npz"))
    measured = cli("sensitivity", str(tiny_checkpoint), *data, "--out-dir", str(tmp_path / "s"))
    assert measured.returncode == 0, measured.stderr
    assert "measured against the original model's own outputs" in measured.stdout
    curves = json.loads((tmp_path / "s" / "sensitivity.json").read_text())
    assert curves["baseline"] == 1.0
    refused = cli("evaluate", str(tiny_checkpoint), *data)
    assert refused.returncode == 4 and "unlabelled has no targets (no y)" in refused.stderr


COLOUR_NETWORK = """
from torch import nn

def colour():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
"""


def test_a_stage_command_names_data_the_model_cannot_run_on(cli, tmp_path, monkeypatch):
    """A user's model of colour images, given the default grey images (no --data): the stage
    commands and sensitivity say the model cannot run on the data, where they crashed inside
    their first evaluation as an internal error."""
    import torch

    import deepshrink

    (tmp_path / "colours.py").write_text(COLOUR_NETWORK)
    monkeypatch.syspath_prepend(str(tmp_path))
    from colours import colour  # noqa: PLC0415 - written by this test

    model = colour()
    model(torch.zeros(1, 3, 28, 28))  # sizes the lazy layer
    checkpoint = deepshrink.save_checkpoint(tmp_path / "colour.safetensors", model, model_name="colours:colour")
    arguments = ("--model", "colours:colour", "--out")
    for command in (
        ("prune", str(checkpoint), "--sparsity", "*=0.5", *arguments, str(tmp_path / "p.safetensors")),
        ("encode", str(checkpoint), *arguments, str(tmp_path / "c.dcz")),
        ("sensitivity", str(checkpoint), "--model", "colours:colour", "--out-dir", str(tmp_path / "s")),
    ):
        result = cli(*command)
        assert result.returncode == 7, (command[0], result.stderr)  # a ModelError
        assert "the model cannot run on the data" in result.stderr and "internal error" not in result.stderr


def test_inspecting_a_file_that_is_not_dcz_is_a_clean_error(cli, tiny_checkpoint):
    result = cli("inspect", str(tiny_checkpoint))
    assert result.returncode == 5 and "not a .dcz file" in result.stderr and "Traceback" not in result.stderr


def test_lowrank_writes_a_factored_checkpoint_that_evaluates_as_printed(cli, tiny_checkpoint, tmp_path):
    out = tmp_path / "factored.safetensors"
    result = cli(
        "lowrank",
        str(tiny_checkpoint),
        "--budget",
        "0.4",
        "--finetune-epochs",
        "1",
        "--train-subset",
        "2000",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"^fc1\s+300\s+\d+\s+235,200\s+[\d,]+$", result.stdout, re.M)
    printed = float(re.search(r"before, ([0-9.]+) after", result.stdout).group(1))
    evaluated = run_cli("evaluate", str(out))
    assert float(re.search(r"test top-1 accuracy: ([0-9.]+)", evaluated.stdout).group(1)) == printed
    again = cli("lowrank", str(out), "--out", str(tmp_path / "twice.safetensors"))
    assert again.returncode == 3 and "already factored" in again.stderr


def test_relaxed_lowrank_keeps_the_candidate_with_the_highest_validation_accuracy(cli, tiny_checkpoint, tmp_path):
    from deepshrink.checkpoint import load_checkpoint

    out = tmp_path / "relaxed.safetensors"
    result = cli(
        "lowrank",
        str(tiny_checkpoint),
        "--method",
        "relaxed",
        "--budget",
        "0.5",
        "--selection-epochs",
        "1",
        "--selection-seeds",
        "2",
        "--finetune-epochs",
        "0",
        "--train-subset",
        "2000",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    log = load_checkpoint(out).metadata["result"]["log"]
    names = {entry["candidate"] for entry in log["candidates"]}
    assert {"POS", "CPTV"} <= names and any(name.startswith("relaxation step") for name in names)
    assert all(len(entry["metric_per_seed"]) == 2 for entry in log["candidates"])
    best = min(log["candidates"], key=lambda entry: (-entry["metric"], entry["loss"]))
    assert log["ranks"] == best["ranks"]
    assert log["mac_fraction"] <= 0.5


def test_relaxed_lowrank_takes_the_projection(cli, tiny_checkpoint, tmp_path):
    """--projection both: the roundings of both descents compete; 0 selection epochs scores them on the loss."""
    from deepshrink.checkpoint import load_checkpoint

    out = tmp_path / "both.safetensors"
    result = cli(
        "lowrank",
        str(tiny_checkpoint),
        "--method",
        "relaxed",
        "--projection",
        "both",
        "--selection-epochs",
        "0",
        "--finetune-epochs",
        "0",
        "--train-subset",
        "2000",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    log = load_checkpoint(out).metadata["result"]["log"]
    names = [entry["candidate"] for entry in log["candidates"]]
    assert any(name.startswith("relaxation (cost metric) step") for name in names)
    assert any(name.startswith("relaxation step") for name in names)
    assert log["ranks"] == min(log["candidates"], key=lambda entry: entry["loss"])["ranks"]
    bad = cli("lowrank", str(tiny_checkpoint), "--method", "relaxed", "--projection", "l2", "--out", str(out))
    assert bad.returncode != 0 and "invalid choice: 'l2'" in bad.stderr
    none = cli("lowrank", str(tiny_checkpoint), "--method", "relaxed", "--selection-seeds", "0", "--out", str(out))
    assert none.returncode != 0 and "selection_seeds=0" in none.stderr and "Traceback" not in none.stderr
