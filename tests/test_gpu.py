"""The whole pipeline with --device cuda (issue 21, point 4): skipped where torch sees no GPU.

CI has no GPU, so these run only on a machine with one (`make test` there, or the device check
in benchmarks/gpu_pipeline.py). What they hold: a recipe that prunes with retraining, shares
weights with centroid fine-tuning and distils runs on the GPU and gives a valid file whose
pruned weights are exactly zero, whose layers hold at most 2^bits values, and whose accuracy
is within a bound of the same recipe on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from deepshrink.compressed import load_compressed, read_state_dict
from deepshrink.data import make_loader
from deepshrink.models import build_model
from deepshrink.pipeline import run
from deepshrink.recipe import parse_recipe
from deepshrink.train import TrainConfig, evaluate, fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

RECIPE = """\
model: lenet-300-100
prune:
  sparsity: {fc1: 0.9, fc2: 0.8, fc3: 0.5}
  rounds: 1
  retrain_epochs: 1
  distill: {temperature: 4.0, alpha: 0.5}
quantize:
  bits: {"fc*": 5}
  finetune_epochs: 1
encode:
  index_bits: {"fc*": 5}
"""


@pytest.fixture(scope="module")
def reference(small_data):
    torch.manual_seed(0)
    model = build_model("lenet-300-100")
    fit(model, make_loader(small_data.train, 128, shuffle=True, seed=0), TrainConfig(epochs=1), progress=False)
    return model


def test_the_pipeline_runs_on_the_gpu_and_matches_the_cpu(reference, small_data, tmp_path):
    recipe = parse_recipe(RECIPE)
    on_gpu = run(reference, recipe, small_data, run_dir=tmp_path / "cuda", device="cuda", progress=False)
    on_cpu = run(reference, recipe, small_data, run_dir=tmp_path / "cpu", device="cpu", progress=False)
    # The caller's model stays where it was.
    assert all(parameter.device.type == "cpu" for parameter in reference.parameters())
    state, _ = read_state_dict(on_gpu.path)
    for layer, kept in (("fc1", 0.1), ("fc2", 0.2), ("fc3", 0.5)):
        weight = state[f"{layer}.weight"]
        assert abs((weight != 0).float().mean().item() - kept) < 0.01
        assert torch.unique(weight).numel() <= 32
    test = make_loader(small_data.test, 1000, shuffle=False)
    metrics = [evaluate(load_compressed(result.path)[0], test).metric for result in (on_gpu, on_cpu)]
    # GPU kernels sum in another order and shuffle with their own generator: a bound, not equality.
    assert abs(metrics[0] - metrics[1]) < 0.03
    assert on_gpu.file_bytes == pytest.approx(on_cpu.file_bytes, rel=0.05)
