"""Saving a compressed model as a .dcz file, loading it back, and where every bit went.

Every size here is counted from the real encoded bytes: the buffers each tensor record owns,
plus the file's header and padding in the totals.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from torch import nn

from deepshrink import __version__
from deepshrink.encode import container
from deepshrink.encode.codec import decode_state_dict, encode_model
from deepshrink.encode.sizes import parameter_bytes
from deepshrink.errors import FormatError
from deepshrink.loading import STRUCTURE_KEY, model_for


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
    header, buffers = encode_model(
        model,
        index_bits=index_bits,
        layout=layout,
        coder=coder,
        metadata={
            "model": model_name,
            "library": f"deepshrink {__version__}",
            "fp32_parameter_bytes": parameter_bytes(model),
            **(metadata or {}),
        },
    )
    return container.write(path, header, buffers, protect=protect)


def read_state_dict(path: str | os.PathLike):
    """The decoded plain state_dict and the file's metadata."""
    loaded = container.read(path)
    return decode_state_dict(loaded.header, loaded.buffers), loaded.header.get("metadata", {})


def load_compressed(path: str | os.PathLike, model: nn.Module | str | None = None) -> tuple[nn.Module, dict]:
    """The model of a .dcz file with its decoded weights (bit-exact), and the file's metadata.

    `model` is the module to load into, a registered name or package.module:factory, or None for
    the name the file records (a user factory the file names is imported only when passed here:
    a file must not choose what code we run). Raises FormatError for a malformed file or tensors
    that do not fit the model, ModelError when no model can be built.
    """
    state, metadata = read_state_dict(path)
    built, name = model_for(
        path, model, metadata.get("model"), structure=metadata.get(STRUCTURE_KEY), error=FormatError
    )
    try:
        built.load_state_dict(state)
    except RuntimeError as error:
        raise FormatError(f"{path}: the decoded tensors do not fit model {name!r}: {error}") from error
    return built, metadata


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
