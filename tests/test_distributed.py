"""Retraining on several processes: torchrun with gloo on the CPU, against one process.

The processes must agree on every stage's state (masks, codes, codebooks) and on the file's
bytes, write nothing but rank 0's run directory, and reach the single-process result's quality.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as torch_distributed
import torch.multiprocessing as multiprocessing

from deepshrink.checkpoint import save_checkpoint
from deepshrink.compressed import load_compressed, read_state_dict
from deepshrink.data import make_loader
from deepshrink.errors import ConfigError
from deepshrink.models import build_model
from deepshrink.pipeline import run
from deepshrink.recipe import parse_recipe
from deepshrink.train import TrainConfig, evaluate, fit

RECIPE = """\
model: lenet-300-100
data: {train_subset: 3000, test_subset: 2000}
prune:
  sparsity: {fc1: 0.9, fc2: 0.8, fc3: 0.5}
  rounds: 1
  retrain_epochs: 2
quantize:
  bits: {"fc*": 5}
  finetune_epochs: 1
encode:
  index_bits: {"fc*": 5}
"""


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory):
    """LeNet-300-100 after one epoch on 5,000 images, and its checkpoint."""
    model = build_model("lenet-300-100")
    fit(model, make_loader(small_data.train, 128, shuffle=True), TrainConfig(epochs=1), progress=False)
    path = tmp_path_factory.mktemp("reference") / "reference.safetensors"
    return model, save_checkpoint(path, model, model_name="lenet-300-100")


def torchrun(*arguments: str, env: dict) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.run(
        [*command, "-m", "deepshrink", "--quiet", *arguments], capture_output=True, text=True, env=env, timeout=600
    )


def test_two_processes_agree_and_match_one_process(reference, small_data, tmp_path):
    model, checkpoint = reference
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    private = tmp_path / "temporary"  # where the other rank writes its own copy of the file
    private.mkdir()
    env = os.environ | {"TMPDIR": str(private), "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "two"
    done = torchrun("run", str(recipe), "--checkpoint", str(checkpoint), "--run-dir", str(run_dir), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("decoded from the file") == 1, "only rank 0 reports"

    report = json.loads((run_dir / "report.json").read_text())
    assert report["processes"] == 2
    # Each stage's state was the same on both ranks without a broadcast: the computations agree.
    assert all("processes" not in stage["log"] for stage in report["stages"])
    assert "retrained on 2 processes" in (run_dir / "report.md").read_text()
    # Only rank 0 wrote: one checkpoint and result per stage, one file, and no leftovers.
    written = sorted(path.name.split("-")[0] for path in (run_dir / "stages").iterdir())
    assert written == ["prune", "prune", "quantize", "quantize"]
    assert not [path for path in private.iterdir() if path.name.startswith("deepshrink")]

    # The file is valid and holds what the recipe asked for.
    dcz = run_dir / "lenet-300-100.dcz"
    state, _ = read_state_dict(dcz)
    assert abs((state["fc1.weight"] != 0).float().mean().item() - 0.1) < 0.002
    for layer in ("fc1", "fc2", "fc3"):
        assert torch.unique(state[f"{layer}.weight"]).numel() <= 32
    # The metric summed over the ranks' shards is the whole test subset's.
    decoded, _ = load_compressed(dcz)
    subset = torch.utils.data.TensorDataset(*(tensor[:2000] for tensor in small_data.test.tensors))
    accuracy = evaluate(decoded, make_loader(subset, 1000, shuffle=False)).metric
    assert report["compressed_metric"] == accuracy

    # One process, the same recipe: the two retrain on other shuffles, so they differ a little.
    alone = run(model, parse_recipe(RECIPE), small_data, run_dir=tmp_path / "one", device="cpu", progress=False)
    assert abs(alone.compressed_metric - accuracy) < 0.03, (alone.compressed_metric, accuracy)
    assert abs(alone.file_bytes - dcz.stat().st_size) < 0.05 * alone.file_bytes

    # A rerun finds every stage in the cache on both ranks and writes the same bytes.
    before = dcz.read_bytes()
    again = torchrun("run", str(recipe), "--checkpoint", str(checkpoint), "--run-dir", str(run_dir), env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    stages = json.loads((run_dir / "report.json").read_text())["stages"]
    assert [stage["cached"] for stage in stages if stage["name"] != "encode"] == [True, True]
    assert dcz.read_bytes() == before


def test_other_commands_refuse_several_processes(tmp_path, monkeypatch, capsys):
    from deepshrink.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["inspect", str(tmp_path / "missing.dcz")]) == ConfigError.exit_code
    assert "only `deepshrink run RECIPE` retrains under torchrun" in capsys.readouterr().err


def _helpers_on_two_ranks(rank: int, address: str, results) -> None:
    from deepshrink import distributed

    torch_distributed.init_process_group("gloo", init_method=address, rank=rank, world_size=2)
    try:
        dataset = torch.utils.data.TensorDataset(torch.arange(11.0), torch.arange(11))
        shuffled = [int(index) for _, batch in make_loader(dataset, 4, shuffle=True, seed=3) for index in batch]
        ordered = [int(index) for _, batch in make_loader(dataset, 4, shuffle=False) for index in batch]
        torch.manual_seed(rank)
        model = torch.nn.Linear(3, 2)
        agreed_first = distributed.synchronize(model, "the test model")  # the ranks' inits differ
        model.weight.data += 1.0
        agreed_second = distributed.synchronize(model, "the test model")  # now they are the same
        results[rank] = {
            "shuffled": shuffled,
            "ordered": ordered,
            "batch": len(next(iter(make_loader(dataset, 4, shuffle=True)))[0]),
            "synchronized": (agreed_first, agreed_second),
            "weight": model.weight.detach().clone(),
            "all_ranks": distributed.all_ranks(rank == 0),
            "sum": distributed.sum_values_over_ranks([rank + 1.0])[0],
        }
    finally:
        torch_distributed.destroy_process_group()


def test_shards_synchronization_and_agreement_on_two_ranks(tmp_path):
    with multiprocessing.Manager() as manager:
        results = manager.dict()
        address = f"file://{tmp_path / 'rendezvous'}"
        multiprocessing.spawn(_helpers_on_two_ranks, args=(address, results), nprocs=2)
        first, second = results[0], results[1]
    # Training shards: disjoint, together every example (padded by repeats to equal lengths).
    assert set(first["shuffled"]) | set(second["shuffled"]) == set(range(11))
    assert len(first["shuffled"]) == len(second["shuffled"]) == 6
    # Evaluation shards: each example exactly once over both ranks.
    assert sorted(first["ordered"] + second["ordered"]) == list(range(11))
    assert first["batch"] == second["batch"] == 2  # the global batch of 4, shared
    assert first["synchronized"] == second["synchronized"] == (True, False)
    assert torch.equal(first["weight"], second["weight"])
    assert first["all_ranks"] is second["all_ranks"] is False
    assert first["sum"] == second["sum"] == 3.0
