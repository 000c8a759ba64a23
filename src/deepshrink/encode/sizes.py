"""Where every byte went: one size accounting for the whole project, beside the container.

`parameter_bytes` is the baseline every ratio divides (fp32 parameters, each weight once);
`size_report` reads a written file's header and gives the paper's per-layer columns (Tables
2-5) from the encoded bytes; `encoded_bytes` and `sparse_fp32_bytes` size a model without
writing a file (the Figure 6 sweep).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from torch import nn

from deepshrink.encode import container
from deepshrink.tables import render_table


def parameter_bytes(model: nn.Module) -> int:
    """4 bytes per floating-point parameter, each weight once: a pruned or shared weight counts as
    its shape (not as original + mask or codebook); buffers (BatchNorm statistics, masks) do not count.

    Args:
        model: the model.

    Returns:
        The bytes.
    """
    from deepshrink.layers import plain_state_dict

    trainable = {name for name, _ in model.named_parameters()}
    total = 0
    for key, tensor in plain_state_dict(model, stand_ins=True).items():  # shapes and dtypes are enough
        owner, _, leaf = key.rpartition(".")
        original = f"{owner}.parametrizations.{leaf}.original" if owner else f"parametrizations.{leaf}.original"
        if tensor.is_floating_point() and (key in trainable or original in trainable):
            total += tensor.numel()
    return 4 * total


def encoded_bytes(model: nn.Module, settings, metadata: dict | None = None) -> int:
    """The size of `model` as a .dcz file with these EncodeSettings, without writing one.

    Args:
        model: the model.
        settings: the EncodeSettings.
        metadata: what the file's header records besides the tensors (the pipeline's recipe,
            stage key and provenance: about 400 bytes compressed, 3% of a 12 KB file).

    Returns:
        The file's size in bytes.
    """
    from deepshrink.encode.codec import encode_model

    header, buffers = encode_model(
        model,
        index_bits=settings.index_bits,
        layout=settings.layout,
        coder=settings.coder,
        unshared=settings.unshared,
        metadata=metadata,
    )
    return len(container.to_bytes(header, buffers))


def sparse_fp32_bytes(model: nn.Module, settings) -> int:
    """Bytes of a pruned, unquantized model: 32-bit values in the encoder's relative-index layout
    (with these EncodeSettings' gap widths), plus the other tensors raw.

    Args:
        model: the pruned model.
        settings: the EncodeSettings (their gap widths).

    Returns:
        The bytes.
    """
    from deepshrink.encode.codec import index_widths
    from deepshrink.encode.sparse import to_sparse
    from deepshrink.layers import compressible_weights, plain_state_dict

    layers = compressible_weights(model)
    widths = index_widths(layers, settings.index_bits)
    weights = {layer.key: name for name, layer in layers.items()}
    aliases = {key for layer in layers.values() for key in layer.alias_keys}  # stored once, as "same"
    bits = 0
    for key, tensor in plain_state_dict(model).items():
        if key in aliases:
            continue
        if key not in weights:
            bits += 32 * tensor.numel()
            continue
        occupied = (tensor.detach().cpu().numpy() != 0).astype(np.uint8)
        layout = settings.layout if settings.layout != "dense" else "csr"
        sparse = to_sparse(occupied, widths[weights[key]], layout)
        bits += len(sparse.gaps) * (32 + widths[weights[key]])
    return math.ceil(bits / 8)


@dataclass(frozen=True)
class LayerSize:
    """One row of the paper's Tables 2-5, from the encoded bytes."""

    name: str
    weights: int
    kept: int
    bytes: int  # the record's buffers
    weight_bits: int | None = None  # P+Q: bits per code
    weight_bits_coded: float | None = None  # P+Q+H: coded bits per entry
    index_bits: int | None = None
    index_bits_coded: float | None = None
    fixed_bits: int | None = None  # the P+Q size in bits: entries x (bits + index bits) + codebook + counts
    same_as: str | None = None  # a tied weight's other name: stored once, under this record's name

    @property
    def rate(self) -> float:
        """The tensor's compression: 32-bit weights over its stored bits."""
        return 32 * self.weights / (8 * self.bytes) if self.bytes else float("inf")

    @property
    def rate_fixed(self) -> float | None:
        """The compression before entropy coding (fixed-width codes and gaps), None for raw tensors."""
        return 32 * self.weights / self.fixed_bits if self.fixed_bits else None


def size_report(header: dict, file_bytes: int | None = None) -> tuple[list[LayerSize], dict]:
    """Per-tensor sizes and totals from a header with its buffer table (container.read_header).

    Args:
        header: the header with its buffer table.
        file_bytes: the written file's size, where there is one; without it the size is that of
            the file this version would write (a file of an older format has another header size).

    Returns:
        (rows, totals): a LayerSize per tensor, and {"file_bytes", "header_bytes" (the preamble,
        header and padding: what no tensor owns), "fp32_parameter_bytes", "compression",
        "weights", "kept", "all_weights", "all_kept"}.
    """
    lengths = container.buffer_lengths(header)
    rows = []
    for record in header["tensors"]:
        shape = record["shape"]
        weights = 1
        for side in shape:
            weights *= side
        if record["encoding"] == "same":
            rows.append(LayerSize(record["name"], weights, weights, 0, same_as=record["as"]))
            continue
        if record["encoding"] in ("raw", "zstd"):
            rows.append(LayerSize(record["name"], weights, weights, lengths[record["data"]]))
            continue
        streams = record["streams"]
        owned = [record["codebook"]] + [
            stream[key] for stream in streams.values() for key in ("buffer", "lengths") if key in stream
        ]
        size = sum(lengths[index] for index in owned)
        entries = max(record["entries"], 1)
        codebook_bits = 32 * (lengths[record["codebook"]] // 4)
        sparse = record["layout"] != "dense"
        index_bits = record["index_bits"] if sparse else 0
        # The counts at their fixed width even where rANS coded them (2.6): P+Q has no entropy coding.
        counts_fixed_bits = streams["counts"]["symbols"] * streams["counts"]["width"] if sparse else 0
        # The used columns (2.7) are part of the index: one bit per column at fixed width, coded bits after.
        used_fixed_bits = streams["used"]["symbols"] if "used" in streams else 0
        used_bits = streams["used"]["bits"] if "used" in streams else 0
        fixed = entries * (record["bits"] + index_bits) + codebook_bits + counts_fixed_bits + used_fixed_bits
        rows.append(
            LayerSize(
                record["name"],
                weights,
                record["nonzeros"],
                size,
                weight_bits=record["bits"],
                weight_bits_coded=streams["codes"]["bits"] / entries,
                index_bits=index_bits if sparse else None,
                index_bits_coded=(streams["gaps"]["bits"] + used_bits) / entries if sparse else None,
                fixed_bits=fixed,
            )
        )
    metadata = header.get("metadata") or {}
    if file_bytes is None:
        file_bytes = (
            container.PREAMBLE.size
            + _header_bytes(header)
            + sum(length + (-length % container.ALIGNMENT) for length in lengths)
        )
    stored = [row for row in rows if row.same_as is None]  # a tensor under two names counts once
    parameter_bytes = metadata.get("fp32_parameter_bytes") or 4 * sum(row.weights for row in stored)
    totals = {
        "file_bytes": file_bytes,
        "header_bytes": file_bytes - sum(row.bytes for row in rows),
        "fp32_parameter_bytes": parameter_bytes,
        "compression": parameter_bytes / file_bytes,
        # Among the weight-shared tensors only, and among every tensor in the file (a tensor
        # stored raw keeps all its values): the two differ for a partly compressed model.
        "weights": sum(row.weights for row in stored if row.weight_bits is not None),
        "kept": sum(row.kept for row in stored if row.weight_bits is not None),
        "all_weights": sum(row.weights for row in stored),
        "all_kept": sum(row.kept for row in stored),
    }
    return rows, totals


def _header_bytes(header: dict) -> int:
    return len(container.encode_header(header))


def format_size_table(rows: list[LayerSize], totals: dict, markdown: bool = False) -> str:
    """The paper's per-layer columns, then the whole file against fp32 parameters.

    Args:
        rows: from size_report.
        totals: from size_report.
        markdown: a Markdown table.

    Returns:
        The table and a totals line.
    """
    header = [
        "layer",
        "#weights",
        "weights% (P)",
        "weight bits (P+Q)",
        "weight bits (P+Q+H)",
        "index bits (P+Q)",
        "index bits (P+Q+H)",
        "compress rate (P+Q)",
        "compress rate (P+Q+H)",
        "bytes",
    ]

    def number(value, pattern="{:.2f}"):
        return "-" if value is None else pattern.format(value)

    body = []
    for row in rows:
        if row.weight_bits is None and len(rows) > 12 and row.weights < 1000:
            continue  # long models: skip small raw tensors (biases) in the text table; totals keep them
        if row.same_as is not None:
            body.append([f"{row.name} (is {row.same_as})", f"{row.weights:,}", *["-"] * 7, "0"])
            continue
        body.append(
            [
                row.name,
                f"{row.weights:,}",
                f"{100 * row.kept / max(row.weights, 1):.1f}%",
                number(row.weight_bits, "{}"),
                number(row.weight_bits_coded, "{:.2f}"),
                number(row.index_bits, "{}"),
                number(row.index_bits_coded, "{:.2f}"),
                number(row.rate_fixed, "{:.1f}x"),
                f"{row.rate:.1f}x",
                f"{row.bytes:,}",
            ]
        )
    if totals["weights"] and totals["weights"] != totals["all_weights"]:
        body.append(
            [
                "weight-shared tensors",
                f"{totals['weights']:,}",
                f"{100 * totals['kept'] / totals['weights']:.1f}%",
                *[""] * 7,
            ]
        )
    body.append(["header and padding", *[""] * 8, f"{totals['header_bytes']:,}"])
    body.append(
        [
            "total (file)",
            f"{totals['all_weights']:,}",
            f"{100 * totals['all_kept'] / max(totals['all_weights'], 1):.1f}%",
            "",
            "",
            "",
            "",
            "",
            f"{totals['compression']:.1f}x",
            f"{totals['file_bytes']:,}",
        ]
    )
    return render_table(header, body, markdown)
