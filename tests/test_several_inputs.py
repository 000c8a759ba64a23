"""Models that take several inputs: a transformer encoder's token ids and attention mask, or two
positional tensors. The data gives one array per argument (x.NAME for keyword arguments, x.0,
x.1 for positional ones), or the user's loaders give dict batches with the targets under
"labels" (as Hugging Face's collators make them). Every stage calls the model with them, the file
records their names, and `predict` runs the file on them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import deepshrink
from deepshrink.compressed import load_compressed
from deepshrink.data import load_arrays, make_loader
from deepshrink.errors import ConfigError, DataError, ModelError
from deepshrink.file_commands import bench_file, predict_file
from deepshrink.inputs import Examples
from deepshrink.train import TrainConfig, evaluate, fit

VOCABULARY, LENGTH, CLASSES = 32, 16, 4

# The model, as a user's module: the CLI imports it by name, the tests by path.
MODULE = f"""
import torch
from torch import nn

class Padded(nn.Module):
    '''A transformer encoder over padded token sequences: the attention mask keeps the padding out
    of the attention and out of the mean over positions.'''

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding({VOCABULARY}, 32)
        self.position = nn.Parameter(torch.zeros(1, {LENGTH}, 32))
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(32, {CLASSES})

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(self.embed(input_ids) + self.position, src_key_padding_mask=attention_mask == 0)
        weights = attention_mask.unsqueeze(-1).float()
        return self.head((hidden * weights).sum(1) / weights.sum(1))

def padded():
    return Padded()
