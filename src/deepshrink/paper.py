"""The numbers Han, Mao & Dally (ICLR 2016) print for the LeNets, for side-by-side reports.

Table 1 gives top-1 error on MNIST before and after compression and the model sizes; Tables 2
and 3 give the per-layer columns. Rates are the compressed size as a fraction of the original,
as printed. The paper's layer names (ip1, ip2, ...) are mapped to ours.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperLayer:
    layer: str  # our layer name
    paper_name: str
    weights: str
    kept: float  # weights% (P)
    weight_bits: float  # P+Q
    weight_bits_coded: float  # P+Q+H
    index_bits: float  # P+Q
    index_bits_coded: float  # P+Q+H
    rate: float  # compressed / original, P+Q
    rate_coded: float  # compressed / original, P+Q+H


@dataclass(frozen=True)
class PaperResult:
    table: str
    reference_error: float
    compressed_error: float
    original_size: str
    compressed_size: str
    ratio: float
    layers: tuple[PaperLayer, ...]
    total: PaperLayer


PAPER = {
    "lenet-300-100": PaperResult(
        "Table 2",
        reference_error=0.0164,
        compressed_error=0.0158,
        original_size="1070 KB",
        compressed_size="27 KB",
        ratio=40.0,
        layers=(
            PaperLayer("fc1", "ip1", "235K", 0.08, 6, 4.4, 5, 3.7, 0.031, 0.0232),
            PaperLayer("fc2", "ip2", "30K", 0.09, 6, 4.4, 5, 4.3, 0.038, 0.0304),
            PaperLayer("fc3", "ip3", "1K", 0.26, 6, 4.3, 5, 3.2, 0.157, 0.127),
        ),
        total=PaperLayer("total", "total", "266K", 0.08, 6, 5.1, 5, 3.7, 0.031, 0.0249),
    ),
    "lenet-5": PaperResult(
        "Table 3",
        reference_error=0.0080,
        compressed_error=0.0074,
        original_size="1720 KB",
        compressed_size="44 KB",
        ratio=39.0,
        layers=(
            PaperLayer("conv1", "conv1", "0.5K", 0.66, 8, 7.2, 5, 1.5, 0.785, 0.6745),
            PaperLayer("conv2", "conv2", "25K", 0.12, 8, 7.2, 5, 3.9, 0.060, 0.0528),
            PaperLayer("fc1", "ip1", "400K", 0.08, 5, 4.5, 5, 4.5, 0.027, 0.0245),
            PaperLayer("fc2", "ip2", "5K", 0.19, 5, 5.2, 5, 3.7, 0.069, 0.0613),
        ),
        total=PaperLayer("total", "total", "431K", 0.08, 5.3, 4.1, 5, 4.4, 0.0305, 0.0255),
    ),
}
