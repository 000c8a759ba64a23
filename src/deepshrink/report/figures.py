"""Every figure deepshrink draws, each from a result it is given (matplotlib, PNG, written atomically).

- Figure 4 of Han et al. (2016): a layer's codebook on its weight distribution (`plot_codebooks`);
- Figure 5 of Han et al. (2016): the distributions of weight codes and index gaps that Huffman
  coding exploits (`plot_distributions`);
- Figure 6 of Han et al. (2016): the metric against compression ratio per method (`plot_tradeoff`);
- Figure 5 of Han et al. (2015): each layer's sensitivity to pruning (`plot_sensitivity`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from torch import nn

from deepshrink.errors import FormatError
from deepshrink.layers import compressible_weights
from deepshrink.tables import save_figure

if TYPE_CHECKING:
    from deepshrink.prune.sensitivity import SensitivityResult
    from deepshrink.quantize.shared import SharingRecord


def _pyplot():
    """matplotlib's pyplot on the file-only backend (no display needed), imported when drawing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_codebooks(
    model: nn.Module, records: dict[str, SharingRecord], path: str | Path, layer: str | None = None
) -> Path:
    """Han et al. (2016) Figure 4 for one layer (the largest by default).

    Left: the CDF of the non-zero weights with the initial centroids marked on it.
    Right: the weight distribution with the codebook after k-means and after fine-tuning.

    Args:
        model: the shared model (its fine-tuned codebooks).
        records: {weight name: SharingRecord}.
        path: the PNG to write.
        layer: the weight to plot (default: the largest).

    Returns:
        `path` as a Path.
    """
    plt = _pyplot()

    from deepshrink.quantize.shared import sharing_of

    layers = compressible_weights(model)
    name = layer or max(records, key=lambda key: layers[key].value.numel())
    record = records[name]
    sharing = sharing_of(layers[name])
    tuned = sharing.codebook.detach().cpu().numpy() if sharing is not None else np.unique(layers[name].value.detach())
    values = record.sample
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    cdf = np.arange(1, len(values) + 1) / len(values)
    left.plot(values, cdf, color="black", linewidth=1, label="CDF of weights")
    left.scatter(
        record.initial_centroids,
        np.interp(record.initial_centroids, values, cdf),
        s=12,
        zorder=3,
        label=f"initial centroids ({len(record.initial_centroids)})",
    )
    left.set_xlabel("weight value")
    left.set_ylabel("cumulative distribution")
    left.set_title(f"{name}: centroid initialisation")
    left.legend()
    right.hist(values, bins=200, color="lightgrey", label="weights before sharing")
    top = right.get_ylim()[1]
    right.vlines(record.centroids, 0, top * 0.5, colors="tab:blue", linewidth=0.8, label="after k-means")
    right.vlines(tuned, top * 0.5, top, colors="tab:red", linewidth=0.8, label="after fine-tuning")
    right.set_xlabel("weight value")
    right.set_ylabel("count")
    right.set_title(f"{name}: {record.bits}-bit codebook")
    right.legend()
    return save_figure(figure, path)


def plot_distributions(path: str | os.PathLike, out: str | os.PathLike, layer: str | None = None) -> Path:
    """Han et al. (2016) Figure 5 for one layer of a .dcz file (the largest by default):
    how often each weight code and each index gap occurs, which is what Huffman exploits.

    Args:
        path: the .dcz file.
        out: the PNG to write.
        layer: the tensor to plot (default: the one with the most codes).

    Returns:
        `out` as a Path.

    Raises:
        FormatError: the file is malformed or holds no weight-shared tensor.
    """
    plt = _pyplot()

    from deepshrink.compressed import open_compressed
    from deepshrink.encode.codec import stream_histograms

    loaded, _ = open_compressed(path)
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


def plot_tradeoff(curves: dict, path) -> None:
    """The metric's change against compression ratio, one line per method (Han et al. 2016,
    Figure 6, where the metric is accuracy); accuracies are shown in points.

    Args:
        curves: from tradeoff_curves.
        path: the PNG to write.
    """
    plt = _pyplot()
    import matplotlib.ticker

    figure, axis = plt.subplots(figsize=(8.5, 4.2), dpi=120)
    reference = curves["reference_metric"]
    name = curves.get("metric_name", "top-1 accuracy")
    scale = 100 if "accuracy" in name else 1
    methods = [
        "pruning + quantization",
        "pruning only",
        "quantization only",
        "SVD",
        "variational dropout + quantization",
        "variational dropout only",
        "soft weight-sharing",
    ]
    for method, marker in zip(methods, "osd^v<P", strict=True):
        points = sorted((point for point in curves["points"] if point["method"] == method), key=lambda p: p["ratio"])
        if points:
            axis.plot(
                [point["ratio"] for point in points],
                [scale * (point["metric"] - reference) for point in points],
                marker=marker,
                label=method,
            )
    axis.axhline(0, color="grey", linewidth=0.8)
    axis.set_xscale("log")
    axis.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}x"))
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.set_xlabel("compression ratio (fp32 parameter bytes / compressed bytes)")
    axis.set_ylabel(f"{name} change" + (" (points)" if scale == 100 else ""))
    axis.set_title(f"{name.capitalize()} against compression (Figure 6)")
    # Beside the axes: inside, with up to seven methods, it covered points (a point below 1x).
    axis.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    save_figure(figure, path)


def plot_sensitivity(result: SensitivityResult, path: str | Path, title: str = "") -> Path:
    """The task's metric against sparsity, one curve per layer (Han et al. 2015, Figure 5, where
    the metric is accuracy).

    Args:
        result: the analysis.
        path: the PNG to write.
        title: the plot's title.

    Returns:
        `path` as a Path.
    """
    plt = _pyplot()

    scale = 100 if "accuracy" in result.metric_name else 1
    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name, values in result.metric.items():
        axes.plot(
            [100 * sparsity for sparsity in result.sparsities],
            [scale * value for value in values],
            marker="o",
            markersize=3,
            label=name,
        )
    axes.axhline(scale * result.baseline, color="grey", linestyle="--", linewidth=0.8, label="unpruned")
    axes.set_xlabel("parameters pruned away (%)")
    axes.set_ylabel(f"validation {result.metric_name}" + (" (%)" if scale == 100 else ""))
    axes.set_title(title or "Sensitivity of each layer to pruning (no retraining)")
    axes.grid(alpha=0.3)
    axes.legend()
    return save_figure(figure, path)
