"""How far each sparse layer's stored index (gaps and entry counts) is from what simpler models
of its mask would cost: the next place to look for bytes in a small file.

    .venv/bin/python benchmarks/index_bounds.py RUN_DIR/MODEL.dcz ...

For each relative-index record, from the file's own mask (rows x columns, k_r kept in row r):
- stored: the gaps stream and the fixed-width counts stream, as written;
- i.i.d.: every position kept with the layer's density, rows x columns x H(density) bits;
- per row, given the counts: each row's positions uniform among its columns, the sum of
  log2 C(columns, k_r), plus the counts as stored (enumerative coding's size; no model to learn);
- per column, adaptive: each column's own kept-fraction learned as the rows go (a
  Krichevsky-Trofimov estimate per column), the "position in the row" context;
- gaps in two contexts: the stored gaps split by their row's count (below or above the median
  of the non-empty rows), each part coded by adaptive rANS as the file codes gaps, plus the
  counts: what an adaptive gap model conditioned on the row's density would cost.
Sizes in bytes. The codes stream is shown beside for scale.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from deepshrink.compressed import open_compressed
from deepshrink.encode import ans
from deepshrink.encode.codec import decode_shared_parts, decode_state_dict


def log2_binomial(n: int, k: int) -> float:
    """log2 of n choose k.

    Args:
        n: positions.
        k: chosen.

    Returns:
        The bits of an enumerative code of one choice.
    """
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def adaptive_column_bits(mask: np.ndarray) -> float:
    """Bits of the mask coded row by row, each position by its column's Krichevsky-Trofimov
    estimate from the rows before.

    Args:
        mask: boolean rows x columns.

    Returns:
        The bits.
    """
    kept = np.zeros(mask.shape[1])
    bits = 0.0
    for row_index, row in enumerate(mask):
        probability = (kept + 0.5) / (row_index + 1.0)
        bits -= np.log2(probability[row]).sum() + np.log2(1 - probability[~row]).sum()
        kept += row
    return bits


def gaps_by_row_density(record: dict, buffers: list[bytes]) -> int:
    """Bytes of a record's gaps coded in two streams, split by their row's entry count at the
    median of the non-empty rows (each stream the smaller of rANS's context models).

    Args:
        record: a checked sparse record.
        buffers: the file's buffers.

    Returns:
        The two streams' bytes.
    """
    sparse = decode_shared_parts(record, buffers).sparse
    gaps, counts = np.asarray(sparse.gaps, dtype=np.int64), np.asarray(sparse.counts)
    dense_rows = np.repeat(counts, counts) > np.median(counts[counts > 0])
    alphabet = 1 << record["index_bits"]
    return sum(len(ans.encode_smallest(gaps[part], alphabet)[1]) for part in (dense_rows, ~dense_rows) if part.any())


def main(paths: list[str]) -> None:
    """Print one table row per sparse record of each file.

    Args:
        paths: .dcz files.
    """
    columns = ["file", "layer", "kept", "codes", "stored gaps + counts", "i.i.d.", "per row, given the counts"]
    print("| " + " | ".join([*columns, "per column, adaptive", "gaps in two contexts"]) + " |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for path in paths:
        loaded, checked = open_compressed(path)
        lengths = [len(buffer) for buffer in loaded.buffers]
        state = decode_state_dict(loaded.header, loaded.buffers, checked)
        for record in checked.records:
            if record["encoding"] != "shared" or record.get("layout") not in ("csr", "csc"):
                continue
            mask = state[record["name"]].numpy().reshape(record["matrix"]) != 0
            if record["layout"] == "csc":
                mask = mask.T
            streams = record["streams"]
            gaps, counts = lengths[streams["gaps"]["buffer"]], lengths[streams["counts"]["buffer"]]
            density = mask.mean()
            entropy = -(density * math.log2(density) + (1 - density) * math.log2(1 - density)) if 0 < density < 1 else 0
            per_row = sum(log2_binomial(mask.shape[1], int(k)) for k in mask.sum(1)) / 8 + counts
            print(
                f"| {path} | {record['name']} | {int(mask.sum()):,} | {lengths[streams['codes']['buffer']]:,} "
                f"| {gaps + counts:,} | {mask.size * entropy / 8:,.0f} | {per_row:,.0f} "
                f"| {adaptive_column_bits(mask) / 8:,.0f} | {gaps_by_row_density(record, loaded.buffers) + counts:,} |"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
