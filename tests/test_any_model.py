"""Models that are not the paper's: BatchNorm folded exactly, a BatchNorm network compressed
within a bound of its metric (where retraining BatchNorm in train mode is not), data from array
files of any shape with or without targets, end to end from the command line."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from synthetic import tone_signals, trained_tone_network
from torch import nn

import deepshrink
from deepshrink.batchnorm import FOLDED_KEY, fold_batchnorm, foldable_pairs
from deepshrink.compressed import read_state_dict
from deepshrink.errors import ConfigError, DataError, FormatError
from deepshrink.prune.module import apply_masks


def with_statistics(model: nn.Module, inputs: torch.Tensor) -> nn.Module:
    """`model` with BatchNorm statistics and scales that are not the identity's."""
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            nn.init.uniform_(module.weight, 0.5, 2.0)
            nn.init.uniform_(module.bias, -0.5, 0.5)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(inputs)
    return model.eval()


class Branching(nn.Module):
    """A BatchNorm whose layer's output is also used elsewhere: it must not be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, inputs):
        features = self.conv(inputs)
        return self.head((self.norm(features) + features).mean(dim=(2, 3)))


class Untraceable(nn.Module):
    """Control flow on values: torch.fx cannot trace it, so the nn.Sequential rule applies."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, inputs):
        if inputs.sum() > 0:
            return self.body(inputs)
        return self.body(-inputs)


@pytest.mark.parametrize(
    ("model", "shape", "folded"),
    [
        (nn.Sequential(nn.Conv1d(2, 5, 3), nn.BatchNorm1d(5), nn.ReLU()), (6, 2, 20), 1),
        (nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten()), (6, 3, 8, 8), 1),
        (nn.Sequential(nn.Linear(7, 9), nn.BatchNorm1d(9), nn.Linear(9, 2), nn.BatchNorm1d(2)), (6, 7), 2),
        (nn.Sequential(nn.Conv3d(1, 2, 2), nn.BatchNorm3d(2)), (4, 1, 4, 4, 4), 1),
        (Branching(), (6, 3, 5, 5), 0),
        (Untraceable(), (6, 6), 1),
    ],
)
def test_folding_keeps_the_outputs(model, shape, folded):
    inputs = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    model = with_statistics(model, inputs)
    with torch.no_grad():
        before = model(inputs)
        pairs = fold_batchnorm(model)
        after = model(inputs)
    assert len(pairs) == folded
    assert torch.allclose(after, before, atol=1e-5, rtol=1e-5)
    remaining = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    assert len(remaining) == (1 if isinstance(model, Branching) else 0)


def test_folding_a_pruned_layer_keeps_its_zeros():
    model = with_statistics(nn.Sequential(nn.Linear(10, 6), nn.BatchNorm1d(6)), torch.randn(8, 10))
    mask = torch.rand(6, 10, generator=torch.Generator().manual_seed(0)) < 0.5
    apply_masks(model, {"0": mask})
    inputs = torch.randn(5, 10)
    with torch.no_grad():
        before = model(inputs)
        fold_batchnorm(model)
        after = model(inputs)
    assert torch.allclose(after, before, atol=1e-5)
    assert bool((model[0].weight[~mask] == 0).all())


def test_a_file_of_a_folded_model_loads_into_the_unfolded_module(tmp_path):
    inputs = torch.randn(6, 2, 20)
    original = with_statistics(nn.Sequential(nn.Conv1d(2, 5, 3), nn.BatchNorm1d(5), nn.ReLU()), inputs)
    folded = copy.deepcopy(original)
    pairs = fold_batchnorm(folded)
    path = deepshrink.save_compressed(folded, tmp_path / "folded.dcz", model_name="mine", metadata={FOLDED_KEY: pairs})
    loaded, _ = deepshrink.load_compressed(path, copy.deepcopy(original))
    assert isinstance(loaded[1], nn.Identity)
    with torch.no_grad():
        assert torch.allclose(loaded(inputs), original(inputs), atol=1e-5)


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tones")
    signals, labels = tone_signals(3000, seed=0)
    test_signals, test_labels = tone_signals(1000, seed=1)
    path = directory / "tones.npz"
    np.savez(path, x=signals, y=labels, x_test=test_signals, y_test=test_labels)
    return path, trained_tone_network(signals, labels, epochs=4)


