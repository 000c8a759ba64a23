"""Entropy coding at VGG-16 scale: throughput and coded size against the order-0 entropy.

Synthetic Laplace weights with VGG-16's real layer shapes (138M weights) are pruned by magnitude
to the densities of Han et al. (2016) Table 5 and weight-shared (8 bits conv, 5 bits fc) by our
k-means. Each layer's codes and gaps (8-bit index conv, 5-bit fc) go through the relative-index
layout and canonical Huffman in four interleaved lanes (the .dcz coding). Reported, per stream
kind and in total:
- encode and decode throughput in MB/s of symbols (one byte per symbol), one core;
- coded bits per symbol, side information included, against the order-0 entropy;
- wall time of encoding plus decoding the whole model: the relative-index layout (to_sparse and
  from_sparse over the dense code tensors) and the entropy coding of its streams;
- the anchor, interleaved stream by stream in the same run: zstd level 1 (the `zstandard`
  package, one thread) compressing and decompressing the same symbols, one byte each, and the
  ratio of our throughput to its, each way (issue 21's target: >= 0.5x).

    .venv/bin/python benchmarks/encode_speed.py [--scale 1.0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numba
import numpy as np
import zstandard

from deepshrink.encode import huffman
from deepshrink.encode.sparse import from_sparse, to_sparse
from deepshrink.quantize.kmeans import kmeans_1d

# (name, shape, density kept) after Han et al. 2016, Table 5.
VGG16 = [
    ("conv1_1", (64, 3, 3, 3), 0.58),
    ("conv1_2", (64, 64, 3, 3), 0.22),
    ("conv2_1", (128, 64, 3, 3), 0.34),
    ("conv2_2", (128, 128, 3, 3), 0.36),
    ("conv3_1", (256, 128, 3, 3), 0.53),
    ("conv3_2", (256, 256, 3, 3), 0.24),
    ("conv3_3", (256, 256, 3, 3), 0.42),
    ("conv4_1", (512, 256, 3, 3), 0.32),
    ("conv4_2", (512, 512, 3, 3), 0.27),
    ("conv4_3", (512, 512, 3, 3), 0.34),
    ("conv5_1", (512, 512, 3, 3), 0.35),
    ("conv5_2", (512, 512, 3, 3), 0.29),
    ("conv5_3", (512, 512, 3, 3), 0.36),
    ("fc6", (4096, 25088), 0.04),
    ("fc7", (4096, 4096), 0.04),
    ("fc8", (1000, 4096), 0.23),
]


def entropy_bits(symbols: np.ndarray, alphabet: int) -> float:
    counts = np.bincount(symbols, minlength=alphabet)
    probabilities = counts[counts > 0] / len(symbols)
    return float(-np.sum(probabilities * np.log2(probabilities)) * len(symbols))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of each fc layer's rows (quick runs)")
    args = parser.parse_args()
    numba.set_num_threads(1)
    generator = np.random.default_rng(0)
    streams = []  # (kind, symbols, alphabet)
    started = time.perf_counter()
    total_weights = 0
    layout_seconds = 0.0  # relative-index layout: encoding plus decoding, all layers
    for name, shape, density in VGG16:
        if name.startswith("fc") and args.scale < 1:
            shape = (max(1, int(shape[0] * args.scale)), shape[1])
        weights = generator.laplace(scale=0.01, size=shape).astype(np.float32)
        total_weights += weights.size
        magnitude = np.abs(weights).ravel()
        threshold = np.partition(magnitude, int((1 - density) * magnitude.size))[int((1 - density) * magnitude.size)]
        kept = np.abs(weights) >= threshold
        conv = len(shape) == 4
        bits, index_bits = (8, 8) if conv else (5, 5)
        codes = np.zeros(weights.shape, dtype=np.uint8)
        codes[kept] = kmeans_1d(weights[kept], 2**bits - 1, "linear").labels + 1
        begin = time.perf_counter()
        sparse = to_sparse(codes, index_bits)
        layout_seconds += time.perf_counter() - begin
        begin = time.perf_counter()
        restored = from_sparse(sparse, codes.shape)
        layout_seconds += time.perf_counter() - begin
        assert np.array_equal(restored, codes)
        streams += [("codes", sparse.codes, 2**bits), ("gaps", sparse.gaps, 2**index_bits)]
    prepare = time.perf_counter() - started
    for dtype in sorted({symbols.dtype.str for _, symbols, _ in streams}):  # compile before timing
        huffman.decode_lanes(
            *huffman.encode_lanes(np.zeros(10, dtype=dtype), np.array([1, 1])), 10, np.array([1, 1]), 15
        )
    results = {"weights": total_weights, "prepare_seconds": prepare, "layout_seconds": layout_seconds}
    empty = {"symbols": 0, "encode": 0.0, "decode": 0.0, "bits": 0, "side_bits": 0, "entropy": 0.0}
    empty |= {"zstd_encode": 0.0, "zstd_decode": 0.0, "zstd_bits": 0}
    totals = dict(empty)
    compressor = zstandard.ZstdCompressor(level=1)
    decompressor = zstandard.ZstdDecompressor()
    for kind in ("codes", "gaps"):
        kind_totals = dict(empty)
        for stream_kind, symbols, alphabet in streams:
            if stream_kind != kind:
                continue
            lengths = huffman.code_lengths(np.bincount(symbols, minlength=alphabet), 15)
            begin = time.perf_counter()
            data, lanes = huffman.encode_lanes(symbols, lengths)
            bits = sum(lanes)
            middle = time.perf_counter()
            decoded = huffman.decode_lanes(data, lanes, len(symbols), lengths, 15)
            end = time.perf_counter()
            assert np.array_equal(decoded, symbols)
            raw = symbols.astype(np.uint8).tobytes() if alphabet <= 256 else symbols.tobytes()
            begin_anchor = time.perf_counter()
            frame = compressor.compress(raw)
            middle_anchor = time.perf_counter()
            back = decompressor.decompress(frame)
            end_anchor = time.perf_counter()
            assert back == raw
            kind_totals["zstd_encode"] += middle_anchor - begin_anchor
            kind_totals["zstd_decode"] += end_anchor - middle_anchor
            kind_totals["zstd_bits"] += 8 * len(frame)
            kind_totals["symbols"] += len(symbols)
            kind_totals["encode"] += middle - begin
            kind_totals["decode"] += end - middle
            kind_totals["bits"] += bits
            kind_totals["side_bits"] += 4 * (int(np.flatnonzero(lengths).max(initial=0)) + 1)  # packed nibbles
            kind_totals["entropy"] += entropy_bits(symbols, alphabet)
        results[kind] = kind_totals
        for key in totals:
            totals[key] += kind_totals[key]
        print(
            f"{kind}: {kind_totals['symbols'] / 1e6:.1f}M symbols, encode "
            f"{kind_totals['symbols'] / kind_totals['encode'] / 1e6:.0f} MB/s, decode "
            f"{kind_totals['symbols'] / kind_totals['decode'] / 1e6:.0f} MB/s, "
            f"{(kind_totals['bits'] + kind_totals['side_bits']) / kind_totals['symbols']:.4f} bits/symbol "
            f"against entropy {kind_totals['entropy'] / kind_totals['symbols']:.4f}",
            flush=True,
        )
        print(
            f"  zstd-1 in the same run: encode {kind_totals['symbols'] / kind_totals['zstd_encode'] / 1e6:.0f} MB/s, "
            f"decode {kind_totals['symbols'] / kind_totals['zstd_decode'] / 1e6:.0f} MB/s, "
            f"{kind_totals['zstd_bits'] / kind_totals['symbols']:.4f} bits/symbol; ours "
            f"{kind_totals['zstd_encode'] / kind_totals['encode']:.2f}x its encode speed, "
            f"{kind_totals['zstd_decode'] / kind_totals['decode']:.2f}x its decode speed",
            flush=True,
        )
    results["total"] = totals
    overhead = (totals["bits"] + totals["side_bits"] - totals["entropy"]) / totals["symbols"]
    seconds = totals["encode"] + totals["decode"]
    print(
        f"all streams: {totals['symbols'] / 1e6:.1f}M symbols; encode + decode {seconds:.2f} s; "
        f"coded size exceeds the order-0 entropy by {overhead:.4f} bits/symbol (side information included); "
        f"{total_weights / 1e6:.0f}M weights prepared in {prepare:.0f} s"
    )
    print(
        f"against zstd-1 in the same run, all streams: encode {totals['zstd_encode'] / totals['encode']:.2f}x, "
        f"decode {totals['zstd_decode'] / totals['decode']:.2f}x its throughput, at "
        f"{(totals['bits'] + totals['side_bits']) / totals['zstd_bits']:.3f}x its size"
    )
    print(
        f"relative-index layout (to_sparse + from_sparse, all layers): {layout_seconds:.2f} s; "
        f"with entropy coding: {layout_seconds + seconds:.2f} s for the whole model"
    )
    results["whole_seconds"] = layout_seconds + seconds
    out = Path("benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "encode_speed.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
