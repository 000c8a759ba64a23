"""Linear and Conv2d layers that compute from the compressed form: CSR codes plus a codebook.

The weights are never expanded to a dense float tensor: a layer holds row pointers, column
indices, one code per kept weight and the codebook. Convolutions unfold their input (im2col)
and go through the same sparse product. These layers are for inference: they take no part in
autograd and run on the CPU.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from deepshrink.errors import ModelError
from deepshrink.runtime.kernels import (
    BLOCK,
    GROUPED_MAXIMUM_CODES,
    codebook_matmul,
    codebook_matvec,
    group_by_code,
    grouped_matmul,
    grouped_matvec,
    grouped_nbytes,
)

# Measured (benchmarks/inference_speed.py): at batch 1 the codebook kernel beats dense torch
# below this density; above it the dense layer is as fast and simpler.
SPARSE_DENSITY_LIMIT = 0.35

# The grouped form runs 2-2.5x faster than one code per entry on large layers even where it is
# a little larger (AlexNet's fc7: 1.04x the bytes), so it is given up only where padding makes it
# far larger, as in small layers with many codes (4-10x in SqueezeNet's Fire modules).
GROUPED_SIZE_LIMIT = 2.0


class CodebookWeight:
    """A weight matrix (rows x columns) as CSR over codebook indices.

    With at most 256 codes the entries of each row are grouped by code, each code's run padded
    to whole blocks (kernels.group_by_code): the layer keeps row pointers, column indices and
    per-row block counts per code. Otherwise, or when padding and block counts would make that
    form more than GROUPED_SIZE_LIMIT times larger than one code per entry (a small layer with
    many codes: a 16 x 32 1x1 conv at 35% density and 6 bits grew from about 0.7 KB to 7 KB
    grouped), it keeps one code per entry.
    """

    def __init__(self, indptr, columns, codes, codebook, shape: tuple[int, int], grouped: bool | None = None) -> None:
        self.codebook = np.ascontiguousarray(codebook, dtype=np.float32)
        self.shape = shape
        self.nonzeros = len(columns)
        indptr = np.ascontiguousarray(indptr, dtype=np.int64)
        columns, codes = np.ascontiguousarray(columns), np.ascontiguousarray(codes)
        if grouped is None:
            grouped = len(self.codebook) <= GROUPED_MAXIMUM_CODES and grouped_nbytes(
                indptr, columns, codes, len(self.codebook), shape[1]
            ) <= GROUPED_SIZE_LIMIT * (columns.nbytes + codes.nbytes)
        if grouped:
            self.indptr, self.blocks, self.columns = group_by_code(indptr, columns, codes, len(self.codebook), shape[1])
            self.codes = None
        else:
            self.indptr, self.blocks, self.columns, self.codes = indptr, None, columns, codes

    @property
    def density(self) -> float:
        return self.nonzeros / max(self.shape[0] * self.shape[1], 1)

    @property
    def nbytes(self) -> int:
        """What this weight keeps resident: pointers, indices, codes or block counts, codebook."""
        per_entry = self.codes.nbytes if self.codes is not None else self.blocks.nbytes
        return self.indptr.nbytes + self.columns.nbytes + per_entry + self.codebook.nbytes

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, column, code) of every kept weight, padding left out."""
        rows = np.repeat(np.arange(self.shape[0]), np.diff(self.indptr))
        if self.codes is not None:
            return rows, self.columns.astype(np.int64), self.codes.astype(np.int64)
        codes = np.repeat(np.tile(np.arange(len(self.codebook)), self.shape[0]), self.blocks.reshape(-1) * BLOCK)
        real = self.columns != self.shape[1]
        return rows[real], self.columns[real].astype(np.int64), codes[real]

    def times(self, inputs: np.ndarray) -> np.ndarray:
        """W @ inputs for inputs of shape (columns,) or (columns, batch), float32."""
        if self.codes is None:  # padding entries read one appended zero
            padded = np.empty((inputs.shape[0] + 1, *inputs.shape[1:]), dtype=np.float32)
            padded[:-1] = inputs
            padded[-1] = 0.0
            inputs, middle, last, matvec, matmul = padded, self.blocks, self.columns, grouped_matvec, grouped_matmul
        else:
            middle, last, matvec, matmul = self.columns, self.codes, codebook_matvec, codebook_matmul
        if inputs.ndim == 1:
            out = np.empty(self.shape[0], dtype=np.float32)
            matvec(self.indptr, middle, last, self.codebook, inputs, out)
            return out
        out = np.empty((self.shape[0], inputs.shape[1]), dtype=np.float32)
        matmul(self.indptr, middle, last, self.codebook, inputs, out)
        return out

    def to_dense(self) -> torch.Tensor:
        """The dense matrix, for the dense path and for tests; the sparse path never calls it."""
        dense = np.zeros(self.shape, dtype=np.float32)
        rows, columns, codes = self.entries()
        dense[rows, columns] = self.codebook[codes]
        return torch.from_numpy(dense)


def _as_float32_cpu(inputs: torch.Tensor, layer: str) -> np.ndarray:
    if inputs.device.type != "cpu":
        raise ModelError(
            f"{layer} runs from the compressed form on the CPU; the input is on {inputs.device}. "
            "Load with deepshrink.compressed.load_compressed for a dense model on other devices"
        )
    return inputs.detach().to(torch.float32).numpy()


class CompressedLinear(nn.Module):
    """y = x W^T + b with W held as codebook CSR."""

    def __init__(self, weight: CodebookWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight_form = weight
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        leading = inputs.shape[:-1]
        flat = _as_float32_cpu(inputs, "CompressedLinear").reshape(-1, self.in_features)
        if flat.shape[0] == 1:
            result = self.weight_form.times(np.ascontiguousarray(flat[0]))[None, :]
        else:
            result = self.weight_form.times(np.ascontiguousarray(flat.T)).T
        output = torch.from_numpy(np.ascontiguousarray(result))
        if self.bias is not None:
            output += self.bias
        return output.reshape(*leading, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"density={self.weight_form.density:.3f}, resident={self.weight_form.nbytes:,} bytes"
        )


class CompressedConv2d(nn.Module):
    """A 2-D convolution as im2col followed by the codebook CSR product (groups = 1)."""

    def __init__(self, weight: CodebookWeight, bias: torch.Tensor | None, like: nn.Conv2d) -> None:
        super().__init__()
        if like.groups != 1 or like.padding_mode != "zeros" or isinstance(like.padding, str):
            raise ModelError("the compressed convolution supports groups=1, zero padding given as numbers")
        self.weight_form = weight
        self.in_channels = like.in_channels
        self.out_channels = like.out_channels
        self.kernel_size = like.kernel_size
        self.stride = like.stride
        self.padding = like.padding
        self.dilation = like.dilation
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = inputs.shape
        columns = functional.unfold(inputs, self.kernel_size, self.dilation, self.padding, self.stride)
        positions = columns.shape[2]
        # (batch, C*kh*kw, L) -> (C*kh*kw, batch*L): one product for the whole batch.
        stacked = columns.permute(1, 0, 2).reshape(columns.shape[1], batch * positions)
        result = self.weight_form.times(np.ascontiguousarray(_as_float32_cpu(stacked, "CompressedConv2d")))
        output = torch.from_numpy(result).reshape(self.out_channels, batch, positions).permute(1, 0, 2)
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
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, density={self.weight_form.density:.3f}, "
            f"resident={self.weight_form.nbytes:,} bytes"
        )
