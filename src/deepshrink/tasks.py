"""Tasks: what "good" means for a model. A task is the loss retraining minimises, the metric that
chooses and reports (with its name and whether higher is better), the distillation loss that
matches a teacher's outputs, and how targets are made from a model's own outputs when the data
has none (the label-free path).

Built in: classification (the paper's setting and the default), multilabel, regression and
embedding. Any other task is a `Task` built from your own callables, or from the command line
`--task package.module:function` returning one.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from deepshrink.errors import ConfigError, DataError


@dataclass(frozen=True)
class Metric:
    """A metric computed over a whole data set from per-batch sums.

    `statistics(outputs, targets)` returns a 1-D tensor of sums for one batch (for top-1: correct
    and count); the sums are added over batches and processes, and `finish(sums)` turns them into
    the value. Sums rather than per-batch means keep F1 and accuracy exact whatever the batch size.
    """

    name: str
    higher_is_better: bool
    statistics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    finish: Callable[[list[float]], float] = lambda sums: sums[0] / sums[1] if sums[1] else math.nan

    def drop(self, reference: float, value: float) -> float:
        """How much worse `value` is than `reference` (positive is worse), whichever way is better.

        Args:
            reference: the reference model's value.
            value: the compressed model's value.

        Returns:
            The drop, in the metric's units.
        """
        return reference - value if self.higher_is_better else value - reference

    def best(self, values: list[float]) -> int:
        """The index of the best of `values`.

        Args:
            values: values of this metric.

        Returns:
            The index of the highest (or, lower being better, the lowest).
        """
        chooser = max if self.higher_is_better else min
        return chooser(range(len(values)), key=lambda index: values[index])

    @classmethod
    def batch_mean(cls, name: str, function: Callable, higher_is_better: bool = True) -> Metric:
        """A metric from your `function(outputs, targets) -> float`, the mean over a batch; the
        data set's value is the batch values averaged with the batch sizes as weights.

        Args:
            name: the metric's name in reports.
            function: function(outputs, targets) -> a float, the batch's mean.
            higher_is_better: which way is better.

        Returns:
            The Metric.
        """

        def statistics(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            count = outputs.shape[0]
            return torch.tensor([float(function(outputs, targets)) * count, count], dtype=torch.float64)

        return cls(name, higher_is_better, statistics)


@dataclass(frozen=True)
class Task:
    """The loss, the metric and the distillation loss of one kind of model.

    - `loss(outputs, targets)`: the retraining loss, a scalar mean over the batch.
    - `metric`: the Metric that chooses (sensitivity, low-rank candidates) and reports.
    - `distillation(student_outputs, teacher_outputs, temperature)`: the loss that matches a
      teacher; only classification uses the temperature.
    - `targets_from_outputs(outputs)`: targets made from the original model's outputs, used when
      the data has inputs but no targets (retraining then reproduces the original model).
    - `mismatch(outputs, targets)`: what is wrong with a batch's targets for these outputs (a
      float label, a class past the model's width, a shape that does not pair up), or None;
      `check_targets` turns it into a DataError. None: no check (your own tasks, by default).
    """

    name: str
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metric: Metric
    distillation: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    targets_from_outputs: Callable[[torch.Tensor], torch.Tensor]
    mismatch: Callable[[torch.Tensor, torch.Tensor], str | None] | None = None

    def describe(self) -> str:
        """One line for reports: the task, its metric and which way is better.

        Returns:
            E.g. "classification (top-1 accuracy, higher is better)".
        """
        better = "higher" if self.metric.higher_is_better else "lower"
        return f"{self.name} ({self.metric.name}, {better} is better)"


def check_targets(task: Task, outputs: torch.Tensor, targets: torch.Tensor) -> None:
    """Refuse a batch whose targets do not fit the task and the model's outputs, before the loss
    turns it into an error from deep inside torch (or, on a GPU, a device-side assert).

    Args:
        task: the task (its `mismatch`, if any).
        outputs: the model's outputs for the batch.
        targets: the batch's targets.

    Raises:
        DataError: what does not fit, and the task or data to use instead.
    """
    if task.mismatch is None:
        return
    problem = task.mismatch(outputs, targets)
    if problem is not None:
        raise DataError(f"task {task.name}: {problem}")


def _shape(tensor: torch.Tensor) -> str:
    return "[" + ", ".join(str(size) for size in tensor.shape) + "]"


# How far a probability target's row may sum from 1 (float32 one-hot or smoothed labels, summed).
PROBABILITY_SUM_TOLERANCE = 1e-3


def _probability_mismatch(outputs: torch.Tensor, targets: torch.Tensor) -> str | None:
    """Float targets are class probabilities (one-hot or soft labels): the outputs' shape, each
    value in [0, 1], each example's summing to 1 over the classes (axis 1)."""
    if tuple(targets.shape) != tuple(outputs.shape) or outputs.dim() < 2:
        return (
            f"the targets are {str(targets.dtype).removeprefix('torch.')} {_shape(targets)} for outputs "
            f"{_shape(outputs)}, and classification takes integer class labels 0..C-1 ([N]) or class "
            "probabilities of the outputs' shape (one-hot or soft labels); for real-valued targets use task "
            "regression, for several 0/1 labels per example task multilabel"
        )
    if targets.numel() and not bool(((targets >= 0) & (targets <= 1)).all()):
        return (
            f"a target is {float(targets.min()) if float(targets.min()) < 0 else float(targets.max()):g}, and "
            "class probabilities lie in [0, 1]; for real-valued targets use task regression"
        )
    sums = targets.double().sum(1)
    if targets.numel() and not bool(((sums - 1).abs() <= PROBABILITY_SUM_TOLERANCE).all()):
        off = float(sums[(sums - 1).abs() > PROBABILITY_SUM_TOLERANCE][0])
        return (
            f"an example's target probabilities sum to {off:g}, not 1: one class per example is one-hot "
            "(or a label 0..C-1); several 0/1 labels per example are task multilabel"
        )
    return None


