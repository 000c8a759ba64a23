"""Models whose forward returns several outputs (Hugging Face's ModelOutput, a tuple of logits
and features): refused with the recipe line that picks one; with `output:` (or --output) every
stage, the teacher and the decoded model score that one, the file records it, and `deepshrink
predict` uses it."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import deepshrink
from deepshrink import cli
from deepshrink.checkpoint import save_checkpoint
from deepshrink.compressed import open_compressed
from deepshrink.errors import ModelError

RECIPE = {"prune": {"sparsity": {"*": 0.5}, "rounds": 1, "retrain_epochs": 2}, "quantize": {"bits": {"*": 4}}}


class ModelOutput(OrderedDict):
    """As Hugging Face's: a dict whose entries are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class SeveralOutputs(nn.Module):
    """Logits and features, as a ModelOutput, a plain dict or a tuple."""

    def __init__(self, returns: str = "model_output") -> None:
        super().__init__()
        self.returns = returns
        self.hidden = nn.Linear(12, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, inputs):
        features = torch.relu(self.hidden(inputs))
        logits = self.head(features)
        if self.returns == "tuple":
            return logits, features
        kind = ModelOutput if self.returns == "model_output" else dict
        return kind(logits=logits, hidden_states=features)


class Logits(nn.Module):
    """The wrapper a user would otherwise write."""

    def __init__(self, inner: nn.Module, output: str) -> None:
        super().__init__()
        self.inner = inner
        self.output = int(output) if output.isdigit() else output

    def forward(self, inputs):
        return self.inner(inputs)[self.output]


def hugging_face_style() -> nn.Module:
    """The factory `deepshrink run --model test_model_outputs:hugging_face_style` builds."""
    return SeveralOutputs("model_output")


def labelled_arrays(path):
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(600, 12)).astype(np.float32)
    np.savez(path, x=inputs, y=(inputs[:, 0] + inputs[:, 1] > 0).astype(np.int64))
    return path


def trained(returns: str, data) -> SeveralOutputs:
    torch.manual_seed(0)
    model = SeveralOutputs(returns)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    inputs, targets = data.train.tensors
    for _ in range(100):
        optimizer.zero_grad()
        outputs = model(inputs)
        logits = outputs[0] if returns == "tuple" else outputs["logits"]
        nn.functional.cross_entropy(logits, targets).backward()
        optimizer.step()
    return model


