"""Knowledge distillation (Hinton, Vinyals & Dean 2015) as a loss for any retraining stage.

loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)

The T^2 factor keeps the soft term's gradient on the same scale as the hard term's when T
changes: the soft term's gradient with respect to the student's logits is
(softmax(student / T) - softmax(teacher / T)) / T per example, which T^2 turns into
T * (difference of softened probabilities). alpha = 0 is plain cross-entropy.
"""

from __future__ import annotations

import torch
from torch import nn

from deepshrink.errors import ConfigError


class DistillationLoss:
    """A `criterion(outputs, targets, inputs)` for deepshrink.train.fit with a frozen teacher."""

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.5) -> None:
        if not temperature > 0:
            raise ConfigError(f"temperature={temperature!r} should be positive, e.g. 4")
        if not 0 <= alpha <= 1:
            raise ConfigError(f"alpha={alpha!r} should be in [0, 1]: the weight of the teacher's soft targets")
        self.teacher = teacher.eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.temperature = temperature
        self.alpha = alpha

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        hard = nn.functional.cross_entropy(outputs, targets)
        if self.alpha == 0:
            return hard
        self.teacher.to(inputs.device)
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        return self.alpha * soft_target_loss(outputs, teacher_logits, self.temperature) + (1 - self.alpha) * hard


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch."""
    student = torch.log_softmax(student_logits / temperature, dim=1)
    teacher = torch.log_softmax(teacher_logits / temperature, dim=1)
    return nn.functional.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature**2