def test_a_batchnorm_network_keeps_its_metric_where_train_mode_retraining_does_not(tones, tmp_path):
    path, model = tones
    data = deepshrink.load_arrays(path, validation=0.1)
    recipe = {
        "task": "multilabel",
        "prune": {"sparsity": {"*": 0.8}, "rounds": 2, "retrain_epochs": 2, "batch_size": 64},
        "quantize": {"bits": {"*": 5}, "finetune_epochs": 1, "batch_size": 64},
    }
    folded = deepshrink.run(model, recipe, data, run_dir=tmp_path / "fold", progress=False)
    trained = deepshrink.run(model, recipe | {"batchnorm": "train"}, data, run_dir=tmp_path / "train", progress=False)
    assert folded.metric_name == "label accuracy" and folded.reference_metric > 0.95
    # Within 1% (relative) of the original with BatchNorm folded; train-mode BatchNorm loses more.
    assert folded.compressed_metric >= 0.99 * folded.reference_metric
    assert trained.compressed_metric < 0.99 * trained.reference_metric
    # The folded file holds no BatchNorm and loads into the user's unfolded module.
    state, metadata = deepshrink.compressed.read_state_dict(folded.path)
    assert metadata[FOLDED_KEY] == [["0", "1"], ["3", "4"], ["8", "9"]]
    assert not any(name.startswith(("1.", "4.", "9.")) for name in state)
    assert metadata["input_shape"] == [2, 64] and metadata["task"] == "multilabel"
    report = (tmp_path / "fold" / "report.md").read_text()
    assert "Task: multilabel; data: tones." in report and "Fashion-MNIST" not in report and "top-1" not in report


def test_foldable_pairs_see_through_the_graph():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
    assert foldable_pairs(model) == [("0", "1")]


MODULE = """
from torch import nn

def odd():
    return nn.Sequential(nn.Flatten(), nn.Linear(30, 48), nn.BatchNorm1d(48), nn.ReLU(), nn.Linear(48, 6))
"""


def test_array_data_with_odd_shapes_and_no_targets_runs_end_to_end(cli, tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(textwrap.dedent(MODULE))
    sys.path.insert(0, str(tmp_path))
    try:
        import mynets  # noqa: PLC0415 - written by this test

        torch.manual_seed(0)
        model = with_statistics(mynets.odd(), torch.randn(64, 3, 5, 2))
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mynets", None)
    deepshrink.save_checkpoint(tmp_path / "odd.safetensors", model, model_name="mynets:odd")
    inputs = np.random.default_rng(0).normal(size=(400, 3, 5, 2))  # float64, no targets
    np.savez(tmp_path / "odd.npz", x=inputs)
    environment = dict(os.environ, PYTHONPATH=str(tmp_path))

    def run_cli(*arguments):
        command = [sys.executable, "-m", "deepshrink", "--quiet", *arguments]
        return subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment, cwd=tmp_path)

    data = ["--data", "odd.npz", "--validation", "50", "--task", "embedding"]
    # The run as a user starts it, in a new process; reading its file back is done in this one.
    ran = run_cli("run", "quick", "--model", "mynets:odd", "--checkpoint", "odd.safetensors", "--run-dir", "odd", *data)
    assert ran.returncode == 0, ran.stderr
    # Targets are the original model's own outputs, so it agrees with them exactly; the quick
    # recipe (90% pruned, 5 bits, two short rounds on 350 examples) keeps most of the direction.
    assert "validation cosine similarity (embedding, odd): 1.0000 reference, " in ran.stdout
    similarity = float(ran.stdout.split("reference, ")[1].split(" decoded")[0])
    assert similarity > 0.6
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        # No --input-shape: the file records it.
        bench = cli("bench", "odd/mynets-odd.dcz", "--model", "mynets:odd", "--batch", "1", "--repeats", "2")
        predicted = cli("predict", "odd/mynets-odd.dcz", "--model", "mynets:odd", *data, "--split", "validation")
    finally:
        sys.modules.pop("mynets", None)
    assert bench.returncode == 0, bench.stderr
    assert "on made-up inputs of shape (3, 5, 2)" in bench.stdout
    assert predicted.returncode == 0, predicted.stderr
    assert "the data has no targets, so no metric; ran 50 validation examples" in predicted.stdout


@pytest.mark.parametrize(
    ("arrays", "error", "message"),
    [
        ({"inputs": np.zeros((4, 2))}, DataError, "holds no array named 'x'.*np.savez"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(3)}, DataError, "x holds 4 examples but y holds 3"),
        ({"x": np.array(["a", "b"])}, FormatError, "dtype <U1; it should be numeric"),
        ({"x": np.zeros((1, 2))}, DataError, "leaves 0 to validate and 1 to train on"),
        ({"x": np.zeros((4, 2)), "x_test": np.zeros((2, 3))}, DataError, "x_test examples are \\(3,\\)"),
        ({"x": np.array([[0.0, 1.0], [2.0, np.nan]] * 2)}, DataError, r"x holds 2 value\(s\) that are not.*x\[1, 1"),
        ({"x": np.zeros((3, 2)), "y": np.array([0.5, -np.inf, 1.0])}, DataError, r"array y holds 1 value.*y\[1\]"),
    ],
)
@pytest.mark.parametrize("in_memory", [False, True])
def test_bad_array_files_name_the_value_and_the_fix(tmp_path, arrays, error, message, in_memory):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    with pytest.raises(error, match=message):
        deepshrink.load_arrays(arrays if in_memory else path)


