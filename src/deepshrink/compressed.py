"""Saving a compressed model as a .dcz file, loading it back, and where every bit went.

Every size here is counted from the real encoded bytes: the buffers each tensor record owns,
plus the file's header and padding in the totals.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from deepshrink import __version__
from deepshrink.encode import container
from deepshrink.encode.codec import decode_state_dict, encode_model
from deepshrink.errors import ConfigError, FormatError, ModelError
from deepshrink.tables import render_table


def save_compressed(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    model_name: str,
    metadata: dict | None = None,
    index_bits: dict[str, int] | None = None,
    layout: str = "csr",
    coder: str = "huffman",
    protect: tuple = (),
) -> Path:
    """Encode `model` (pruned and weight-shared layers compressed, the rest raw) into `path`."""
    parameters = sum(parameter.numel() for parameter in _effective_parameters(model))
    header, buffers = encode_model(
        model,
        index_bits=index_bits,
        layout=layout,
        coder=coder,
        metadata={
            "model": model_name,
            "library": f"deepshrink {__version__}",
            "fp32_parameter_bytes": 4 * parameters,
            **(metadata or {}),
        },
    )
    return container.write(path, header, buffers, protect=protect)


def _effective_parameters(model: nn.Module):
    """Each weight once: a parametrized weight counts as its shape, not as original + codebook."""
    from deepshrink.layers import plain_state_dict

    trainable = {name for name, _ in model.named_parameters()}
    for key, tensor in plain_state_dict(model).items():
        owner = key.rsplit(".", 1)[0]
        if key in trainable or f"{owner}.parametrizations.{key.rsplit('.', 1)[-1]}.original" in trainable:
            yield tensor


def read_state_dict(path: str | os.PathLike):
    """The decoded plain state_dict and the file's metadata."""
    loaded = container.read(path)
    return decode_state_dict(loaded.header, loaded.buffers), loaded.header.get("metadata", {})


def load_compressed(path: str | os.PathLike, model_name: str | None = None) -> tuple[nn.Module, dict]:
    """Build the model a .dcz file names and load its decoded weights (bit-exact).

    A user factory named in the file is imported only when passed as `model_name`: a file must
    not choose what code we run.
    """
    from deepshrink.models import build_model, is_factory_path

    state, metadata = read_state_dict(path)
    name = model_name or metadata.get("model")
    if not isinstance(name, str):
        raise ModelError(f"{path}: the file does not name its model; pass --model NAME or package.module:factory")
    if model_name is None and is_factory_path(name):
        raise ModelError(f"{path}: made from the user factory {name!r}; pass --model {name} to allow importing it")
    model = build_model(name)
    try:
        from deepshrink.checkpoint import STRUCTURE_KEY
        from deepshrink.lowrank import apply_structure

        apply_structure(model, metadata.get(STRUCTURE_KEY))
        model.load_state_dict(state)
    except (RuntimeError, ConfigError) as error:
        raise FormatError(f"{path}: the decoded tensors do not fit model {name!r}: {error}") from error
    return model, metadata


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

    @property
    def rate(self) -> float:
        return 32 * self.weights / (8 * self.bytes) if self.bytes else float("inf")

    @property
    def rate_fixed(self) -> float | None:
        return 32 * self.weights / self.fixed_bits if self.fixed_bits else None


def size_report(header: dict) -> tuple[list[LayerSize], dict]:
    """Per-tensor sizes and totals from a header with its buffer table (container.read_header)."""
    table = header["buffers"]
    rows = []
    for record in header["tensors"]:
        shape = record["shape"]
        weights = 1
        for side in shape:
            weights *= side
        if record["encoding"] == "raw":
            rows.append(LayerSize(record["name"], weights, weights, table[record["data"]]["length"]))
            continue
        streams = record["streams"]
        owned = [record["codebook"]] + [
            stream[key] for stream in streams.values() for key in ("buffer", "lengths") if key in stream
        ]
        size = sum(table[index]["length"] for index in owned)
        entries = max(record["entries"], 1)
        codebook_bits = 32 * (table[record["codebook"]]["length"] // 4)
        sparse = record["layout"] != "dense"
        index_bits = record["index_bits"] if sparse else 0
        fixed = entries * (record["bits"] + index_bits) + codebook_bits + (streams["counts"]["bits"] if sparse else 0)
        rows.append(
            LayerSize(
                record["name"],
                weights,
                record["nonzeros"],
                size,
                weight_bits=record["bits"],
                weight_bits_coded=streams["codes"]["bits"] / entries,
                index_bits=index_bits if sparse else None,
                index_bits_coded=streams["gaps"]["bits"] / entries if sparse else None,
                fixed_bits=fixed,
            )
        )
    metadata = header.get("metadata", {})
    file_bytes = (
        container.PREAMBLE.size
        + _header_bytes(header)
        + sum(entry["length"] + (-entry["length"] % container.ALIGNMENT) for entry in table)
    )
    parameter_bytes = metadata.get("fp32_parameter_bytes") or 4 * sum(row.weights for row in rows)
    totals = {
        "file_bytes": file_bytes,
        "fp32_parameter_bytes": parameter_bytes,
        "compression": parameter_bytes / file_bytes,
        "weights": sum(row.weights for row in rows if row.weight_bits is not None),
        "kept": sum(row.kept for row in rows if row.weight_bits is not None),
    }
    return rows, totals


def _header_bytes(header: dict) -> int:
    return len(container.encode_header(header))


def format_size_table(rows: list[LayerSize], totals: dict, markdown: bool = False) -> str:
    """The paper's per-layer columns, then the whole file against fp32 parameters."""
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
    kept = totals["kept"] / max(totals["weights"], 1)
    body.append(
        [
            "total (file)",
            f"{totals['fp32_parameter_bytes'] // 4:,}",
            f"{100 * kept:.1f}%",
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


def plot_distributions(path: str | os.PathLike, out: str | os.PathLike, layer: str | None = None) -> Path:
    """Han et al. (2016) Figure 5 for one layer of a .dcz file (the largest by default):
    how often each weight code and each index gap occurs, which is what Huffman exploits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deepshrink.encode.codec import stream_histograms
    from deepshrink.tables import save_figure

    loaded = container.read(path)
    histograms = stream_histograms(loaded.header, loaded.buffers)
    if not histograms:
        raise FormatError(f"{path}: no weight-shared tensor to plot")
    name = layer or max(histograms, key=lambda key: histograms[key]["codes"].sum())
    panels = [("codes", "weight code (0 = zero / filler)")] + (
        [("gaps", "index gap")] if "gaps" in histograms[name] else []
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), dpi=120, squeeze=False)
    for axis, (stream, label) in zip(axes[0], panels, strict=True):
        counts = histograms[name][stream]
        axis.bar(np.arange(len(counts)), counts, width=1.0, color="tab:blue")
        axis.set_xlabel(label)
        axis.set_ylabel("count")
        axis.set_title(f"{name}: distribution of {stream}")
    return save_figure(figure, out)
