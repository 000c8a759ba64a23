"""The distillation loss against its closed forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepshrink.distill import DistillationLoss, soft_target_loss
from deepshrink.errors import ConfigError


def test_alpha_zero_is_plain_cross_entropy():
    outputs, targets, inputs = torch.randn(8, 5), torch.randint(0, 5, (8,)), torch.randn(8, 3)
    loss = DistillationLoss(nn.Linear(3, 5), temperature=3.0, alpha=0.0)(outputs, targets, inputs)
    assert torch.equal(loss, nn.functional.cross_entropy(outputs, targets))


def test_soft_gradient_is_the_difference_of_softened_probabilities_times_t():
    """d/d(student logits) of T^2 KL = T * (softmax(s / T) - softmax(t / T)) / batch."""
    student = torch.randn(4, 6, requires_grad=True)
    teacher = torch.randn(4, 6)
    for temperature in (1.0, 2.0, 5.0):
        (gradient,) = torch.autograd.grad(soft_target_loss(student, teacher, temperature), student)
        expected = temperature * (torch.softmax(student / temperature, 1) - torch.softmax(teacher / temperature, 1)) / 4
        assert torch.allclose(gradient, expected.detach(), atol=1e-6)


def test_soft_loss_is_zero_when_student_matches_teacher():
    logits = torch.randn(3, 4)
    assert soft_target_loss(logits, logits, 4.0).item() == pytest.approx(0.0, abs=1e-7)


def test_teacher_is_frozen():
    teacher = nn.Linear(3, 5)
    DistillationLoss(teacher)
    assert not any(parameter.requires_grad for parameter in teacher.parameters())


@pytest.mark.parametrize(
    ("values", "message"), [({"temperature": 0.0}, "temperature=0.0"), ({"alpha": 1.5}, "alpha=1.5")]
)
def test_bad_values_are_named(values, message):
    with pytest.raises(ConfigError, match=message):
        DistillationLoss(nn.Linear(1, 1), **values)


def test_mixed_rows_are_blends_of_two_examples_of_the_batch():
    """Each mixed row is lambda * x_i + (1 - lambda) * x_j: on one-hot inputs, at most two non-zero
    entries, non-negative, summing to 1, with Beta(1, 1) spreading lambda over (0, 1)."""
    loss = DistillationLoss(nn.Linear(16, 3), mixup=1.0)
    torch.manual_seed(0)
    mixed = loss.extra_inputs(torch.eye(16))
    assert mixed.shape == (16, 16)
    assert (mixed >= 0).all()
    assert torch.allclose(mixed.sum(1), torch.ones(16))
    assert ((mixed > 0).sum(1) <= 2).all()
    assert mixed.max(1).values.min() < 0.9  # the blends are not the examples themselves


def test_mixup_keeps_the_input_shape_and_needs_real_values():
    loss = DistillationLoss(nn.Identity(), mixup=0.5)
    images = torch.rand(4, 2, 5, 5)
    assert loss.extra_inputs(images).shape == images.shape
    with pytest.raises(ConfigError, match=r"mixup=0.5 .*torch.int64.*mixup to 0"):
        loss.extra_inputs(torch.randint(0, 100, (4, 7)))


def test_no_mixed_rows_without_mixup_or_without_a_soft_term():
    assert not hasattr(DistillationLoss(nn.Linear(2, 2)), "extra_inputs")
    assert not hasattr(DistillationLoss(nn.Linear(2, 2), alpha=0.0, mixup=1.0), "extra_inputs")


def test_mixed_rows_get_the_soft_term_and_the_batch_the_hard_one():
    teacher = nn.Linear(3, 5)
    loss = DistillationLoss(teacher, temperature=2.0, alpha=0.3, mixup=1.0)
    outputs, inputs, targets = torch.randn(12, 5), torch.randn(12, 3), torch.randint(0, 5, (8,))
    with torch.no_grad():
        expected = 0.3 * soft_target_loss(outputs, teacher(inputs), 2.0) + 0.7 * nn.functional.cross_entropy(
            outputs[:8], targets
        )
    assert torch.allclose(loss(outputs, targets, inputs), expected)


def test_fit_appends_the_mixed_rows_to_the_forward_and_scores_the_batch_alone():
    """fit runs the batch and the criterion's extra rows through one forward; the criterion sees
    both, while the training metric counts the batch's rows only (the extra ones have no target)."""
    from deepshrink.train import TrainConfig, fit

    class Spy:
        def __init__(self):
            self.seen = []

        def extra_inputs(self, inputs):
            return torch.full((3, inputs.shape[1]), 100.0)

        def __call__(self, outputs, targets, inputs):
            self.seen.append((outputs.shape[0], targets.shape[0], inputs[-3:].eq(100.0).all().item()))
            return nn.functional.cross_entropy(outputs[: len(targets)], targets)

    inputs = torch.eye(4)
    targets = torch.arange(4)
    model = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        model.weight.copy_(10 * torch.eye(4))  # right on the batch, anything on the extra rows
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets), batch_size=4)
    spy = Spy()
    history = fit(model, loader, TrainConfig(epochs=1, learning_rate=1e-6), criterion=spy, progress=False)
    assert spy.seen == [(7, 4, True)]
    assert history.epochs[0].train_metric == 1.0