def test_a_nan_far_into_a_large_array_is_found_where_it_is():
    inputs = np.zeros((2_000_000, 3), dtype=np.float32)  # checked in blocks of about 1.4 million examples
    inputs[1_500_000, 2] = np.nan
    with pytest.raises(DataError, match=r"x holds 1 value\(s\) that are not finite .* x\[1500000, 2\]"):
        deepshrink.load_arrays({"x": inputs})


def test_arrays_in_memory_split_as_their_file_does(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(40, 3, 2)), "y": rng.integers(0, 3, 40), "x_test": rng.normal(size=(8, 3, 2))}
    arrays["y_test"] = rng.integers(0, 3, 8)
    np.savez(tmp_path / "data.npz", **arrays)
    from_file = deepshrink.load_arrays(tmp_path / "data.npz", validation=10, seed=3)
    as_tensors = {name: torch.from_numpy(array) for name, array in arrays.items()}
    for given in (arrays, as_tensors):
        in_memory = deepshrink.load_arrays(given, validation=10, seed=3)
        for split in ("train", "validation", "test"):
            for ours, theirs in zip(getattr(in_memory, split).tensors, getattr(from_file, split).tensors, strict=True):
                assert torch.equal(ours, theirs)
    # The fingerprint (part of every cached stage's key) follows the contents, not the call.
    assert deepshrink.load_arrays(as_tensors).fingerprint == deepshrink.load_arrays(arrays).fingerprint
    changed = dict(arrays, x=arrays["x"].copy())
    changed["x"][0, 0, 0] += 1e-9
    assert deepshrink.load_arrays(changed).fingerprint != deepshrink.load_arrays(arrays).fingerprint
    with pytest.raises(ConfigError, match=r"not a ndarray; pass \{'x': inputs, 'y': targets\}"):
        deepshrink.load_arrays(arrays["x"])


def test_run_takes_the_arrays_or_their_file_and_splits_them_as_load_arrays_does(tmp_path):
    """`deepshrink.run(model, recipe, {"x": ..., "y": ...})` or the path of those arrays: the
    same file, bytes and all, as from `load_arrays` of the same dict with the split `deepshrink
    run --data FILE` uses."""
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(300, 12)).astype(np.float32), "y": rng.integers(0, 3, 300)}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 3))
    recipe = {
        "seed": 0,
        "prune": {"sparsity": {"*": 0.5}, "rounds": 1, "retrain_epochs": 1},
        "quantize": {"bits": {"*": 4}},
    }
    given = deepshrink.run(model, recipe, arrays, run_dir=tmp_path / "given", progress=False)
    loaded = deepshrink.run(model, recipe, deepshrink.load_arrays(arrays), run_dir=tmp_path / "loaded", progress=False)
    assert given.path.read_bytes() == loaded.path.read_bytes()
    assert given.compressed_metric == loaded.compressed_metric
    np.savez(tmp_path / "arrays.npz", **arrays)
    from_path = deepshrink.run(model, recipe, tmp_path / "arrays.npz", run_dir=tmp_path / "path", progress=False)
    assert from_path.compressed_metric == given.compressed_metric
    (from_file, file_metadata), (from_dict, dict_metadata) = (read_state_dict(run.path) for run in (from_path, given))
    assert all(torch.equal(from_file[key], from_dict[key]) for key in from_dict)
    # A file's fingerprint hashes its bytes, a dict's its arrays: the cache keys differ, not the tensors.
    assert {key for key in file_metadata if file_metadata[key] != dict_metadata.get(key)} == {"stage_key"}
    with pytest.raises(ConfigError, match="a dict of arrays or a path, got list"):
        deepshrink.run(model, recipe, [arrays["x"], arrays["y"]], run_dir=tmp_path / "list", progress=False)


def test_pickled_arrays_are_refused(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, x=np.array([{"a": 1}, {"b": 2}], dtype=object))
    with pytest.raises(FormatError, match="cannot read the arrays"):
        deepshrink.load_arrays(path)


def test_validation_split_takes_a_fraction_or_a_count(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, x=np.zeros((20, 3), dtype=np.float16), y=np.arange(20) % 3)
    assert len(deepshrink.load_arrays(path, validation=0.25).validation) == 5
    data = deepshrink.load_arrays(path, validation=2)
    assert len(data.validation) == 2 and len(data.train) == 18 and data.test_is_validation
    assert data.train.tensors[0].dtype == torch.float32 and data.train.tensors[1].dtype == torch.int64
    with pytest.raises(ConfigError, match="validation=1.5 should be a fraction"):
        deepshrink.load_arrays(path, validation=1.5)


