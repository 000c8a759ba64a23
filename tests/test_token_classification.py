"""token-classification: one label per position with the classes on the last axis (a tagger's
or a language model's outputs, as Hugging Face's heads give them), positions labelled -100 not
scored. Its loss, metric and distillation against float64 references; the targets it refuses;
and a character-level language model on real text (the Python standard library's own source),
compressed end to end with and without targets."""

from __future__ import annotations

import argparse
import inspect
import math
import string
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import deepshrink
from deepshrink.errors import DataError
from deepshrink.tasks import IGNORED_LABEL, classification, resolve_task


def naive_loss_and_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """Cross-entropy and top-1 over the labelled positions, one position at a time in float64."""
    losses, correct = [], 0
    for row, label in zip(
        outputs.reshape(-1, outputs.shape[-1]).double().tolist(), targets.reshape(-1).tolist(), strict=True
    ):
        if label == IGNORED_LABEL:
            continue
        largest = max(row)
        normaliser = largest + math.log(sum(math.exp(value - largest) for value in row))
        losses.append(normaliser - row[label])
        correct += int(max(range(len(row)), key=row.__getitem__) == label)
    return sum(losses) / len(losses), correct / len(losses)


def test_loss_and_accuracy_count_the_labelled_positions_only():
    generator = torch.Generator().manual_seed(0)
    outputs = torch.randn(6, 9, 5, generator=generator)
    targets = torch.randint(0, 5, (6, 9), generator=generator)
    targets[:, 6:] = IGNORED_LABEL  # padding
    targets[2, :] = IGNORED_LABEL  # a sequence with nothing scored
    task = resolve_task("token-classification")
    expected_loss, expected_accuracy = naive_loss_and_accuracy(outputs, targets)
    assert task.loss(outputs, targets).item() == pytest.approx(expected_loss, rel=1e-6)
    statistics = task.metric.statistics(outputs, targets)
    assert statistics[1].item() == (targets != IGNORED_LABEL).sum().item() == 5 * 6
    assert task.metric.finish(statistics.tolist()) == pytest.approx(expected_accuracy)
    # Scores of ignored positions change nothing.
    changed = outputs.clone()
    changed[targets == IGNORED_LABEL] = 100.0
    assert task.loss(changed, targets).item() == pytest.approx(expected_loss, rel=1e-6)
    # A batch with no labelled position trains nothing, where a mean over none would be NaN.
    nothing = torch.full((2, 9), IGNORED_LABEL)
    leaf = outputs[:2].clone().requires_grad_(True)
    loss = task.loss(leaf, nothing)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(leaf.grad, torch.zeros_like(leaf))
    assert task.targets_from_outputs(outputs).shape == (6, 9)


def test_distillation_is_hintons_loss_at_every_position():
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(3, 4, 6, generator=generator), torch.randn(3, 4, 6, generator=generator)
    temperature = 2.0
    total = 0.0
    for row_student, row_teacher in zip(student.reshape(-1, 6).double(), teacher.reshape(-1, 6).double(), strict=True):
        teacher_probabilities = torch.softmax(row_teacher / temperature, 0)
        student_log = torch.log_softmax(row_student / temperature, 0)
        total += float((teacher_probabilities * (teacher_probabilities.log() - student_log)).sum())
    expected = total / 12 * temperature**2
    task = resolve_task("token-classification")
    assert task.distillation(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (torch.zeros(40, 7), r"the targets are float32, and token-classification needs an integer class label"),
        (
            torch.zeros(40, dtype=torch.long),
            r"the targets are \[\d+\] for outputs \[\d+, 7, 3\].*one label per position",
        ),
        (torch.full((40, 7), 3), r"a target is 3, and the model outputs 3 classes \(labels 0\.\.2, and -100"),
        (torch.full((40, 7), -1), r"a target is -1, and the model outputs 3 classes"),
    ],
)
def test_targets_that_do_not_fit_positions_are_named(tmp_path, targets, message):
    tokens = torch.randint(0, 10, (40, 7), generator=torch.Generator().manual_seed(0))
    data = deepshrink.load_arrays({"x": tokens, "y": targets})
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 3))
    recipe = {"prune": {"sparsity": {"*": 0.5}, "rounds": 1, "retrain_epochs": 1}}
    with pytest.raises(DataError, match=rf"task token-classification: {message}"):
        deepshrink.run(model, recipe, data, task="token-classification", run_dir=tmp_path / "r", progress=False)


