"""Linear and Conv2d layers that compute from the compressed form: codebook indices.

The weights are never expanded to a dense float tensor: a layer holds its codebook and one of
the index forms of forms.py. Convolutions unfold their input (im2col) and go through the same
product. These layers are for inference: they take no part in autograd and run on the CPU.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from deepshrink.errors import ConfigError, ModelError
from deepshrink.runtime.choice import BATCH_RANGES, LayerChoice, range_of, resident_bytes
from deepshrink.runtime.forms import CodebookWeight

# Measured (benchmarks/inference_speed.py): at batch 1 the codebook kernel beats dense torch
# below this density; above it the dense layer is as fast and simpler.
SPARSE_DENSITY_LIMIT = 0.35

_NO_BIAS = np.zeros(0, dtype=np.float32)


def _as_float32_cpu(inputs: torch.Tensor, layer: str) -> np.ndarray:
    if inputs.device.type != "cpu":
        raise ModelError(
            f"{layer} runs from the compressed form on the CPU; the input is on {inputs.device}. "
            "Load with deepshrink.compressed.load_compressed for a dense model on other devices"
        )
    if inputs.dtype != torch.float32:
        inputs = inputs.to(torch.float32)
    # The layer has no parameters for autograd to track; skipping detach() when nothing
    # requires a gradient saves a tensor allocation per call (a few us at batch 1).
    return (inputs.detach() if inputs.requires_grad else inputs).numpy()


class CompressedLinear(nn.Module):
    """y = x W^T + b with W held as codebook indices (a CodebookWeight)."""

    def __init__(self, weight: CodebookWeight, bias: torch.Tensor | None, choice: LayerChoice | None = None) -> None:
        super().__init__()
        self.weight_form = weight
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        self._bias_source: torch.Tensor | None = None
        self._bias_array: np.ndarray | None = None
        # Which product each batch range runs (runtime/choice.py); all compressed by default.
        self.choice = choice or LayerChoice(("compressed",) * len(BATCH_RANGES))
        self._always_compressed = all(plan == "compressed" for plan in self.choice.plans)
        # The batch-1 path: one numba call that reads the input tensor's storage by address and
        # adds the bias (kernels.py, "Batch-1 entry points"). Converting the input to numpy,
        # checking it again in the form, and adding the bias in numpy had cost about 10 us a
        # call, as much as the product itself in LeNet-300-100's fc1 with AVX-512.
        self._single_compressed = self.choice.plans[range_of(1)] == "compressed"
        self._single_shape = torch.Size((1, self.in_features))
        self._single_output = (1, self.out_features)
        self._vector_function, self._vector_arguments = weight.storage.vector_call

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs @ W.T + bias, by the form chosen for this batch size.

        Args:
            inputs: (..., in_features).

        Returns:
            (..., out_features), float32.

        Raises:
            ConfigError: the last dimension is not in_features.
        """
        if (
            self._single_compressed
            and inputs.shape == self._single_shape
            and inputs.dtype is torch.float32
            and inputs.is_cpu
            and inputs.is_contiguous()
        ):  # what float32_at needs of the address; anything else takes the general path
            result = np.empty(self._single_output, dtype=np.float32)
            self._vector_function(result, inputs.data_ptr(), self._bias_values(), *self._vector_arguments)
            return torch.from_numpy(result)
        if inputs.ndim == 0 or inputs.shape[-1] != self.in_features:
            raise ConfigError(
                f"CompressedLinear takes inputs whose last dimension is {self.in_features}, not {tuple(inputs.shape)}"
            )
        if not self._always_compressed:
            kind = self.choice.plans[range_of(inputs.numel() // self.in_features)]
            if kind == "dense":  # as a plain nn.Linear would: one call
                return functional.linear(inputs, self.choice.dense, self._buffers["bias"])
            if kind == "csr":
                return self._csr_product(inputs)
        flat = _as_float32_cpu(inputs, "CompressedLinear")
        if flat.ndim != 2:
            flat = flat.reshape(-1, self.in_features)
        result = np.ascontiguousarray(self.weight_form.product(flat))
        if self.bias is not None:
            result += self._bias_values()
        output = torch.from_numpy(result)
        return output if inputs.ndim == 2 else output.reshape(*inputs.shape[:-1], self.out_features)

    def _csr_product(self, inputs: torch.Tensor) -> torch.Tensor:
        """The product by torch's CSR form, where the load-time measurement chose it. Each torch
        call costs a few microseconds before any arithmetic, so the reshapes and the conversion
        are made only where the input needs them."""
        flat = inputs if inputs.ndim == 2 else inputs.reshape(-1, self.in_features)
        if flat.dtype is not torch.float32:
            flat = flat.to(torch.float32)
        result = (self.choice.csr @ flat.T).T
        bias = self._buffers["bias"]  # not self.bias: nn.Module's __getattr__ took 1-2 us
        if bias is not None:
            result = result + bias
        return result if inputs.ndim == 2 else result.reshape(*inputs.shape[:-1], self.out_features)

    def _bias_values(self) -> np.ndarray:
        """The bias as a numpy view (no floats without one), made again only when the buffer is
        replaced (`.to()`): converting it on every call cost about a microsecond at batch 1."""
        bias = self._buffers["bias"]  # not self.bias: nn.Module's __getattr__ took 1-2 us
        if self._bias_array is None or self._bias_source is not bias:
            self._bias_source = bias
            self._bias_array = _NO_BIAS if bias is None else bias.numpy()
        return self._bias_array

    def extra_repr(self) -> str:
        """The module's line in print(model).

        Returns:
            Its sizes, density, form, plans and resident bytes.
        """
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"density={self.weight_form.density:.3f}, form={self.weight_form.form}, "
            f"plans={'/'.join(self.choice.plans)}, resident={self.resident_bytes:,} bytes"
        )

    @property
    def resident_bytes(self) -> int:
        """The compressed form's bytes and those of any torch form the measured plans keep."""
        return self.weight_form.nbytes + resident_bytes(self.choice)


class CompressedConv2d(nn.Module):
    """A 2-D convolution as im2col followed by the codebook product (groups = 1)."""

    def __init__(
        self, weight: CodebookWeight, bias: torch.Tensor | None, like: nn.Conv2d, choice: LayerChoice | None = None
    ) -> None:
        super().__init__()
        if like.groups != 1 or like.padding_mode != "zeros" or isinstance(like.padding, str):
            raise ModelError("the compressed convolution supports groups=1, zero padding given as numbers")
        # Which product each batch range runs: compressed through im2col, or torch's dense
        # convolution where the load-time measurement on the real input size found it faster.
        self.choice = choice or LayerChoice(("compressed",) * len(BATCH_RANGES))
        self._always_compressed = all(plan == "compressed" for plan in self.choice.plans)
        self.weight_form = weight
        self.in_channels = like.in_channels
        self.out_channels = like.out_channels
        self.kernel_size = like.kernel_size
        self.stride = like.stride
        self.padding = like.padding
        self.dilation = like.dilation
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The convolution, by im2col and the compressed product, or dense where that was chosen.

        Args:
            inputs: (batch, in_channels, height, width).

        Returns:
            (batch, out_channels, height', width'), float32.

        Raises:
            ConfigError: inputs of another shape.
        """
        if inputs.ndim != 4 or inputs.shape[1] != self.in_channels:
            raise ConfigError(
                f"CompressedConv2d takes (batch, {self.in_channels}, height, width) inputs, not {tuple(inputs.shape)}"
            )
        if not self._always_compressed and self.choice.plans[range_of(inputs.shape[0])] == "dense":
            return functional.conv2d(inputs, self.choice.dense, self.bias, self.stride, self.padding, self.dilation)
        batch, _, height, width = inputs.shape
        columns = functional.unfold(inputs, self.kernel_size, self.dilation, self.padding, self.stride)
        positions = columns.shape[2]
        # (batch, C*kh*kw, L) -> (batch*L, C*kh*kw): one product for the whole batch.
        stacked = columns.transpose(1, 2).reshape(batch * positions, columns.shape[1])
        result = self.weight_form.product(_as_float32_cpu(stacked, "CompressedConv2d"))
        output = torch.from_numpy(result).reshape(batch, positions, self.out_channels).transpose(1, 2)
        if self.bias is not None:
            output = output + self.bias.view(1, -1, 1)
        out_height, out_width = (
            (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
            for size, pad, dilation, kernel, stride in zip(
                (height, width), self.padding, self.dilation, self.kernel_size, self.stride, strict=True
            )
        )
        return output.reshape(batch, self.out_channels, out_height, out_width)

    def extra_repr(self) -> str:
        """The module's line in print(model).

        Returns:
            Its sizes, stride, padding, density, form, plans and resident bytes.
        """
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, density={self.weight_form.density:.3f}, form={self.weight_form.form}, "
            f"plans={'/'.join(self.choice.plans)}, resident={self.resident_bytes:,} bytes"
        )

    @property
    def resident_bytes(self) -> int:
        """The compressed form's bytes and those of a dense weight the measured plans keep."""
        return self.weight_form.nbytes + resident_bytes(self.choice)
