"""Per-layer weight-sharing tables and the paper's Figure 4 (codebooks on the weight distribution)."""

from __future__ import annotations

from torch import nn

from deepshrink.layers import compressible_weights
from deepshrink.quantize.shared import SharingRecord, distinct_values
from deepshrink.tables import render_table


def sharing_rows(model: nn.Module, records: dict[str, SharingRecord]) -> list[dict]:
    """One row per shared weight: its size, kept fraction, bits, distinct values and k-means inertia.

    Args:
        model: the shared model.
        records: {weight name: SharingRecord}.

    Returns:
        The rows as dicts.
    """
    rows = []
    for name, layer in compressible_weights(model).items():
        if name not in records:
            continue
        weight = layer.value.detach()
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
    """The sharing table: bits and distinct values against the 2^bits limit.

    Args:
        rows: from sharing_rows.
        markdown: a Markdown table.

    Returns:
        The table.
    """
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