@pytest.mark.parametrize(
    ("returns", "described", "line"),
    [
        ("tuple", r"a tuple of 2 \(Tensor \[\d+, 2\], Tensor \[\d+, 16\]\)", "output: 0"),
        ("dict", r"a dict of 2 \('logits': Tensor \[\d+, 2\], 'hidden_states': Tensor \[\d+, 16\]\)", "output: logits"),
        (
            "model_output",
            r"a ModelOutput of 2 \('logits': Tensor \[\d+, 2\], 'hidden_states': Tensor \[\d+, 16\]\)",
            "output: logits",
        ),
    ],
)
def test_several_outputs_are_refused_with_the_line_that_picks_one_and_compress_with_it(
    tmp_path, returns, described, line
):
    data = deepshrink.load_arrays(labelled_arrays(tmp_path / "data.npz"))
    model = trained(returns, data)
    with pytest.raises(ModelError, match=rf"forward returned {described}, not one tensor.*\(`{line}`"):
        deepshrink.run(model, RECIPE, data, run_dir=tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()

    output = line.removeprefix("output: ")
    result = deepshrink.run(model, {**RECIPE, "output": output}, data, run_dir=tmp_path / "run", progress=False)
    assert result.reference_metric > 0.9  # the logits were scored, before and after
    # The same as compressing a wrapper that returns the logits, which the message also offers.
    wrapped = deepshrink.run(Logits(model, output), RECIPE, data, run_dir=tmp_path / "wrapped", progress=False)
    assert (result.reference_metric, result.compressed_metric) == (wrapped.reference_metric, wrapped.compressed_metric)
    assert result.compressed_metric > 0.75
    _, checked = open_compressed(result.path)
    assert checked.metadata["output"] == output
    # The caller's model is left as it was: it still returns everything.
    assert not isinstance(model(data.test.tensors[0][:3]), torch.Tensor)
    decoded, _ = deepshrink.load_compressed(result.path, SeveralOutputs(returns))
    logits = decoded(data.test.tensors[0])
    logits = logits[0] if returns == "tuple" else logits["logits"]
    accuracy = float((logits.argmax(1) == data.test.tensors[1]).float().mean())
    assert accuracy == pytest.approx(result.compressed_metric)


@pytest.mark.parametrize(
    ("returns", "output", "message"),
    [
        ("dict", "scores", r"'scores' is not in what the model's forward returned: a dict of 2 \('logits'"),
        ("tuple", "2", r"output: 2 is past the end of a tuple of 2"),
        ("tuple", "logits", r"'logits' is not in what the model's forward returned: a tuple of 2"),
    ],
)
def test_an_output_that_is_not_there_is_named_before_anything_runs(tmp_path, returns, output, message):
    data = deepshrink.load_arrays(labelled_arrays(tmp_path / "data.npz"))
    model = SeveralOutputs(returns)
    with pytest.raises(ModelError, match=message):
        deepshrink.run(model, {**RECIPE, "output": output}, data, run_dir=tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


class AuxiliaryWhileTraining(SeveralOutputs):
    """As Inception and GoogLeNet: logits and an auxiliary head's while training, logits alone
    in eval mode."""

    def forward(self, inputs):
        logits, features = super().forward(inputs)
        return (logits, features) if self.training else logits


def test_auxiliary_outputs_only_while_training_are_picked_then_and_passed_through_otherwise(tmp_path):
    data = deepshrink.load_arrays(labelled_arrays(tmp_path / "data.npz"))
    model = AuxiliaryWhileTraining("tuple")
    model.load_state_dict(trained("tuple", data).state_dict())
    result = deepshrink.run(model, {**RECIPE, "output": "0"}, data, run_dir=tmp_path / "run", progress=False)
    assert result.reference_metric > 0.9 and result.compressed_metric > 0.75
    with pytest.raises(ModelError, match=r"a tuple of 2 .*\(`output: 0`"):  # retraining meets the tuple
        deepshrink.run(model, RECIPE, data, run_dir=tmp_path / "without", progress=False)


def test_the_command_line_takes_output_and_predict_reads_it_from_the_file(tmp_path, capsys):
    data_path = labelled_arrays(tmp_path / "data.npz")
    model = trained("model_output", deepshrink.load_arrays(data_path))
    factory = "test_model_outputs:hugging_face_style"
    checkpoint = save_checkpoint(tmp_path / "trained.safetensors", model, model_name=factory)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "prune: {sparsity: {'*': 0.5}, rounds: 1, retrain_epochs: 2}\nquantize: {bits: {'*': 4}}\noutput: logits\n"
    )
    common = ["--model", factory, "--data", str(data_path)]
    assert cli.main(["--quiet", "evaluate", str(checkpoint), *common, "--output", "logits"]) == 0
    assert "test top-1 accuracy: 0.9" in capsys.readouterr().out
    run_dir = tmp_path / "run"
    run = ["run", str(recipe), *common, "--checkpoint", str(checkpoint), "--run-dir", str(run_dir)]
    assert cli.main(["--quiet", *run]) == 0
    capsys.readouterr()
    # predict takes the output the file records; a stage command takes --output.
    assert cli.main(["--quiet", "predict", str(run_dir / "test_model_outputs-hugging_face_style.dcz"), *common]) == 0
    assert "top-1 accuracy" in capsys.readouterr().out
    pruned = tmp_path / "pruned.safetensors"
    stage = ["prune", str(checkpoint), "--out", str(pruned), "--sparsity", "*=0.5", "--rounds", "1"]
    assert cli.main(["--quiet", *stage, *common, "--output", "logits"]) == 0
    without = ["prune", str(checkpoint), "--out", str(tmp_path / "again.safetensors"), *stage[4:], *common]
    assert cli.main(["--quiet", *without]) == ModelError.exit_code
    assert "output: logits" in capsys.readouterr().err