def _classification_mismatch(outputs: torch.Tensor, targets: torch.Tensor) -> str | None:
    if targets.is_floating_point():
        return _probability_mismatch(outputs, targets)
    if targets.dtype == torch.bool or targets.is_complex():
        return (
            f"the targets are {str(targets.dtype).removeprefix('torch.')}, and classification needs integer class "
            "labels 0..C-1; for real-valued targets use task regression, for several 0/1 labels per example "
            "task multilabel"
        )
    expected = (outputs.shape[0], *outputs.shape[2:])
    if outputs.dim() > 2 and tuple(targets.shape) == tuple(outputs.shape[:-1]) != expected:
        return (
            f"the targets are {_shape(targets)} for outputs {_shape(outputs)}: one label per position with the "
            "classes on the last axis (a tagger's or a language model's outputs) is task token-classification; "
            "classification takes the classes on axis 1"
        )
    if outputs.dim() < 2 or tuple(targets.shape) != expected:
        return (
            f"the targets are {_shape(targets)} for outputs {_shape(outputs)}, and classification needs one class "
            "label per example (outputs [N, C], targets [N]); for several labels per example use task multilabel"
        )
    classes = outputs.shape[1]
    if targets.numel() and bool(((targets < 0) | (targets >= classes)).any()):
        if classes == 1:
            return (
                "the model has one output, and classification needs one per class: a binary classifier with "
                "one logit is task multilabel (binary cross-entropy, targets 0 or 1)"
            )
        low, high = int(targets.min()), int(targets.max())
        return (
            f"a target is {low if low < 0 else high}, and the model outputs {classes} classes "
            f"(labels 0..{classes - 1}); the labels must number the model's outputs from 0"
        )
    return None


def _same_count_mismatch(kind: str, hint: str = "") -> Callable[[torch.Tensor, torch.Tensor], str | None]:
    """Targets that hold one value per output, in any shape that has as many per example (a
    binary model's [N, 1] outputs take [N] targets); `hint` follows the message."""

    def mismatch(outputs: torch.Tensor, targets: torch.Tensor) -> str | None:
        if len(targets) == len(outputs) and targets.numel() == outputs.numel():
            return None
        per_example = outputs[0].numel() if len(outputs) else 0
        return (
            f"the targets are {_shape(targets)} for outputs {_shape(outputs)}, and {kind} needs one target per "
            f"output ({per_example} per example){hint}"
        )

    return mismatch


