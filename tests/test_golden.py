"""The same model, data and seed give the same file, whichever way the stages are reached.

- Running the stages one by one from the command line (prune, quantize, encode) writes the
  same encoded buffers, byte for byte, as the shipped `quick` recipe run by `deepshrink.run`:
  both go through `run_stage`.
- The `quick` recipe writes the bytes recorded below, on the kind of CPU they were recorded on
  (floating-point results depend on the instruction set torch and numba use, so another CPU
  has other bytes; there the test says so and skips). Recorded before the stages were joined
  into one shape (issue "One shape for every stage"), after the centroid gradient was made
  deterministic; any change to these bytes is a change of behaviour and must be deliberate.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import hostile
import pytest
import torch

import deepshrink
from deepshrink.checkpoint import save_checkpoint
from deepshrink.compressed import read_state_dict
from deepshrink.encode import container
from deepshrink.models import build_model

# sha256 of the .dcz the quick recipe writes, per CPU kind (model name, AVX-512 or not) and torch.
# Changed on purpose three times since first recorded (497dcf7d / 9bd2e1ab), each time compared
# buffer by buffer on this machine: the prune settings gained `crate` (DNS's threshold, split from
# `quality`: 3a1dec45 / ef25cd6d; every buffer identical); the metadata gained the task and the
# input shape, and the stage key covers the task and the BatchNorm policy (412622dc / 66f0f3d5;
# every buffer identical); format 2.1 stores biases as zstd byte planes where that is smaller
# (every weight-shared buffer identical; fc1/fc2 biases of LeNet-300-100 and fc1's of LeNet-5 zstd).
# Format 2.3 deflates the header against a preset dictionary, which changes only the framing: these
# hashes are of the file framed as 2.2 wrote it (`as_format_2_2`), every byte of content the same;
# so does format 2.7's buffer table of lengths, which `as_format_2_2` turns back into 2.2's.
GOLDEN = {
    ("AMD EPYC", True, "2.13.0+cpu"): {
        "lenet-300-100": "00e460d51d26cdffc2f31905ced164e684e60099ab886562d6d49590de532153",
        "lenet-5": "1b5bbcb2383b9ab28379d23d2fe2561012be98389b2b51df8b6931a6bc5b7fa2",
    },
}


def cpu_kind() -> tuple[str, bool, str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    return (name.group(1).strip() if name else "unknown", "avx512f" in text.split(), torch.__version__)


def as_format_2_2(data: bytes) -> bytes:
    """The same file framed as format 2.2 wrote it: the header deflated without the preset
    dictionary, its buffer table of offsets and checksums (2.7 made it lengths and one checksum),
    minor version 1 (no record here uses 2.2's `ans` coder), the buffers as they are."""
    header, data_start = container.parse_header(data)
    assert all(record.get("coder") != "ans" for record in header["tensors"])
    header = hostile.legacy_header(header, data[data_start:])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return hostile.frame_json(text, data[data_start:], major=2, minor=1)


def trained(name: str, data) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name)
    loader = deepshrink.make_loader(data.train, 128, shuffle=True, seed=0)
    deepshrink.fit(model, loader, deepshrink.TrainConfig(epochs=1, seed=0), progress=False)
    return model


@pytest.mark.parametrize("name", ["lenet-300-100", "lenet-5"])
def test_quick_recipe_writes_the_recorded_bytes(name, small_data, tmp_path):
    expected = GOLDEN.get(cpu_kind())
    if expected is None:
        pytest.skip(f"no golden bytes recorded for {cpu_kind()}; record them with this test's code")
    result = deepshrink.run(
        trained(name, small_data), "quick", small_data, run_dir=tmp_path, model_name=name, progress=False
    )
    assert hashlib.sha256(as_format_2_2(result.path.read_bytes())).hexdigest() == expected[name]


def test_stage_commands_write_the_pipelines_bytes(small_data, tmp_path, cli):
    model = trained("lenet-300-100", small_data)
    reference = save_checkpoint(tmp_path / "reference.safetensors", model, model_name="lenet-300-100")
    piped = deepshrink.run(model, "quick", small_data, run_dir=tmp_path / "run", progress=False).path

    def stage(*arguments, retrains=True):
        subset = ["--train-subset", "5000"] if retrains else ["--no-evaluate"]
        done = cli(*arguments, *subset)
        assert done.returncode == 0, done.stderr

    pruned, shared, encoded = (tmp_path / name for name in ("pruned.safetensors", "shared.safetensors", "cli.dcz"))
    stage(
        "prune", str(reference), "--out", str(pruned), "--sparsity", "*=0.9", "--rounds", "2", "--retrain-epochs", "1"
    )
    stage("quantize", str(pruned), "--out", str(shared), "--bits", "*=5", "--finetune-epochs", "1")
    stage("encode", str(shared), "--out", str(encoded), "--index-bits", "*=5", retrains=False)
    assert container.read(encoded).buffers == container.read(piped).buffers
    ours, theirs = read_state_dict(encoded)[0], read_state_dict(piped)[0]
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
