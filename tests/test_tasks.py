"""Tasks: each built-in loss and metric against a hand computation, distillation that gives
embeddings a real gradient, and clear errors for unknown tasks and metrics that are not numbers."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

import deepshrink
from deepshrink.distill import DistillationLoss
from deepshrink.errors import ConfigError
from deepshrink.tasks import Metric, Task, classification, embedding, multilabel, regression, resolve_task


def loader(outputs: torch.Tensor, targets: torch.Tensor, batch: int):
    """Batches of (outputs, targets) for an identity model: evaluate() then sees `outputs`."""
    dataset = torch.utils.data.TensorDataset(outputs, targets)
    return deepshrink.make_loader(dataset, batch, shuffle=False)


def sums(task: Task, outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return task.metric.finish(task.metric.statistics(outputs, targets).tolist())


def test_classification_is_cross_entropy_and_top1():
    outputs = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [1.0, 1.5, 0.0]])
    targets = torch.tensor([0, 2, 0])
    task = classification()
    by_hand = (
        -sum(
            math.log(math.exp(row[label]) / sum(math.exp(value) for value in row))
            for row, label in zip(outputs.tolist(), targets.tolist(), strict=True)
        )
        / 3
    )
    assert task.loss(outputs, targets).item() == pytest.approx(by_hand, rel=1e-6)
    assert sums(task, outputs, targets) == pytest.approx(2 / 3)
    assert task.metric.higher_is_better


def test_multilabel_is_binary_cross_entropy_label_accuracy_and_f1():
    logits = torch.tensor([[2.0, -1.0], [-0.5, 0.3], [1.0, 1.0]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    probabilities = [[1 / (1 + math.exp(-value)) for value in row] for row in logits.tolist()]
    by_hand = (
        -sum(
            target * math.log(p) + (1 - target) * math.log(1 - p)
            for row, labels in zip(probabilities, targets.tolist(), strict=True)
            for p, target in zip(row, labels, strict=True)
        )
        / 6
    )
    assert multilabel().loss(logits, targets).item() == pytest.approx(by_hand, rel=1e-6)
    # predicted at 0.5: [1, 0], [0, 1], [1, 1]; right: 2 + 1 + 1 of 6 labels
    assert sums(multilabel(), logits, targets) == pytest.approx(4 / 6)
    # true positives 3 (row 0 col 0, row 1 col 1, row 2 col 1), false positives 1, false negatives 1
    assert sums(multilabel(metric="f1"), logits, targets) == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    on_probabilities = multilabel(logits=False)
    assert on_probabilities.loss(torch.sigmoid(logits), targets).item() == pytest.approx(by_hand, rel=1e-5)
    assert sums(on_probabilities, torch.sigmoid(logits), targets) == pytest.approx(4 / 6)


def test_regression_is_squared_error_and_mean_absolute_error():
    outputs = torch.tensor([[1.0], [2.0], [4.0]])
    targets = torch.tensor([1.5, 2.0, 2.0])
    assert regression().loss(outputs, targets).item() == pytest.approx((0.25 + 0 + 4) / 3)
    assert regression("l1").loss(outputs, targets).item() == pytest.approx((0.5 + 0 + 2) / 3)
    assert sums(regression(), outputs, targets) == pytest.approx(2.5 / 3)
    assert not regression().metric.higher_is_better
    assert sums(regression(tolerance=0.6), outputs, targets) == pytest.approx(2 / 3)


def test_embedding_is_cosine_distance_and_similarity():
    outputs = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    targets = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    # cosines: 0 and 1
    assert embedding().loss(outputs, targets).item() == pytest.approx((1 + 0) / 2)
    assert sums(embedding(), outputs, targets) == pytest.approx(0.5)
    assert embedding("mse").loss(outputs, targets).item() == pytest.approx((1 + 4) / 4)


def test_a_data_set_metric_is_the_same_whatever_the_batch_size():
    generator = torch.Generator().manual_seed(0)
    outputs = torch.randn(101, 5, generator=generator)
    targets = (torch.rand(101, 5, generator=generator) < 0.4).float()
    identity = torch.nn.Identity()
    task = multilabel(metric="f1")
    whole = deepshrink.evaluate(identity, loader(outputs, targets, 101), task=task).metric
    for batch in (1, 7, 50):
        assert deepshrink.evaluate(identity, loader(outputs, targets, batch), task=task).metric == pytest.approx(whole)
    assert whole == pytest.approx(sums(task, outputs, targets))


def test_embedding_distillation_gives_a_useful_gradient_where_softmax_gives_almost_none():
    generator = torch.Generator().manual_seed(0)
    teacher = torch.nn.functional.normalize(torch.randn(32, 64, generator=generator), dim=1)
    student = torch.nn.functional.normalize(
        teacher + 0.3 * torch.randn(32, 64, generator=generator), dim=1
    ).requires_grad_(True)
    (through_embedding,) = torch.autograd.grad(embedding().distillation(student, teacher, 4.0), student)
    (through_softmax,) = torch.autograd.grad(classification().distillation(student, teacher, 4.0), student)
    # Softmax over a unit-length vector at T = 4 is nearly uniform: its KL barely moves.
    assert through_softmax.norm() < 0.05 * through_embedding.norm()
    # and the embedding loss points the student towards the teacher
    assert (through_embedding * (student - teacher)).sum() > 0


def test_distillation_loss_uses_the_task():
    teacher = torch.nn.Linear(3, 2)
    student = torch.nn.Linear(3, 2)
    inputs, targets = torch.randn(8, 3), torch.randn(8, 2)
    loss = DistillationLoss(teacher, alpha=0.5, task=regression())
    mse = torch.nn.functional.mse_loss
    expected = 0.5 * mse(student(inputs), teacher(inputs)) + 0.5 * mse(student(inputs), targets)
    assert loss(student(inputs), targets, inputs).item() == pytest.approx(expected.item(), rel=1e-6)


def test_fit_trains_a_regression_model_with_its_task():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(512, 4, generator=generator)
    targets = inputs @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
    dataset = torch.utils.data.TensorDataset(inputs, targets)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 1), torch.nn.Flatten(0))
    before = deepshrink.evaluate(model, loader(inputs, targets, 128), task="regression").metric
    history = deepshrink.fit(
        model,
        deepshrink.make_loader(dataset, 32, shuffle=True),
        deepshrink.TrainConfig(epochs=5, learning_rate=0.05, weight_decay=0.0),
        task="regression",
        progress=False,
    )
    after = deepshrink.evaluate(model, deepshrink.make_loader(dataset, 128, shuffle=False), task="regression")
    assert after.metric_name == "mean absolute error"
    assert after.metric < 0.1 < before
    assert history.epochs[-1].train_metric < history.epochs[0].train_metric


def test_unknown_task_names_the_built_in_ones():
    with pytest.raises(ConfigError, match="'segmentation' is not a built-in task .*classification.*embedding"):
        resolve_task("segmentation")
    with pytest.raises(ConfigError, match="task: 'segmentation' is not a built-in task"):
        deepshrink.recipe.recipe_from_dict({"task": "segmentation"})


def test_a_task_function_from_a_module(monkeypatch):
    module = types.ModuleType("mytasks")
    module.good = lambda: regression("l1")
    module.bad = lambda: "not a task"
    monkeypatch.setitem(sys.modules, "mytasks", module)
    assert resolve_task("mytasks:good").name == "regression-l1"
    with pytest.raises(ConfigError, match="returned str; it should return a deepshrink.Task"):
        resolve_task("mytasks:bad")
    with pytest.raises(ConfigError, match="cannot import missing from mytasks"):
        resolve_task("mytasks:missing")


def test_a_metric_that_returns_nan_is_an_error_naming_it():
    broken = Task(
        "mine",
        lambda outputs, targets: ((outputs - targets) ** 2).mean(),
        Metric.batch_mean("my score", lambda outputs, targets: float("nan")),
        lambda student, teacher, temperature: ((student - teacher) ** 2).mean(),
        lambda outputs: outputs,
    )
    with pytest.raises(ConfigError, match="the metric 'my score' of task 'mine' is nan"):
        deepshrink.evaluate(torch.nn.Identity(), loader(torch.zeros(4, 2), torch.zeros(4, 2), 2), task=broken)


TARGET_MISMATCHES = [
    ("regression", torch.zeros(40), 2, r"the targets are \[\d+\] for outputs \[\d+, 2\].*one target per output \(2"),
    ("classification", torch.arange(40) % 5, 2, r"a target is 4, and the model outputs 2 classes \(labels 0\.\.1\)"),
    ("classification", torch.zeros(40), 2, r"the targets are float32 \[\d+\].*use task regression"),
    ("classification", torch.ones(40, 2), 2, r"an example's target probabilities sum to 2, not 1.*task multilabel"),
    ("classification", torch.full((40, 2), 2.0), 2, r"a target is 2, and class probabilities lie in \[0, 1\]"),
    ("classification", torch.zeros(40, 3, dtype=torch.long), 2, r"the targets are \[\d+, 3\].*use task multilabel"),
    ("multilabel", torch.zeros(40, 3), 2, r"the targets are \[\d+, 3\] for outputs \[\d+, 2\].*use task classific"),
    ("classification", torch.arange(40) % 2, 1, r"the model has one output.*task multilabel"),
]


@pytest.mark.parametrize(("task", "targets", "width", "message"), TARGET_MISMATCHES)
def test_targets_that_do_not_fit_the_task_are_named_before_anything_runs(tmp_path, task, targets, width, message):
    from deepshrink.errors import DataError

    inputs = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    data = deepshrink.load_arrays({"x": inputs, "y": targets})
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, width))
    recipe = {"prune": {"sparsity": {"*": 0.5}, "rounds": 1, "retrain_epochs": 1}}
    with pytest.raises(DataError, match=rf"task {task}: {message}"):
        deepshrink.run(model, recipe, data, task=task, run_dir=tmp_path / "r", progress=False)
    with pytest.raises(DataError, match=message):  # training alone checks them too
        loader = deepshrink.make_loader(data.train, 8, shuffle=False)
        deepshrink.fit(model, loader, deepshrink.TrainConfig(epochs=1), task=task, progress=False)


def test_a_bad_label_in_a_later_batch_is_named_too_and_fitting_targets_pass():
    from deepshrink.errors import DataError
    from deepshrink.tasks import check_targets

    model = torch.nn.Linear(6, 3)
    labels = torch.arange(64) % 3
    labels[-1] = 3  # the last batch's last example
    loader = deepshrink.make_loader(torch.utils.data.TensorDataset(torch.randn(64, 6), labels), 16, shuffle=False)
    with pytest.raises(DataError, match="a target is 3, and the model outputs 3 classes"):
        deepshrink.evaluate(model, loader)
    # What the built-in tasks take: a label per position (outputs [N, C, L]), any shape with one
    # value per output for regression and embeddings, the same shape for multilabel.
    check_targets(classification(), torch.zeros(4, 3, 7), torch.zeros(4, 7, dtype=torch.long))
    check_targets(regression(), torch.zeros(4, 1), torch.zeros(4))
    check_targets(embedding(), torch.zeros(4, 2, 3), torch.zeros(4, 6))
    check_targets(multilabel(), torch.zeros(4, 5), torch.ones(4, 5, dtype=torch.long))
    mine = Task("mine", lambda outputs, targets: outputs.sum(), classification().metric, None, None)
    check_targets(mine, torch.zeros(2), torch.zeros(9))  # your own task: no check unless it gives one


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.int64])
def test_class_labels_of_any_integer_type_train_and_score_alike(dtype):
    inputs = torch.randn(48, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(48) % 3
    results = []
    for given in (labels, labels.to(dtype)):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        loader = deepshrink.make_loader(torch.utils.data.TensorDataset(inputs, given), 8, shuffle=False)
        deepshrink.fit(model, loader, deepshrink.TrainConfig(epochs=2), progress=False)
        results.append((model.weight.detach().clone(), deepshrink.evaluate(model, loader).metric))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]


def test_a_binary_model_with_one_logit_trains_as_multilabel_on_flat_targets():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(200, 3, generator=generator)
    labels = (inputs[:, 0] > 0).long()  # [N], for outputs [N, 1]
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    loader = deepshrink.make_loader(torch.utils.data.TensorDataset(inputs, labels), 20, shuffle=False)
    config = deepshrink.TrainConfig(epochs=5, learning_rate=0.1)
    deepshrink.fit(model, loader, config, task="multilabel", progress=False)
    assert deepshrink.evaluate(model, loader, task="multilabel").metric > 0.9


def test_class_probabilities_train_and_score_as_their_labels_do(tmp_path):
    """One-hot targets (as Keras users have them) are the same task as their labels: the same
    loss to rounding, the same accuracy, the same compressed run; soft labels train too."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(600, 6, generator=generator)
    labels = (inputs[:, 0] > 0).long() + (inputs[:, 1] > 0).long()
    one_hot = torch.nn.functional.one_hot(labels, 3).float()
    task = classification()
    outputs = torch.randn(600, 3, generator=generator)
    assert task.loss(outputs, one_hot).item() == pytest.approx(task.loss(outputs, labels).item(), rel=1e-6)
    assert sums(task, outputs, one_hot) == sums(task, outputs, labels)
    recipe = {"prune": {"sparsity": {"*": 0.5}, "rounds": 1, "retrain_epochs": 2}, "quantize": {"bits": {"*": 4}}}
    results = {}
    for name, targets in {"labels": labels, "one-hot": one_hot, "smoothed": 0.9 * one_hot + 0.1 / 3}.items():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        data = deepshrink.load_arrays({"x": inputs, "y": targets})
        loader = deepshrink.make_loader(data.train, 32, True)
        deepshrink.fit(model, loader, deepshrink.TrainConfig(epochs=5), progress=False)
        results[name] = deepshrink.run(model, recipe, data, run_dir=tmp_path / name, progress=False)
    assert results["one-hot"].reference_metric == pytest.approx(results["labels"].reference_metric, abs=0.02)
    assert results["one-hot"].compressed_metric == pytest.approx(results["labels"].compressed_metric, abs=0.02)
    assert min(result.compressed_metric for result in results.values()) > 0.7


@pytest.mark.parametrize(
    ("task", "outputs", "targets"),
    [
        (classification(), torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])),
        (classification(), torch.randn(6, 4), torch.softmax(torch.randn(6, 4), 1)),
        (regression(), torch.randn(6, 2), torch.randn(6, 2)),
        (regression(tolerance=0.5), torch.randn(6, 2), torch.randn(6, 2)),
        (embedding(), torch.randn(6, 8), torch.randn(6, 8)),
    ],
)
def test_metric_statistics_stay_on_the_outputs_device(task, outputs, targets):
    """On a GPU the statistics of a batch are summed where the outputs are: a count made on the CPU
    and stacked with them failed there (found on an H200). The meta device stands in for CUDA."""
    statistics = task.metric.statistics(outputs.to("meta"), targets.to("meta"))
    assert statistics.device.type == "meta" and statistics.shape == (2,)
