"""Fixed-point <IL, FL> quantization with round-to-nearest or stochastic rounding (Gupta et al. 2015).

A signed <IL, FL> number has IL integer bits (the sign bit included) and FL fractional bits:
word length IL + FL, resolution eps = 2^-FL, range [-2^(IL-1), 2^(IL-1) - eps]. Values outside
the range saturate to its ends.

Stochastic rounding rounds x up to the next multiple of eps with probability (x - floor(x)) / eps
and down otherwise, so E[round(x)] = x: small updates survive on average where round-to-nearest
would erase every update smaller than eps / 2. That is what makes training with 16-bit (and
often 8-bit) fixed-point parameters work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deepshrink.errors import ConfigError

ROUNDINGS = ("nearest", "stochastic")


@dataclass(frozen=True)
class FixedPointFormat:
    integer_bits: int
    fraction_bits: int

    def __post_init__(self) -> None:
        if not isinstance(self.integer_bits, int) or self.integer_bits < 1:
            raise ConfigError(f"integer_bits={self.integer_bits!r} should be >= 1 (it includes the sign bit)")
        if not isinstance(self.fraction_bits, int) or self.fraction_bits < 0:
            raise ConfigError(f"fraction_bits={self.fraction_bits!r} should be a non-negative integer")
        if self.integer_bits + self.fraction_bits > 32:
            raise ConfigError(f"<{self.integer_bits}, {self.fraction_bits}> is wider than 32 bits")

    @property
    def resolution(self) -> float:
        """The grid step, 2^-fraction_bits."""
        return 2.0**-self.fraction_bits

    @property
    def minimum(self) -> float:
        """The most negative value, -2^(integer_bits - 1)."""
        return -(2.0 ** (self.integer_bits - 1))

    @property
    def maximum(self) -> float:
        """The largest value, 2^(integer_bits - 1) - resolution."""
        return 2.0 ** (self.integer_bits - 1) - self.resolution

    @property
    def word_length(self) -> int:
        """The bits per value: integer_bits + fraction_bits."""
        return self.integer_bits + self.fraction_bits


def quantize_fixed_point(
    values: torch.Tensor,
    number_format: FixedPointFormat,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Round `values` onto the <IL, FL> grid, saturating at the range limits.

    Args:
        values: the values.
        number_format: the <IL, FL> format.
        rounding: "nearest" or "stochastic".
        generator: the random source of stochastic rounding.

    Returns:
        The rounded values, `values`' dtype.

    Raises:
        ConfigError: an unknown rounding.
    """
    if rounding not in ROUNDINGS:
        raise ConfigError(f"rounding={rounding!r} should be one of {', '.join(ROUNDINGS)}")
    scaled = values.double() / number_format.resolution
    if rounding == "nearest":
        steps = torch.floor(scaled + 0.5)
    else:
        noise = torch.rand(values.shape, generator=generator, dtype=torch.float64, device="cpu").to(values.device)
        steps = torch.floor(scaled + noise)
    low = number_format.minimum / number_format.resolution
    high = number_format.maximum / number_format.resolution
    return (steps.clamp(low, high) * number_format.resolution).to(values.dtype)


class FixedPointParameters:
    """Keeps a model's parameters in fixed point during training: call it after every step.

    Use as `fit(..., after_step=FixedPointParameters(fmt, "stochastic"))`: each optimizer step
    is computed in float, then every parameter is rounded back onto the grid, so the stored
    model is always a fixed-point model, as in Gupta et al.'s limited-precision training.
    """

    def __init__(self, number_format: FixedPointFormat, rounding: str = "stochastic", seed: int = 0) -> None:
        if rounding not in ROUNDINGS:
            raise ConfigError(f"rounding={rounding!r} should be one of {', '.join(ROUNDINGS)}")
        self.number_format = number_format
        self.rounding = rounding
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def __call__(self, model: nn.Module, step: int = 0) -> None:
        """Round every parameter of `model` onto the grid, in place.

        Args:
            model: the model.
            step: the optimizer step (the after_step protocol of `fit`; unused).
        """
        for parameter in model.parameters():
            parameter.copy_(quantize_fixed_point(parameter, self.number_format, self.rounding, self.generator))
