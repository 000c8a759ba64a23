"""Knowledge distillation (Hinton, Vinyals & Dean 2015) as a loss for any retraining stage.

loss = alpha * soft(student, teacher) + (1 - alpha) * task loss(student, targets)

The soft term is the task's: for classification T^2 * KL(softmax(teacher / T) || softmax(student
/ T)), whose T^2 factor keeps its gradient on the scale of the hard term's when T changes (the
gradient with respect to the student's logits is (softmax(student / T) - softmax(teacher / T)) / T
per example, which T^2 turns into T * (difference of softened probabilities)). Other tasks match
the teacher's outputs directly (MSE, cosine, or BCE against its probabilities), since a softmax
over an embedding or a regression output carries almost no signal. alpha = 0 is the task loss.

With `mixup` > 0 the soft term also covers a mixed copy of every batch (Beyer et al. 2022,
"Knowledge distillation: a good teacher is patient and consistent"): each example blended with
another of the batch, lambda * x + (1 - lambda) * x', lambda ~ Beta(mixup, mixup) per example.
The teacher labels those points too, so the student learns the teacher's function between the
training examples rather than at them alone, which a student with a few percent of the
teacher's weights overfits otherwise. Blending needs real-valued inputs (not token ids); it
makes no assumption about their shape, and the hard term stays on the batch itself. The mixed
rows run in the same forward as the batch, so BatchNorm layers that train (`batchnorm: train`)
count them in their batch statistics.
"""

from __future__ import annotations

import torch
from torch import nn

from deepshrink.errors import ConfigError
from deepshrink.inputs import call, is_several, tensors
from deepshrink.tasks import Task, classification


class DistillationLoss:
    """A `criterion(outputs, targets, inputs)` for deepshrink.train.fit with a frozen teacher."""

    def __init__(
        self,
        teacher: nn.Module,
        temperature: float = 4.0,
        alpha: float = 0.5,
        task: Task | None = None,
        mixup: float = 0.0,
    ) -> None:
        if not mixup >= 0:
            raise ConfigError(f"mixup={mixup!r} should be 0 (off) or a positive Beta concentration, e.g. 1")
        if not temperature > 0:
            raise ConfigError(f"temperature={temperature!r} should be positive, e.g. 4")
        if not 0 <= alpha <= 1:
            raise ConfigError(f"alpha={alpha!r} should be in [0, 1]: the weight of the teacher's soft targets")
        self.teacher = teacher.eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.temperature = temperature
        self.alpha = alpha
        self.task = task if task is not None else classification()
        self.mixup = mixup
        if mixup > 0 and alpha > 0:
            # fit appends these rows to each batch; without a soft term they would teach nothing.
            self.extra_inputs = self._mixed_inputs

    def _mixed_inputs(self, inputs) -> torch.Tensor:
        """Each example blended with another of the batch, lambda ~ Beta(mixup, mixup) each."""
        if is_several(inputs):
            raise ConfigError(
                f"distill mixup={self.mixup} blends one input tensor, and this model takes several "
                f"({', '.join(name for name, _ in tensors(inputs))}); set distill's mixup to 0"
            )
        if not inputs.is_floating_point():
            raise ConfigError(
                f"distill mixup={self.mixup} blends inputs, but this model's are {inputs.dtype} "
                f"(token ids or labels cannot be blended); set distill's mixup to 0"
            )
        concentration = torch.tensor(float(self.mixup))
        weights = torch.distributions.Beta(concentration, concentration).sample((len(inputs),))
        weights = weights.to(inputs.device, inputs.dtype).view(-1, *([1] * (inputs.dim() - 1)))
        partners = inputs[torch.randperm(len(inputs), device=inputs.device)]
        return weights * inputs + (1 - weights) * partners

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor, inputs) -> torch.Tensor:
        """The blended loss of one batch.

        Args:
            outputs: the student's outputs for `inputs`.
            targets: the batch's targets, one per row of `outputs` or, with mixup, per row of
                its first part (the mixed rows that follow have none).
            inputs: the batch's inputs (one tensor, or a tuple or dict of them), which the
                teacher sees (without gradients).

        Returns:
            `alpha` x the task's distillation loss (over every row) + (1 - `alpha`) x its
            ordinary loss (over the rows with targets); the ordinary loss alone when `alpha` is 0
            (the teacher is not run).
        """
        hard = self.task.loss(outputs[: len(targets)], targets)
        if self.alpha == 0:
            return hard
        self.teacher.to(outputs.device)
        with torch.no_grad():
            teacher_outputs = call(self.teacher, inputs)
        soft = self.task.distillation(outputs, teacher_outputs, self.temperature)
        return self.alpha * soft + (1 - self.alpha) * hard


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch.

    Args:
        student_logits: the student's logits, one row per example.
        teacher_logits: the teacher's logits, the same shape.
        temperature: T, which softens both distributions.

    Returns:
        A scalar tensor.
    """
    return classification().distillation(student_logits, teacher_logits, temperature)
