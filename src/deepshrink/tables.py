"""Rendering tables as aligned text or Markdown, and saving figures: shared by every report."""

from __future__ import annotations

from pathlib import Path

from deepshrink.files import atomic_output


def render_table(header: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    """The first column left-aligned, the others right-aligned (they hold numbers).

    Args:
        header: the column titles.
        rows: the cells, one list of strings per row.
        markdown: a Markdown table instead of aligned plain text.

    Returns:
        The table as one string, without a final newline.
    """
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])
    widths = [max(len(cells[column]) for cells in [header, *rows]) for column in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(widths[0]) if column == 0 else cell.rjust(widths[column]) for column, cell in enumerate(cells)
        )
        for cells in [header, *rows]
    )


def save_figure(figure, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG atomically, then free it.

    Args:
        figure: the matplotlib figure.
        path: where to write the PNG.

    Returns:
        `path` as a Path.

    Raises:
        OutputError: `path` cannot be written.
    """
    import matplotlib.pyplot as plt

    figure.tight_layout()
    with atomic_output(path) as temporary:
        figure.savefig(temporary, format="png")
    plt.close(figure)
    return Path(path)