def test_data_from_a_function_is_checked_and_split_like_a_file(tmp_path, monkeypatch):
    """`--data package.module:function`: a dict of arrays (token ids stay integers, for an
    Embedding), or a DataSplits; anything else is a clear error."""
    (tmp_path / "my_data.py").write_text(
        textwrap.dedent(
            """
            import numpy as np

            def tokens():
                generator = np.random.default_rng(0)
                return {"x": generator.integers(0, 50, (40, 6)), "y": generator.integers(0, 3, 40)}

            def unequal():
                return {"x": np.zeros((5, 2)), "y": np.zeros(4)}

            def nothing():
                return [1, 2]

            def loaders():
                import torch
                import deepshrink

                dataset = torch.utils.data.TensorDataset(torch.zeros(8, 3), torch.zeros(8, dtype=torch.long))
                loader = deepshrink.make_loader(dataset, 4, shuffle=False)
                return deepshrink.Loaders.fixed(loader, loader, loader)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from deepshrink.data import load_any

    data = load_any("my_data:tokens", validation=10)
    assert data.name == "tokens" and data.test_is_validation and data.input_shape == (6,)
    assert data.train.tensors[0].dtype == torch.int64 and len(data.validation) == 10
    assert load_any("my_data:tokens", validation=10).fingerprint == data.fingerprint
    model = nn.Sequential(nn.Embedding(50, 4), nn.Flatten(), nn.Linear(24, 3))
    assert model(data.train.tensors[0][:2]).shape == (2, 3)
    with pytest.raises(DataError, match="my_data:unequal: x holds 5 examples but y holds 4"):
        load_any("my_data:unequal")
    assert isinstance(load_any("my_data:loaders"), deepshrink.Loaders)  # as they are, for run()
    with pytest.raises(DataError, match="returned list; it should return a dict of numpy arrays"):
        load_any("my_data:nothing")
    with pytest.raises(ConfigError, match="cannot import missing from my_data"):
        load_any("my_data:missing")


def test_with_no_data_pruning_and_sharing_run_without_retraining_and_say_so(tmp_path):
    """No data at all: masks in rounds and k-means codebooks, nothing retrained or measured, the
    report and the command line say so; stages that need data are refused up front."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 5)).eval()
    recipe = {"prune": {"sparsity": {"*": 0.75}, "rounds": 2}, "quantize": {"bits": {"*": 4}}}
    result = deepshrink.run(model, recipe, None, run_dir=tmp_path / "python", progress=False)
    assert result.reference_metric is None and result.compressed_metric is None and result.ratio > 3
    decoded, _ = deepshrink.load_compressed(result.path, copy.deepcopy(model))
    for layer, kept in ((decoded[0], 20 * 64 // 4), (decoded[3], 64 * 5 // 4)):
        assert int((layer.weight != 0).sum()) == kept
        assert len(torch.unique(layer.weight)) <= 2**4
    assert torch.equal(decoded[1].running_mean, model[1].running_mean)  # BatchNorm left unfolded
    report = (tmp_path / "python" / "report.md").read_text()
    assert "no data was given, so the weights were pruned and shared without retraining" in report
    assert "Nothing was measured" in report
    with pytest.raises(ConfigError, match="without data the recipe cannot run target"):
        deepshrink.run(model, {"prune": {}, "target": {"ratio": 10}}, None, run_dir=tmp_path / "t", progress=False)
    with pytest.raises(ConfigError, match="method dns trains the model"):
        deepshrink.run(
            model, {"prune": {"method": "dns", "sparsity": {"*": 0.5}}}, None, run_dir=tmp_path / "d", progress=False
        )

    (tmp_path / "nodata.py").write_text(
        "from torch import nn\n\ndef net():\n"
        "    return nn.Sequential(nn.Linear(20, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 5))\n"
    )
    deepshrink.save_checkpoint(tmp_path / "net.safetensors", model, model_name="nodata:net")
    (tmp_path / "recipe.yaml").write_text("prune: {sparsity: {'*': 0.75}, rounds: 2}\nquantize: {bits: {'*': 4}}\n")
    command = [sys.executable, "-m", "deepshrink", "--quiet", "run", "recipe.yaml", "--model", "nodata:net"]
    command += ["--checkpoint", "net.safetensors", "--data", "none", "--run-dir", "cli"]
    environment = dict(os.environ, PYTHONPATH=str(tmp_path))
    ran = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert "Nothing was measured: the run had no data." in ran.stdout
    from_cli, _ = deepshrink.compressed.read_state_dict(tmp_path / "cli" / "nodata-net.dcz")
    from_python, _ = deepshrink.compressed.read_state_dict(result.path)
    assert all(torch.equal(from_cli[key], from_python[key]) for key in from_python)  # the same weights