def test_classification_names_token_classification_for_labels_per_position():
    outputs, targets = torch.zeros(4, 7, 3), torch.zeros(4, 7, dtype=torch.long)
    assert "is task token-classification" in classification().mismatch(outputs, targets)


# --- a character-level language model on real text -------------------------------------------

ALPHABET = string.printable  # 100 characters; the stdlib's source is ASCII but for a few
LENGTH = 24


def character_sequences(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows of the standard library's source, 8 to 24 characters each (the rest padding):
    inputs are the characters, each position's label the next one, -100 past the end."""
    text = "".join(Path(module.__file__).read_text() for module in (argparse, inspect, textwrap))
    codes = np.array([ALPHABET.find(character) % len(ALPHABET) for character in text[:400_000]], dtype=np.int64)
    generator = np.random.default_rng(seed)
    starts = generator.integers(0, len(codes) - LENGTH - 1, count)
    lengths = generator.integers(8, LENGTH + 1, count)
    inputs = np.stack([codes[start : start + LENGTH] for start in starts])
    labels = np.stack([codes[start + 1 : start + LENGTH + 1] for start in starts])
    past_end = np.arange(LENGTH)[None] >= lengths[:, None]
    inputs[past_end] = 0
    labels[past_end] = IGNORED_LABEL
    return inputs, labels


class CharacterModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(ALPHABET), 32)
        self.recurrent = nn.GRU(32, 96, batch_first=True)
        self.out = nn.Linear(96, len(ALPHABET))

    def forward(self, characters):
        states, _ = self.recurrent(self.embed(characters))
        return self.out(states)


@pytest.fixture(scope="module")
def language_model():
    inputs, labels = character_sequences(3000, 0)
    test_inputs, test_labels = character_sequences(1000, 1)
    data = deepshrink.load_arrays({"x": inputs, "y": labels, "x_test": test_inputs, "y_test": test_labels})
    torch.manual_seed(0)
    model = CharacterModel()
    config = deepshrink.TrainConfig(epochs=6, learning_rate=3e-3, optimizer="adam", seed=0)
    loader = deepshrink.make_loader(data.train, 64, shuffle=True)
    deepshrink.fit(model, loader, config, task="token-classification", progress=False)
    return data, {key: value.clone() for key, value in model.state_dict().items()}


RECIPE = {
    "task": "token-classification",
    "prune": {
        "sparsity": {"*": 0.5},
        "rounds": 1,
        "retrain_epochs": 2,
        "learning_rate": 0.2,
        "distill": {"temperature": 2.0, "alpha": 0.5},
    },
    "quantize": {"bits": {"*": 5}, "finetune_epochs": 1},
}


def test_a_character_language_model_compresses_within_a_bound(language_model, tmp_path):
    data, state = language_model
    model = CharacterModel()
    model.load_state_dict(state)
    result = deepshrink.run(model, RECIPE, data, run_dir=tmp_path / "run", progress=False)
    report = result.report
    assert report["metric"] == "token accuracy"
    assert report["reference_metric"] > 0.35  # next character of Python source, well above chance (1%)
    assert report["compressed_metric"] >= report["reference_metric"] - 0.02, report
    decoded, _ = deepshrink.load_compressed(result.path, CharacterModel())
    loader = deepshrink.make_loader(data.test, 500, shuffle=False)
    measured = deepshrink.evaluate(decoded, loader, task="token-classification")
    assert measured.metric == pytest.approx(report["compressed_metric"])


def test_without_targets_each_position_is_labelled_by_the_model(language_model, tmp_path):
    data, state = language_model
    model = CharacterModel()
    model.load_state_dict(state)
    unlabelled = deepshrink.load_arrays({"x": data.train.tensors[0], "x_test": data.test.tensors[0]})
    result = deepshrink.run(model, RECIPE, unlabelled, run_dir=tmp_path / "run", progress=False)
    assert result.report["targets"] == "from the original model"
    assert result.report["reference_metric"] == 1.0
    assert result.report["compressed_metric"] >= 0.8
