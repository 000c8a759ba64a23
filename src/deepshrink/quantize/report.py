"""Per-layer weight-sharing tables and the paper's Figure 4 (codebooks on the weight distribution)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from deepshrink.layers import compressible_layers
from deepshrink.quantize.shared import SharingRecord, distinct_values, sharing_of
from deepshrink.tables import render_table, save_figure


def sharing_rows(model: nn.Module, records: dict[str, SharingRecord]) -> list[dict]:
    rows = []
    for name, layer in compressible_layers(model).items():
        if name not in records:
            continue
        weight = layer.weight.detach()
        rows.append(
            {
                "layer": name,
                "weights": weight.numel(),
                "kept_fraction": float((weight != 0).float().mean()),
                "bits": records[name].bits,
                "zero_code": records[name].zero_code,
                "distinct_values": distinct_values(layer),
                "kmeans_inertia": records[name].inertia,
            }
        )
    return rows


def format_sharing_table(rows: list[dict], markdown: bool = False) -> str:
    header = ["layer", "weights", "weights% kept", "bits", "distinct values", "limit 2^bits"]
    body = [
        [
            row["layer"],
            f"{row['weights']:,}",
            f"{100 * row['kept_fraction']:.2f}%",
            str(row["bits"]),
            str(row["distinct_values"]),
            str(2 ** row["bits"]),
        ]
        for row in rows
    ]
    return render_table(header, body, markdown)


def plot_codebooks(
    model: nn.Module, records: dict[str, SharingRecord], path: str | Path, layer: str | None = None
) -> Path:
    """Han et al. (2016) Figure 4 for one layer (the largest by default).

    Left: the CDF of the non-zero weights with the initial centroids marked on it.
    Right: the weight distribution with the codebook after k-means and after fine-tuning.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = compressible_layers(model)
    name = layer or max(records, key=lambda key: layers[key].weight.numel())
    record = records[name]
    sharing = sharing_of(layers[name])
    tuned = sharing.codebook.detach().cpu().numpy() if sharing is not None else np.unique(layers[name].weight.detach())
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