def _top1(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if targets.is_floating_point():  # class probabilities: the most probable class is the label
        targets = targets.argmax(1)
    correct = (outputs.argmax(1) == targets).sum()
    count = torch.tensor(float(targets.shape[0]), dtype=torch.float64, device=correct.device)
    return torch.stack([correct.double(), count])


def _classification_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) (Hinton et al. 2015), batch mean."""
    student_log = torch.log_softmax(student / temperature, dim=1)
    teacher_log = torch.log_softmax(teacher / temperature, dim=1)
    return nn.functional.kl_div(student_log, teacher_log, reduction="batchmean", log_target=True) * temperature**2


def _cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # Labels of any integer type (int32 from a user's loader, say) become int64, which
    # cross_entropy takes; float targets are class probabilities, which it takes as they are.
    return nn.functional.cross_entropy(outputs, targets if targets.is_floating_point() else targets.long())


def classification() -> Task:
    """Cross-entropy on logits, top-1 accuracy, Hinton's distillation: the paper's setting.
    Targets are class labels 0..C-1, or class probabilities of the outputs' shape (one-hot or
    soft labels), whose most probable class is the label top-1 counts.

    Returns:
        The Task.
    """
    return Task(
        "classification",
        _cross_entropy,
        Metric("top-1 accuracy", True, _top1),
        _classification_distillation,
        lambda outputs: outputs.argmax(1),
        _classification_mismatch,
    )


# Hugging Face's label for a position that is not scored (padding, a word's later sub-word
# pieces, the tokens a masked language model does not predict); cross_entropy's default too.
IGNORED_LABEL = -100


def _token_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy over the labelled positions; zero (with a gradient of zeros) for a
    batch that has none, where torch's mean over no positions is NaN."""
    targets = targets.reshape(-1).long()
    flat = outputs.reshape(-1, outputs.shape[-1])
    if not bool((targets != IGNORED_LABEL).any()):
        return flat.sum() * 0.0
    return nn.functional.cross_entropy(flat, targets, ignore_index=IGNORED_LABEL)


