"""The whole pipeline on real data: recipe -> stages -> .dcz file -> report, and resuming."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepshrink import stages
from deepshrink.checkpoint import save_checkpoint
from deepshrink.compressed import load_compressed, read_state_dict
from deepshrink.data import make_loader
from deepshrink.errors import ConfigError, ModelError
from deepshrink.models import build_model
from deepshrink.pipeline import run
from deepshrink.recipe import parse_recipe
from deepshrink.train import TrainConfig, evaluate, fit

SMALL_RECIPE = """\
model: lenet-300-100
data: {test_subset: 2000}
prune:
  sparsity: {fc1: 0.9, fc2: 0.8, fc3: 0.5}
  rounds: 1
  retrain_epochs: 1
quantize:
  bits: {"fc*": 5}
  finetune_epochs: 1
encode:
  index_bits: {"fc*": 5}
tradeoff:
  sparsities: [0.9]
  bits: [4]
  retrain_epochs: 0
"""


def run_cli(*arguments: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deepshrink", "--quiet", *arguments],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def trained(small_data):
    """LeNet-300-100 after one epoch on 5,000 images: a real, if weak, reference."""
    model = build_model("lenet-300-100")
    fit(model, make_loader(small_data.train, 128, shuffle=True), TrainConfig(epochs=1), progress=False)
    return model


@pytest.fixture(scope="module")
def trained_checkpoint(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("reference") / "reference.safetensors"
    return save_checkpoint(path, trained, model_name="lenet-300-100")


def test_small_recipe_runs_end_to_end_through_the_cli(trained_checkpoint, tmp_path):
    recipe = tmp_path / "small.yaml"
    recipe.write_text(SMALL_RECIPE.replace("data: {", "data: {train_subset: 3000, "))
    run_dir = tmp_path / "run"
    result = run_cli("run", str(recipe), "--checkpoint", str(trained_checkpoint), "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    dcz = run_dir / "lenet-300-100.dcz"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["file_bytes"] == dcz.stat().st_size
    for figure in ("figure4-codebook.png", "figure5-distributions.png", "figure6-tradeoff.png"):
        assert (run_dir / figure).read_bytes()[:4] == b"\x89PNG"
    markdown = (run_dir / "report.md").read_text()
    assert "## Table 1" in markdown and "lenet-300-100 (paper, MNIST)" in markdown and "ip1" in markdown
    # The printed and reported accuracy is that of the model decoded from the file.
    decoded, _ = load_compressed(dcz)
    subset = torch.utils.data.TensorDataset(*(tensor[:2000] for tensor in _test_tensors()))
    accuracy = evaluate(decoded, make_loader(subset, 1000, shuffle=False)).metric
    assert report["compressed_metric"] == accuracy
    printed = re.search(r"([0-9.]+)% decoded from the file", result.stdout).group(1)
    assert printed == f"{100 * accuracy:.2f}"
    # The file holds what the recipe asked for: pruned weights zero, at most 2^5 values per layer.
    state, _ = read_state_dict(dcz)
    assert abs((state["fc1.weight"] != 0).float().mean().item() - 0.1) < 0.002
    for layer in ("fc1", "fc2", "fc3"):
        assert torch.unique(state[f"{layer}.weight"]).numel() <= 32


def _test_tensors():
    from deepshrink.data import load_data

    return load_data().test.tensors


def test_resume_skips_finished_stages_and_redoes_changed_ones(trained, small_data, tmp_path):
    recipe = parse_recipe(
        SMALL_RECIPE.replace("tradeoff:\n  sparsities: [0.9]\n  bits: [4]\n  retrain_epochs: 0\n", "")
    )
    first = run(trained, recipe, small_data, run_dir=tmp_path, progress=False)
    assert [(stage.name, stage.cached) for stage in first.stages] == [
        ("prune", False),
        ("quantize", False),
        ("encode", False),
    ]
    files = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*.safetensors")}
    file_bytes = first.path.read_bytes()
    again = run(trained, recipe, small_data, run_dir=tmp_path, progress=False)
    assert all(stage.cached for stage in again.stages)
    assert {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*.safetensors")} == files
    assert again.path.read_bytes() == file_bytes
    assert again.compressed_metric == first.compressed_metric
    changed = parse_recipe(SMALL_RECIPE.replace('bits: {"fc*": 5}', 'bits: {"fc*": 4}').split("tradeoff:")[0])
    third = run(trained, changed, small_data, run_dir=tmp_path, progress=False)
    assert [(stage.name, stage.cached) for stage in third.stages] == [
        ("prune", True),
        ("quantize", False),
        ("encode", False),
    ]
    state, _ = read_state_dict(third.path)
    assert torch.unique(state["fc1.weight"]).numel() <= 16
    # The caller's model is never modified.
    assert not any(hasattr(module, "parametrizations") for module in trained.modules())


def test_an_interrupted_run_leaves_no_partial_file_and_resumes(trained, small_data, tmp_path, monkeypatch):
    recipe = parse_recipe(SMALL_RECIPE.split("tradeoff:")[0])

    def interrupted(*arguments, **keywords):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        from dataclasses import replace

        from deepshrink.stages import base

        patch.setitem(base._REGISTRY, "quantize", replace(stages.stage_named("quantize"), handler=interrupted))
        with pytest.raises(KeyboardInterrupt):
            run(trained, recipe, small_data, run_dir=tmp_path, progress=False)
    assert not list(tmp_path.rglob("*.partial"))
    finished = sorted(path.name.partition(".")[2] for path in tmp_path.glob("stages/prune-*"))
    assert finished == ["result.safetensors", "safetensors"]  # the pruned checkpoint and its result
    assert not list(tmp_path.glob("*.dcz"))
    resumed = run(trained, recipe, small_data, run_dir=tmp_path, progress=False)
    assert [(stage.name, stage.cached) for stage in resumed.stages][:2] == [("prune", True), ("quantize", False)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: lenet-300-100\nprune:\n  sparsity: {fc9: 0.9}\n", "recipe.yaml:3: prune.sparsity pattern 'fc9'"),
        ("model: lenet-300-100\nquantize:\n  bitz: 5\n", "recipe.yaml:3: unknown key 'bitz'"),
        ("prune: {global_sparsity: 0.9}\n", "names no model"),
    ],
)
def test_bad_recipes_are_clean_cli_errors_before_any_work(cli, trained_checkpoint, tmp_path, text, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    result = cli("run", str(recipe), "--checkpoint", str(trained_checkpoint), "--run-dir", str(tmp_path / "r"))
    assert result.returncode == 3, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


def test_compress_refuses_what_it_cannot_use(trained, small_data, tmp_path):
    with pytest.raises(ModelError, match="no layer deepshrink compresses"):
        run(torch.nn.ReLU(), {"model": "x"}, small_data, run_dir=tmp_path)
    with pytest.raises(ConfigError, match="DataSplits"):
        run(trained, {"model": "lenet-300-100"}, [1, 2], run_dir=tmp_path)


def run_readme_example(first_line: str, tmp_path, monkeypatch):
    """The README's Python block that starts with `first_line`, run as printed there in
    `tmp_path`; its `result`."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(rf"```python\n({re.escape(first_line)}.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    return namespace["result"]


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's bring-your-own-model example, exactly as printed there."""
    result = run_readme_example("# Bring your own model", tmp_path, monkeypatch)
    assert result.path.is_file() and result.ratio > 10
    assert result.compressed_metric > 0.6


def test_readme_example_that_is_not_an_image_classifier_runs(tmp_path, monkeypatch):
    """The README's multi-label signal example with BatchNorm, exactly as printed there: 5x
    smaller at 80% pruned and 5 bits (a small model: its biases are a large share), within 1%."""
    result = run_readme_example("# A model that is not an image classifier", tmp_path, monkeypatch)
    assert result.task == "multilabel" and result.metric_name == "label accuracy"
    assert result.ratio > 5 and result.reference_metric > 0.95
    assert result.compressed_metric >= 0.99 * result.reference_metric


def test_readme_cli_example_runs(tmp_path):
    """The README's command-line example with a user factory, a checkpoint and a data directory."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"```sh\n(# Bring your own model.*?)```", readme, re.S).group(1)
    package = tmp_path / "mynets.py"
    package.write_text(re.search(r"```python\n(# mynets\.py\n.*?)```", readme, re.S).group(1))
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    script = block.replace(".venv/bin/deepshrink", f"{sys.executable} -m deepshrink --quiet")
    result = subprocess.run(["bash", "-ec", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "decoded from the file" in result.stdout


def test_a_low_rank_stage_composes_with_the_others_and_resumes(trained, small_data, tmp_path):
    from deepshrink.compressed import load_compressed as load_file
    from deepshrink.runtime.load import load_runtime

    text = SMALL_RECIPE.split("tradeoff:")[0].replace(
        "prune:", "lowrank: {budget: 0.4, finetune_epochs: 1, distill: {}}\nprune:"
    )
    text = text.replace("fc1: 0.9, fc2: 0.8, fc3: 0.5", "'fc1*': 0.8, fc3: 0.5")
    recipe = parse_recipe(text)
    first = run(trained, recipe, small_data, run_dir=tmp_path, progress=False)
    ranks = first.stages[0].result.log["ranks"]
    assert first.stages[0].name == "lowrank" and first.stages[0].result.log["mac_fraction"] <= 0.4
    again = run(trained, recipe, small_data, run_dir=tmp_path, progress=False)
    assert all(stage.cached for stage in again.stages)
    assert again.compressed_metric == first.compressed_metric
    # The file rebuilds the factored architecture by itself, dense or run compressed.
    decoded, _ = load_file(first.path)
    assert isinstance(decoded.fc1, torch.nn.Sequential) and decoded.fc1[0].out_features == ranks["fc1"]
    inputs = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        expected = decoded(inputs)
        assert torch.allclose(load_runtime(first.path)(inputs), expected, atol=1e-5 * expected.abs().max())


def _spy_on_select_relaxed(monkeypatch) -> dict:
    """Replace select_relaxed by CPTV's choice; the returned dict fills with the selection it got."""
    from deepshrink import lowrank
    from deepshrink.lowrank import relaxed

    seen: dict = {}

    def spy(model, spectra, budget, loader, options, **keywords):
        seen.update(vars(options.selection))
        return lowrank.select_cptv(spectra, budget)

    monkeypatch.setattr(relaxed, "select_relaxed", spy)
    return seen


@pytest.mark.parametrize(("selection_epochs", "expected"), [(None, 2), (1, 1), (0, None)])
def test_relaxed_lowrank_stage_scores_candidates_after_the_final_schedule(
    monkeypatch, small_data, selection_epochs, expected
):
    """By default each candidate is fine-tuned as long as the final fine-tuning, at its batch size;
    0 selection epochs means scoring on the training loss, without a validation loader."""
    from deepshrink.recipe import LowrankSettings

    seen = _spy_on_select_relaxed(monkeypatch)
    settings = LowrankSettings(
        method="relaxed",
        budget=0.5,
        finetune_epochs=2,
        selection_epochs=selection_epochs,
        selection_seeds=3,
        batch_size=64,
    )
    loaders = stages.Loaders.from_splits(small_data)
    result = stages.factorize_lowrank(build_model("lenet-300-100"), settings, loaders, progress=False)
    assert result.log["mac_fraction"] <= 0.5
    if expected is None:
        assert seen["validation"] is None and seen["finetune"] is None
    else:
        assert seen["validation"] is loaders.validation
        assert seen["finetune"].epochs == expected
        # The stage's seed is 0; the selection's shuffles are the next ones, not the final fine-tuning's.
        assert list(seen["seeds"]) == [1, 2, 3]
        # One loader per seed, at the final fine-tuning's batch size, each seed its own shuffle.
        first, second = (next(iter(seen["loaders"](seed)))[1] for seed in (1, 2))
        assert len(first) == 64 and not torch.equal(first, second)
        assert torch.equal(first, next(iter(seen["loaders"](1)))[1])
        assert seen["criterion"] is None


def test_relaxed_lowrank_stage_scores_candidates_with_the_final_loss(monkeypatch, small_data):
    """With distillation, the candidates are fine-tuned against the same teacher as the winner."""
    from deepshrink.distill import DistillationLoss
    from deepshrink.recipe import DistillSettings, LowrankSettings

    seen = _spy_on_select_relaxed(monkeypatch)
    settings = LowrankSettings(
        method="relaxed", budget=0.5, finetune_epochs=1, distill=DistillSettings(temperature=3.0, alpha=0.25)
    )
    stages.factorize_lowrank(
        build_model("lenet-300-100"), settings, stages.Loaders.from_splits(small_data), progress=False
    )
    criterion = seen["criterion"]
    assert isinstance(criterion, DistillationLoss)
    assert (criterion.temperature, criterion.alpha) == (3.0, 0.25)


def test_readme_example_of_a_model_with_two_inputs_runs(tmp_path, monkeypatch):
    """The README's transformer encoder with an attention mask, exactly as printed there."""
    result = run_readme_example("# A model that takes token ids and an attention mask", tmp_path, monkeypatch)
    assert result.reference_metric > 0.9 and result.ratio > 4
    assert result.compressed_metric >= result.reference_metric - 0.03
