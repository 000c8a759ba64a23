"""How a settings dataclass declares its fields' choices and ranges, and checks them.

Every stage's settings (deepshrink.stages) and the recipe's other sections are frozen
dataclasses whose field metadata carries the allowed values. The YAML reader (recipe.py), the
command line (cli.py) and settings built in Python all read that one declaration, so a default,
a choice or a range is written once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from deepshrink.errors import ConfigError


def choices(*values: str, help: str = "") -> dict:  # noqa: A002 - the argparse word
    """Field metadata: the value is one of `values`.

    Args:
        *values: the allowed values.
        help: the option's help text.

    Returns:
        The metadata dict for `dataclasses.field(metadata=...)`.
    """
    return {"choices": values, "help": help}


def between(
    low: float | None = None,
    high: float | None = None,
    *,
    open_high: bool = False,
    help: str = "",  # noqa: A002
) -> dict:
    """Field metadata: low <= value <= high (value < high with `open_high`).

    Args:
        low: the smallest value allowed, or None.
        high: the largest value allowed, or None.
        open_high: exclude `high` itself.
        help: the option's help text.

    Returns:
        The metadata dict for `dataclasses.field(metadata=...)`.
    """
    return {"low": low, "high": high, "open_high": open_high, "help": help}


def layer_globs(inner: dict | None = None, help: str = "") -> dict:  # noqa: A002
    """Field metadata: a {layer glob: value} mapping (or a list of globs), whose globs a recipe
    checks against the model's layers before any work; `inner` constrains the values.

    Args:
        inner: metadata (choices, a range) that each value must meet.
        help: the option's help text.

    Returns:
        The metadata dict for `dataclasses.field(metadata=...)`.
    """
    return {**(inner or {}), "layer_globs": True, "help": help or (inner or {}).get("help", "")}


def check_fields(settings) -> None:
    """Choices and ranges from the field metadata, for settings built in Python (the YAML reader
    checks the same before, with the line of each value).

    Args:
        settings: a settings dataclass instance.

    Raises:
        ConfigError: a field's value breaks its metadata.
    """
    for item in dataclasses.fields(settings):
        value = getattr(settings, item.name)
        if value is None or not item.metadata:
            continue
        if item.metadata.get("layer_globs") and isinstance(value, list):
            continue  # a list of globs: nothing to range-check
        values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
        for single in values:
            check_value(single, item.metadata, f"{item.name}={single!r}")


def check_value(value, metadata, what: str) -> None:
    """One value against a field's metadata; `what` starts the error message.

    Args:
        value: the value to check.
        metadata: the field's metadata (from `choices`, `between` or `layer_globs`).
        what: the start of the error message ("bits=3").

    Raises:
        ConfigError: the value is not one of the choices, not a number, or out of range.
    """
    allowed = metadata.get("choices")
    if allowed and value not in allowed:
        raise ConfigError(f"{what} should be one of {', '.join(allowed)}")
    low, high = metadata.get("low"), metadata.get("high")
    if isinstance(value, bool) or (low is not None and not isinstance(value, int | float)):
        raise ConfigError(f"{what} should be a number")
    if low is not None and value < low:
        raise ConfigError(f"{what} should be at least {low}")
    if high is not None and (value >= high if metadata.get("open_high") else value > high):
        raise ConfigError(f"{what} should be {'below' if metadata.get('open_high') else 'at most'} {high}")


def optimizer_field(what: str) -> dataclasses.Field:
    """A stage's `optimizer` setting: SGD with momentum by default (the paper's), recorded in a
    recipe's record only when set, so that the keys of recipes without it stay as they were.

    Args:
        what: what it trains, for the help ("retraining", "fine-tuning").

    Returns:
        The dataclass field.
    """
    from deepshrink.train import OPTIMIZERS

    return field(
        default="sgd",
        metadata=choices(
            *OPTIMIZERS,
            help=f"{what} optimizer: sgd (with momentum, the paper's), adam, or adamw (what transformers are "
            "trained with; SGD at a CNN's learning rate can wreck one)",
        )
        | {"recorded_when_set": True},
    )


@dataclass(frozen=True)
class DistillSettings:
    """Retrain against the reference's soft targets as well as the labels (Hinton et al. 2015)."""

    temperature: float = field(default=4.0, metadata=between(1e-6, help="softmax temperature of both models"))
    alpha: float = field(default=0.5, metadata=between(0.0, 1.0, help="weight of the soft-target loss"))
    mixup: float = field(
        default=0.0,
        metadata=between(0.0, help="Beta concentration of the mixed examples the teacher also labels; 0: none")
        | {"recorded_when_set": True},
    )

    def __post_init__(self) -> None:
        check_fields(self)