"""

RECIPE = {
    "prune": {
        "sparsity": {"*": 0.8},
        "rounds": 2,
        "retrain_epochs": 1,
        "learning_rate": 0.01,
        "distill": {"temperature": 2.0, "alpha": 0.5},
    },
    "quantize": {"bits": {"*": 5}, "finetune_epochs": 1},
}


def sequences(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token sequences of 4-16 tokens, each class drawing from its own distribution; the padding
    after each sequence holds random tokens, so a model that ignored the mask would read noise."""
    distributions = np.random.default_rng(7).dirichlet(np.full(VOCABULARY, 0.3), CLASSES)
    generator = np.random.default_rng(seed)
    labels = generator.integers(0, CLASSES, count)
    lengths = generator.integers(4, LENGTH + 1, count)
    drawn = np.stack([generator.choice(VOCABULARY, LENGTH, p=distributions[label]) for label in labels])
    mask = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int64)
    noise = generator.integers(0, VOCABULARY, (count, LENGTH))
    return np.where(mask == 1, drawn, noise).astype(np.int64), mask, labels.astype(np.int64)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(the module's directory, the data file, the trained model's state) made once."""
    directory = tmp_path_factory.mktemp("several")
    (directory / "several_net.py").write_text(textwrap.dedent(MODULE))
    ids, mask, labels = sequences(3000, 0)
    test_ids, test_mask, test_labels = sequences(1000, 1)
    arrays = {"x.input_ids": ids, "x.attention_mask": mask, "y": labels}
    arrays |= {"x_test.input_ids": test_ids, "x_test.attention_mask": test_mask, "y_test": test_labels}
    np.savez(directory / "tokens.npz", **arrays)
    splits = load_arrays(directory / "tokens.npz")
    model = build(directory)
    config = TrainConfig(epochs=6, learning_rate=1e-3, optimizer="adam", seed=0)
    fit(model, make_loader(splits.train, 64, shuffle=True), config, progress=False)
    return directory, directory / "tokens.npz", {key: value.clone() for key, value in model.state_dict().items()}


def build(directory, state=None) -> torch.nn.Module:
    sys.path.insert(0, str(directory))
    try:
        import several_net  # noqa: PLC0415 - written by the fixture

        torch.manual_seed(0)
        model = several_net.padded()
    finally:
        sys.path.remove(str(directory))
        sys.modules.pop("several_net", None)
    if state is not None:
        model.load_state_dict(state)
    return model


def test_one_array_per_argument_splits_every_input_with_its_targets():
    count = 50
    arrays = {"x.first": np.arange(count), "x.second": np.arange(count) * 2.0, "y": np.arange(count) % 3}
    arrays |= {"x.flags": np.arange(count) % 2 == 0}
    arrays |= {"x_test.first": np.arange(10), "x_test.second": np.arange(10) * 2.0, "y_test": np.arange(10) % 3}
    arrays |= {"x_test.flags": np.arange(10) % 2 == 0}
    splits = load_arrays(arrays, validation=10)
    assert splits.input_names == ("first", "second", "flags") and splits.input_shape is None
    for split in (splits.train, splits.validation, splits.test):
        assert isinstance(split, Examples)
        inputs, targets = split.inputs, split.targets
        # Every row of every input and of the targets is the same example after the shuffle.
        assert torch.equal(inputs["second"], inputs["first"].float() * 2)
        assert torch.equal(targets, inputs["first"] % 3)
        assert torch.equal(inputs["flags"], inputs["first"] % 2 == 0)
        assert (inputs["first"].dtype, inputs["second"].dtype, inputs["flags"].dtype) == (
            torch.int64,
            torch.float32,
            torch.bool,  # a padding mask stays boolean: torch's attention adds a float mask
        )
    assert len(splits.train) + len(splits.validation) == count
    assert sorted(torch.cat([splits.train.inputs["first"], splits.validation.inputs["first"]]).tolist()) == list(
        range(count)
    )
    batch_inputs, batch_targets = next(iter(make_loader(splits.train, 8, shuffle=True)))
    assert torch.equal(batch_targets, batch_inputs["first"] % 3)

    positional = load_arrays({"x.1": np.arange(20) * 3, "x.0": np.arange(20), "y": np.arange(20) % 2}, validation=5)
    first, second = positional.train.inputs  # a tuple in the order of the positions
    assert torch.equal(second, first * 3) and positional.input_names == ("0", "1")


@pytest.mark.parametrize(
    ("arrays", "error", "message"),
    [
        ({"x": np.zeros((9, 2)), "x.mask": np.ones((9, 2))}, DataError, r"holds both x and x\.mask"),
        ({"x.0": np.zeros((9, 2)), "x.mask": np.ones((9, 2))}, DataError, r"mix positions and names"),
        ({"x.0": np.zeros((9, 2)), "x.2": np.ones((9, 2))}, DataError, r"numbered 0, 1, \.\.\. without gaps"),
        ({"x.ids": np.zeros((9, 2)), "x.mask": np.ones((8, 2))}, DataError, r"x\.ids 9, x\.mask 8"),
        (
            {"x.ids": np.zeros((9, 2)), "y": np.zeros(9), "x_test.ids": np.zeros((3, 2)), "y_test": np.zeros(3)}
            | {"x.mask": np.ones((9, 2))},
            DataError,
            r"the training inputs are x\.ids, x\.mask but the test inputs are x_test\.ids",
        ),
        (
            {"x.ids": np.zeros((9, 2)), "x_test.ids": np.zeros((3, 5))},
            DataError,
            r"x\.ids examples are \(2,\) but x_test\.ids examples are \(5,\)",
        ),
        ({"x.ids": np.zeros((9, 2)), "y": np.zeros(8)}, DataError, r"x holds 9 examples but y holds 8"),
        ({"x.0": np.zeros((9, 2)), "x.01": np.ones((9, 2))}, DataError, r"'x\.01' is not an input's name"),
        ({"x.ids": np.zeros((9, 2)), "x.my-mask": np.ones((9, 2))}, DataError, r"'x\.my-mask' is not an input's"),
    ],
)
def test_several_input_arrays_that_do_not_fit_together_are_named(tmp_path, arrays, error, message):
    with pytest.raises(error, match=message):
        load_arrays(arrays, validation=2)
    np.savez(tmp_path / "arrays.npz", **arrays)  # the file reader keeps the x.NAME arrays too
    with pytest.raises(error, match=message):
        load_arrays(tmp_path / "arrays.npz", validation=2)


def test_scale_of_several_inputs_is_refused():
    with pytest.raises(ConfigError, match=r"scale=0\.5 multiplies one input array.*x\.ids, x\.mask"):
        load_arrays({"x.ids": np.zeros((9, 2)), "x.mask": np.ones((9, 2))}, validation=2, scale=0.5)


def test_a_transformer_with_an_attention_mask_compresses_end_to_end(trained, tmp_path):
    directory, data_file, state = trained
    splits = load_arrays(data_file)
    reference = build(directory, state)
    reference_metric = evaluate(reference, make_loader(splits.test, 500, shuffle=False)).metric
    assert reference_metric > 0.9  # the task is learnt, so the bound below means something
    result = deepshrink.run(reference, RECIPE, splits, run_dir=tmp_path / "run", progress=False)
    assert result.report["reference_metric"] == pytest.approx(reference_metric)
    # Measured on the model decoded from the file, on the held-out split.
    assert result.report["compressed_metric"] >= reference_metric - 0.04, result.report
    decoded, metadata = load_compressed(result.path, build(directory))
    assert metadata["input_names"] == ["input_ids", "attention_mask"] and "input_shape" not in metadata
    loader = make_loader(splits.test, 500, shuffle=False)
    assert evaluate(decoded, loader).metric == pytest.approx(result.report["compressed_metric"])
    for name in ("encoder.layers.0.linear1.weight", "encoder.layers.0.self_attn.in_proj_weight", "head.weight"):
        weight = decoded.state_dict()[name]
        assert (weight == 0).float().mean() >= 0.79  # pruned weights are exact zeros
        assert len(torch.unique(weight)) <= 2**5  # 5 bits: zero and at most 31 shared values
    # The compressed form runs from the file on the same inputs, with the same metric.
    predicted = predict_file(result.path, data=data_file, batch_size=100, **_model_of(directory))
    assert predicted.evaluation.metric == pytest.approx(result.report["compressed_metric"])
    with pytest.raises(ConfigError, match=r"several inputs \(input_ids, attention_mask\).*with --data DATA"):
        bench_file(result.path, **_model_of(directory))
    # On real inputs it times both forms, interleaved, per batch size.
    timed = bench_file(result.path, data=data_file, batches=(1, 3), repeats=5, layers=True, **_model_of(directory))
    assert [row["batch"] for row in timed.rows] == [1, 3]
    assert all(row["dense_ms"] > 0 and row["compressed_ms"] > 0 for row in timed.rows)
    assert "input_ids [3, 16] int64, attention_mask [3, 16] int64" in timed.inputs and timed.input_shape is None


def _model_of(directory) -> dict:
    """predict_file's and bench_file's `model`: the user factory, importable while the test runs."""
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))
    return {"model": "several_net:padded"}


@pytest.fixture(autouse=True)
def _forget_the_module(trained):
    yield
    directory = str(trained[0])
    if directory in sys.path:
        sys.path.remove(directory)
    sys.modules.pop("several_net", None)


def test_positional_inputs_train_exactly_as_keyword_inputs(trained, tmp_path):
    directory, data_file, state = trained
    with np.load(data_file) as archive:
        arrays = {name: archive[name] for name in archive.files}
    positional = {
        name.replace("input_ids", "0").replace("attention_mask", "1"): array for name, array in arrays.items()
    }
    recipe = {"prune": {"sparsity": {"*": 0.6}, "rounds": 1, "retrain_epochs": 1}}
    by_keyword = deepshrink.run(build(directory, state), recipe, load_arrays(arrays), run_dir=tmp_path / "k")
    by_position = deepshrink.run(build(directory, state), recipe, load_arrays(positional), run_dir=tmp_path / "p")
    keyword_state, _ = deepshrink.compressed.read_state_dict(by_keyword.path)
    position_state, metadata = deepshrink.compressed.read_state_dict(by_position.path)
    assert keyword_state.keys() == position_state.keys()
    assert all(torch.equal(keyword_state[key], position_state[key]) for key in keyword_state)
    assert metadata["input_names"] == ["0", "1"]


def _renamed(name: str, renamed: dict[str, str]) -> str:
    split, _, argument = name.partition(".")
    return f"{split}.{renamed[argument]}" if argument else name


class _Records(torch.utils.data.Dataset):
    """Examples as a Hugging Face data set gives them: a dict per example, the targets as labels."""

    def __init__(self, inputs: dict, targets: torch.Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index):
        return {name: values[index] for name, values in self.inputs.items()} | {"labels": self.targets[index]}


def test_loaders_of_dict_batches_with_labels_compress(trained, tmp_path):
    directory, data_file, state = trained
    splits = load_arrays(data_file)

    def loader(split, shuffle, seed=0):
        records = _Records(split.inputs, split.targets)
        generator = torch.Generator().manual_seed(seed)
        return torch.utils.data.DataLoader(records, batch_size=128, shuffle=shuffle, generator=generator)

    loaders = deepshrink.Loaders(
        train=lambda batch_size, seed: loader(splits.train, True, seed),
        validation=loader(splits.validation, False),
        test=loader(splits.test, False),
    )
    result = deepshrink.run(build(directory, state), RECIPE, loaders, run_dir=tmp_path / "run", progress=False)
    assert result.report["compressed_metric"] >= result.report["reference_metric"] - 0.04, 0
    assert deepshrink.compressed.read_state_dict(result.path)[1]["input_names"] == ["input_ids", "attention_mask"]


def test_inputs_without_targets_are_labelled_by_the_model(trained, tmp_path):
    directory, data_file, state = trained
    with np.load(data_file) as archive:
        arrays = {name: archive[name] for name in archive.files if not name.startswith("y")}
    result = deepshrink.run(build(directory, state), RECIPE, load_arrays(arrays), run_dir=tmp_path / "run")
    assert result.report["targets"] == "from the original model"
    assert result.report["reference_metric"] == 1.0  # its own outputs' classes
    assert result.report["compressed_metric"] >= 0.9


def test_inputs_the_forward_does_not_take_are_named_before_anything_runs(trained, tmp_path):
    directory, _, state = trained
    ids, mask, labels = sequences(40, 2)
    unknown = load_arrays({"x.input_ids": ids, "x.mask": mask, "y": labels}, validation=5)
    with pytest.raises(ModelError, match=r"the data's inputs 'mask' are not arguments of Padded\.forward"):
        deepshrink.run(build(directory, state), RECIPE, unknown, run_dir=tmp_path / "r")
    missing = load_arrays({"x.input_ids": ids, "y": labels}, validation=5)
    with pytest.raises(
        ModelError, match=r"Padded\.forward needs 'attention_mask'.*add an array named x\.attention_mask"
    ):
        deepshrink.run(build(directory, state), RECIPE, missing, run_dir=tmp_path / "r")
    too_many = load_arrays({"x.0": ids, "x.1": mask, "x.2": mask, "y": labels}, validation=5)
    with pytest.raises(ModelError, match=r"the data gives 3 inputs and Padded\.forward takes at most 2"):
        deepshrink.run(build(directory, state), RECIPE, too_many, run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()
    mixup = RECIPE | {"prune": RECIPE["prune"] | {"distill": {"temperature": 2.0, "alpha": 0.5, "mixup": 0.2}}}
    good = load_arrays({"x.input_ids": ids, "x.attention_mask": mask, "y": labels}, validation=5)
    with pytest.raises(ConfigError, match=r"mixup=0\.2 blends one input tensor.*input_ids, attention_mask"):
        deepshrink.run(build(directory, state), mixup, good, run_dir=tmp_path / "m", progress=False)


def test_fisher_diagonal_of_keyword_inputs_matches_the_one_tensor_model(trained):
    """OBD's per-example gradients through keyword inputs, against the same model called with one
    tensor that holds both (ids and mask side by side)."""
    from deepshrink.prune.saliency import fisher_diagonal

    directory, data_file, state = trained
    splits = load_arrays(data_file)
    model = build(directory, state)

    class OneTensor(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, both):
            return self.inner(both[:, :LENGTH], both[:, LENGTH:])

    both = torch.cat([splits.validation.inputs["input_ids"], splits.validation.inputs["attention_mask"]], dim=1)
    one_tensor = torch.utils.data.TensorDataset(both, splits.validation.targets)
    layers = ["head", "encoder.layers.0.linear1"]
    keyword = fisher_diagonal(model, make_loader(splits.validation, 100, shuffle=False), layers, max_examples=200)
    wrapped = OneTensor(model)
    reference = fisher_diagonal(
        wrapped, make_loader(one_tensor, 100, shuffle=False), [f"inner.{name}" for name in layers], max_examples=200
    )
    for name in layers:
        assert keyword[name].abs().sum() > 0
        torch.testing.assert_close(keyword[name], reference[f"inner.{name}"], rtol=1e-5, atol=1e-9)


def test_the_command_line_runs_and_predicts_a_model_of_several_inputs(trained, tmp_path):
    directory, data_file, state = trained
    deepshrink.save_checkpoint(tmp_path / "net.safetensors", build(directory, state), model_name="several_net:padded")
    (tmp_path / "recipe.yaml").write_text(
        "prune: {sparsity: {'*': 0.6}, rounds: 1, retrain_epochs: 1}\nquantize: {bits: {'*': 5}}\n"
    )
    environment = dict(os.environ, PYTHONPATH=str(directory))

    def run_cli(*arguments):
        command = [sys.executable, "-m", "deepshrink", "--quiet", *arguments]
        return subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment, cwd=tmp_path)

    model = ["--model", "several_net:padded", "--data", str(data_file)]
    ran = run_cli("run", "recipe.yaml", *model, "--checkpoint", "net.safetensors", "--run-dir", "cli")
    assert ran.returncode == 0, ran.stderr
    files = list((tmp_path / "cli").glob("*.dcz"))
    predicted = run_cli("predict", str(files[0]), *model, "--batch-size", "50")
    assert predicted.returncode == 0, predicted.stderr
    assert "top-1 accuracy" in predicted.stdout
    benched = run_cli("bench", str(files[0]), "--model", "several_net:padded")
    assert benched.returncode == ConfigError.exit_code
    assert "several inputs (input_ids, attention_mask)" in benched.stderr
    benched = run_cli("bench", str(files[0]), *model, "--batch", "1", "--repeats", "5")
    assert benched.returncode == 0, benched.stderr
    assert "on the data's inputs input_ids [1, 16] int64, attention_mask [1, 16] int64" in benched.stdout