def _token_top1(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    labelled = targets != IGNORED_LABEL
    correct = ((outputs.argmax(-1) == targets) & labelled).sum()
    return torch.stack([correct.double(), labelled.sum().double()])


def _token_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's loss at every position (the teacher has a distribution at padding too), averaged."""
    classes = student.shape[-1]
    return _classification_distillation(student.reshape(-1, classes), teacher.reshape(-1, classes), temperature)


def _token_mismatch(outputs: torch.Tensor, targets: torch.Tensor) -> str | None:
    if targets.is_floating_point() or targets.dtype == torch.bool or targets.is_complex():
        return (
            f"the targets are {str(targets.dtype).removeprefix('torch.')}, and token-classification needs an "
            f"integer class label per position (0..C-1, or {IGNORED_LABEL} for a position not scored)"
        )
    if outputs.dim() < 2 or tuple(targets.shape) != tuple(outputs.shape[:-1]):
        return (
            f"the targets are {_shape(targets)} for outputs {_shape(outputs)}, and token-classification needs one "
            "label per position, the outputs' shape without its last (class) axis: outputs [N, L, C], targets "
            "[N, L]; for one label per example with classes on axis 1 use task classification"
        )
    classes = outputs.shape[-1]
    wrong = (targets != IGNORED_LABEL) & ((targets < 0) | (targets >= classes))
    if bool(wrong.any()):
        value = int(targets[wrong][0])
        return (
            f"a target is {value}, and the model outputs {classes} classes (labels 0..{classes - 1}, and "
            f"{IGNORED_LABEL} for a position not scored)"
        )
    return None


def token_classification() -> Task:
    """One class label per position of a sequence, with the classes on the outputs' last axis,
    as Hugging Face's token-classification and language-model heads give them (outputs [N, L, C],
    targets [N, L]): tagging, and language modelling with the next token as each position's
    label. Positions labelled -100 are not scored (Hugging Face's convention: padding, sub-word
    pieces, tokens a masked language model does not predict). Cross-entropy over the labelled
    positions, their top-1 accuracy, and Hinton's distillation at every position.

    Returns:
        The Task.
    """
    return Task(
        "token-classification",
        _token_cross_entropy,
        Metric("token accuracy", True, _token_top1),
        _token_distillation,
        lambda outputs: outputs.argmax(-1),
        _token_mismatch,
    )


def _probabilities(outputs: torch.Tensor, logits: bool) -> torch.Tensor:
    return torch.sigmoid(outputs) if logits else outputs


def multilabel(logits: bool = True, metric: str = "label accuracy", threshold: float = 0.5) -> Task:
    """Independent yes/no labels (also binary): binary cross-entropy on logits (or, with
    `logits=False`, on outputs that are already probabilities), and the metric "label accuracy"
    (the fraction of labels right at `threshold`) or "f1" (micro-averaged F1). Distillation is
    binary cross-entropy against the teacher's probabilities.

    Args:
        logits: the outputs are logits (else probabilities).
        metric: "label accuracy" or "f1".
        threshold: the probability above which a label counts as predicted.

    Returns:
        The Task.

    Raises:
        ConfigError: an unknown metric, or a threshold outside (0, 1).
    """
    if metric not in ("label accuracy", "f1"):
        raise ConfigError(f"multilabel metric={metric!r} should be 'label accuracy' or 'f1'")
    if not 0 < threshold < 1:
        raise ConfigError(f"threshold={threshold!r} should be a probability in (0, 1), e.g. 0.5")

    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.to(outputs.dtype).reshape(outputs.shape)  # a binary model's [N, 1] outputs, [N] targets
        if logits:
            return nn.functional.binary_cross_entropy_with_logits(outputs, targets)
        return nn.functional.binary_cross_entropy(outputs.clamp(1e-7, 1 - 1e-7), targets)

    def statistics(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        predicted = _probabilities(outputs, logits) > threshold
        actual = targets.reshape(outputs.shape) > 0.5
        if metric == "f1":
            true_positive = (predicted & actual).sum()
            false_positive = (predicted & ~actual).sum()
            false_negative = (~predicted & actual).sum()
            return torch.stack([true_positive, false_positive, false_negative]).double()
        return torch.tensor([float((predicted == actual).sum()), float(actual.numel())], dtype=torch.float64)

    def finish(sums: list[float]) -> float:
        if metric == "f1":
            true_positive, false_positive, false_negative = sums
            denominator = 2 * true_positive + false_positive + false_negative
            return 2 * true_positive / denominator if denominator else 1.0
        return sums[0] / sums[1] if sums[1] else math.nan

    def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:  # noqa: ARG001
        return loss(student, _probabilities(teacher, logits))

    return Task(
        "multilabel" if logits else "multilabel-probabilities",
        loss,
        Metric(metric, True, statistics, finish),
        distillation,
        lambda outputs: (_probabilities(outputs, logits) > threshold).to(outputs.dtype),
        _same_count_mismatch("multilabel", "; for one class label per example use task classification"),
    )


def regression(loss: str = "mse", tolerance: float | None = None) -> Task:
    """Real-valued outputs: mean squared (`loss="mse"`) or absolute (`"l1"`) error; the metric is
    the mean absolute error (lower is better) or, with `tolerance`, the fraction of outputs
    within +-tolerance of the target. Distillation matches the teacher's outputs by MSE.

    Args:
        loss: "mse" or "l1".
        tolerance: report the fraction within +-tolerance instead of the mean absolute error.

    Returns:
        The Task.

    Raises:
        ConfigError: an unknown loss, or a tolerance that is not positive.
    """
    if loss not in ("mse", "l1"):
        raise ConfigError(f"regression loss={loss!r} should be 'mse' or 'l1'")
    if tolerance is not None and not tolerance > 0:
        raise ConfigError(f"tolerance={tolerance!r} should be a positive number")
    function = nn.functional.mse_loss if loss == "mse" else nn.functional.l1_loss

    def statistics(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        error = (outputs - targets.to(outputs.dtype).reshape(outputs.shape)).abs().double()
        value = (error <= tolerance).sum().double() if tolerance is not None else error.sum()
        return torch.stack([value, torch.tensor(float(error.numel()), dtype=torch.float64, device=value.device)])

    metric = (
        Metric("mean absolute error", False, statistics)
        if tolerance is None
        else Metric(f"within +-{tolerance:g}", True, statistics)
    )
    return Task(
        "regression" if loss == "mse" else "regression-l1",
        lambda outputs, targets: function(outputs, targets.to(outputs.dtype).reshape(outputs.shape)),
        metric,
        lambda student, teacher, temperature: nn.functional.mse_loss(student, teacher),  # noqa: ARG005
        lambda outputs: outputs,
        _same_count_mismatch("regression"),
    )


def _cosine(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cosine_similarity(outputs.flatten(1), targets.to(outputs.dtype).flatten(1), dim=1)


def embedding(loss: str = "cosine") -> Task:
    """Vector outputs compared with target vectors (usually the original model's own outputs):
    loss 1 - cosine similarity (`loss="cosine"`, for L2-normalised embeddings) or MSE; the metric
    is the mean cosine similarity to the targets. Distillation is the same loss against the
    teacher's outputs, which, unlike softmax distillation, gives normalised embeddings a gradient.

    Args:
        loss: "cosine" or "mse".

    Returns:
        The Task.

    Raises:
        ConfigError: an unknown loss.
    """
    if loss not in ("cosine", "mse"):
        raise ConfigError(f"embedding loss={loss!r} should be 'cosine' or 'mse'")

    def loss_function(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if loss == "cosine":
            return (1 - _cosine(outputs, targets)).mean()
        return nn.functional.mse_loss(outputs, targets.to(outputs.dtype).reshape(outputs.shape))

    def statistics(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        similarity = _cosine(outputs, targets).double()
        count = torch.tensor(float(similarity.numel()), dtype=torch.float64, device=similarity.device)
        return torch.stack([similarity.sum(), count])

    return Task(
        "embedding" if loss == "cosine" else "embedding-mse",
        loss_function,
        Metric("cosine similarity", True, statistics),
        lambda student, teacher, temperature: loss_function(student, teacher),  # noqa: ARG005
        lambda outputs: outputs,
        _same_count_mismatch("embedding"),
    )


BUILT_IN = {
    "classification": classification,
    "multilabel": multilabel,
    "multilabel-probabilities": lambda: multilabel(logits=False),
    "multilabel-f1": lambda: multilabel(metric="f1"),
    "regression": regression,
    "regression-l1": lambda: regression("l1"),
    "embedding": embedding,
    "embedding-mse": lambda: embedding("mse"),
    "token-classification": token_classification,
}
DEFAULT_TASK = "classification"


def resolve_task(task: Task | str | None) -> Task:
    """A Task from a Task, a built-in name, `package.module:function` (called with no arguments,
    returning a Task), or None for classification, the paper's setting.

    Args:
        task: a Task, a built-in name, "package.module:function", or None.

    Returns:
        The Task.

    Raises:
        ConfigError: an unknown name, a function that cannot be imported or returns no Task.
    """
    if task is None:
        return classification()
    if isinstance(task, Task):
        return task
    if not isinstance(task, str):
        raise ConfigError(f"task should be a Task, a built-in name or package.module:function, not {task!r}")
    if task in BUILT_IN:
        return BUILT_IN[task]()
    if ":" not in task:
        raise ConfigError(
            f"task {task!r} is not a built-in task ({', '.join(BUILT_IN)}); for your own, "
            "pass package.module:function returning a deepshrink.Task"
        )
    module_name, _, function_name = task.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"task {task!r}: cannot import {function_name} from {module_name} ({error})") from error
    made = function()
    if not isinstance(made, Task):
        raise ConfigError(f"task {task!r} returned {type(made).__name__}; it should return a deepshrink.Task")
    return made


def check_value(task: Task, value: float, where: str) -> float:
    """`value` of the task's metric, or a ConfigError when it is not a finite number.

    Args:
        task: the task whose metric `value` is.
        value: the metric's value.
        where: what it was measured on, for the error.

    Returns:
        `value` as a float.

    Raises:
        ConfigError: `value` is not a finite number.
    """
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(
            f"the metric {task.metric.name!r} of task {task.name!r} is {value!r} on {where}; it should be a finite "
            "number: check the metric function and that the model's outputs and the targets have the shapes it expects"
        )
    return float(value)
