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
