"""The teacher that distillation retrains against.

By default, the teacher is the reference: the model the user gave, as Deep Compression's recipes
here have always distilled. The recipe's `teacher` section makes it an ensemble instead: the
mean of the outputs of several trained copies of the same model. An ensemble labels the data
better than any one of its members, and a compressed student distilled from it keeps more of the
reference's accuracy:
- five LeNet-300-100s score 90.3% test, against 89.6-90.1% each;
- at 3.4% of the weights the student is 0.4-0.6 points higher on validation and 0.2-0.4 on
  test, on two seeds (BENCHMARKS.md, "An ensemble of references as the teacher"), about what
  the same teacher gives a dense network on test.

The members are the reference and copies trained by a registered model's own reference
settings at seeds 1, 2, ... (cached like the reference), the user's other checkpoints of the
model, or both. The outputs are averaged as they come (logits for classification), which suits every
task's distillation loss: the mean of regressions, and logits whose softmax is a geometric
mean of the members' probabilities.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from deepshrink.errors import CheckpointError, ConfigError, ModelError
from deepshrink.settings import between, check_fields

__all__ = ["Ensemble", "TeacherSettings", "build_teacher"]


@dataclass(frozen=True)
class TeacherSettings:
    """What distillation retrains against: the mean of the reference and more trained copies."""

    references: int = field(
        default=1,
        metadata=between(
            1,
            64,
            help="how many references the teacher averages: the reference and N-1 more, trained with a registered "
            "model's reference settings at seeds 1 to N-1 and cached",
        ),
    )
    checkpoints: list[str] = field(
        default_factory=list,
        metadata={
            "help": "other trained copies of the model (.safetensors, or a .pt/.pth state_dict), averaged with "
            "the reference"
        },
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.references == 1 and not self.checkpoints:
            raise ConfigError(
                "with references: 1 and no checkpoints the teacher is the reference alone, the default; "
                "set references: N (N > 1) or list checkpoints, or leave the section out"
            )

    @property
    def members(self) -> int:
        """How many models the teacher averages."""
        return self.references + len(self.checkpoints)


class Ensemble(nn.Module):
    """The mean of its members' outputs, each member frozen in eval mode."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.eval()
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> Ensemble:
        """Stay in eval mode: a teacher's BatchNorm and dropout never train.

        Args:
            mode: ignored.

        Returns:
            The ensemble.
        """
        return super().train(False)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """The members' outputs, averaged.

        Args:
            *args: the inputs, passed to every member.
            **kwargs: the inputs by keyword, passed to every member.

        Returns:
            The mean output.

        Raises:
            ModelError: a member returns something other than one tensor, or the members'
                outputs differ in shape.
        """
        outputs = [member(*args, **kwargs) for member in self.members]
        if not all(isinstance(output, torch.Tensor) for output in outputs):
            raise ModelError("a teacher's members should each return one tensor; set the recipe's `output`")
        if len({tuple(output.shape) for output in outputs}) != 1:
            shapes = ", ".join(str(tuple(output.shape)) for output in outputs)
            raise ModelError(
                f"the teacher's members return outputs of different shapes ({shapes}); give copies of one model"
            )
        return torch.stack(outputs).mean(0)


def build_teacher(
    settings: TeacherSettings,
    reference: nn.Module,
    model_name: str,
    splits,
    *,
    prepare=lambda model: model,
    device="cpu",
    progress: bool = True,
) -> Ensemble:
    """The ensemble the recipe's `teacher` section asks for.

    Args:
        settings: the recipe's teacher section.
        reference: the reference (a member, copied; never changed).
        model_name: the registered model's name, for trained members.
        splits: the run's DataSplits (trained members learn from its training split), or None.
        prepare: what is done to every other member to make it answer as the reference does
            (select the recipe's output).
        device: where members are trained.
        progress: progress bars while members train.

    Returns:
        The Ensemble, on the CPU, in eval mode.

    Raises:
        ConfigError: trained members asked for without a registered model or without data.
        CheckpointError: a checkpoint is unreadable or does not fit the model.
    """
    from deepshrink.checkpoint import load_checkpoint, load_state_into
    from deepshrink.data import DataSplits
    from deepshrink.models import get_model_spec
    from deepshrink.references import reference_model

    members = [copy.deepcopy(reference).cpu()]
    # The checkpoints first: a wrong path is found before any member trains.
    for path in settings.checkpoints:
        try:
            member = load_state_into(copy.deepcopy(members[0]), load_checkpoint(path), path)
        except CheckpointError as error:
            raise CheckpointError(f"teacher: checkpoints: {error}") from error
        members.append(prepare(member))
    if settings.references > 1:
        try:
            get_model_spec(model_name)
        except ModelError:
            raise ConfigError(
                f"teacher: references: {settings.references} trains copies by a registered model's reference settings, "
                f"and {model_name!r} is not one; list your other trained copies under teacher: checkpoints instead"
            ) from None
        if not isinstance(splits, DataSplits) or not splits.labelled:
            raise ConfigError(
                f"teacher: references: {settings.references} trains copies of {model_name}, which needs data with "
                "targets; give such data, or list trained copies under teacher: checkpoints"
            )
        for seed in range(1, settings.references):
            trained = reference_model(model_name, splits, seed=seed, device=device, progress=progress)
            members.append(prepare(trained.model.cpu()))
    return Ensemble(members)
