"""The adaptive rANS coder against Huffman, the entropy and constriction, on real streams.

Streams: the codes and gaps of every weight-shared layer of the .dcz files given (for example
the shipped recipes' outputs), and of a VGG-16-shaped model (benchmarks/encode_speed.py's:
Laplace weights at Han et al.'s Table 5 densities, 8-bit conv / 5-bit fc codes and gaps). Per
source and stream kind:
- bytes: order-0 entropy (a bound no order-0 code beats, before paying for its model); Huffman
  as the .dcz stores it (four lanes plus the code-length table); our ANS (the smaller of its two
  context models, nothing else stored); and constriction's rANS with the stream's own exact
  histogram (a static model: the bytes leave out the table it would need in a file);
- throughput in MB/s of symbols (one byte each), encode and decode, one thread, each coder
  timed stream by stream in turn (best of three), so that they see the same machine load.

constriction (a maintained Rust library) is measured only where it is installed
(`pip install constriction==0.5.0`); it is not a dependency of deepshrink.

    .venv/bin/python benchmarks/ans_coder.py [--files A.dcz B.dcz] [--vgg-scale 1.0] [--ans-before OLD.py]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numba
import numpy as np

from deepshrink.encode import ans, codec, container
from deepshrink.runtime.bench import machine_description


def file_streams(path: str) -> list[tuple[str, np.ndarray, int]]:
    """(kind, symbols, alphabet) of every shared record's codes and gaps in a .dcz file."""
    loaded = container.read(path)
    streams = []
    for record in codec.check(loaded.header, loaded.buffers).records:
        if record["encoding"] != "shared":
            continue
        for kind in ("codes", "gaps"):
            if kind in record["streams"]:
                alphabet = 1 << (record["bits"] if kind == "codes" else record["index_bits"])
                symbols = codec._decode_stream(record["streams"][kind], loaded.buffers, record["coder"], alphabet, kind)
                streams.append((kind, symbols.astype(np.uint8 if alphabet <= 256 else np.uint16), alphabet))
    return streams


def vgg_streams(scale: float) -> list[tuple[str, np.ndarray, int]]:
    """The VGG-16-shaped streams of encode_speed.py."""
    from encode_speed import VGG16

    from deepshrink.encode.sparse import to_sparse
    from deepshrink.quantize.kmeans import kmeans_1d

    generator = np.random.default_rng(0)
    streams = []
    for name, shape, density in VGG16:
        if name.startswith("fc") and scale < 1:
            shape = (max(1, int(shape[0] * scale)), shape[1])
        weights = generator.laplace(scale=0.01, size=shape).astype(np.float32)
        magnitude = np.abs(weights).ravel()
        cut = int((1 - density) * magnitude.size)
        kept = np.abs(weights) >= np.partition(magnitude, cut)[cut]
        bits = 8 if len(shape) == 4 else 5
        codes = np.zeros(weights.shape, dtype=np.uint8)
        codes[kept] = kmeans_1d(weights[kept], 2**bits - 1, "linear").labels + 1
        sparse = to_sparse(codes, bits)
        streams += [("codes", sparse.codes.astype(np.uint8), 2**bits), ("gaps", sparse.gaps.astype(np.uint8), 2**bits)]
    return streams


def best_seconds(action, repeats: int = 3) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = action()
        best = min(best, time.perf_counter() - started)
    return best, result


def entropy_bytes(symbols: np.ndarray, alphabet: int) -> float:
    counts = np.bincount(symbols.astype(np.int64), minlength=alphabet)
    probabilities = counts[counts > 0] / len(symbols)
    return float(-np.sum(probabilities * np.log2(probabilities)) * len(symbols) / 8)


def load_module(path: str):
    """Another version of encode/ans.py (say `git show REV:src/deepshrink/encode/ans.py`), to
    time its decoder against this one's on the same streams."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ans_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(streams, before=None) -> dict:
    """Totals over the streams, per kind, of every coder's bytes and seconds (and of the
    decoder of `before`, another version of the ans module, where given)."""
    try:
        import constriction
    except ImportError:
        constriction = None
    totals: dict[str, dict[str, float]] = {}
    for kind, symbols, alphabet in streams:
        count = len(symbols)
        row = totals.setdefault(kind, {"symbols": 0})
        row["symbols"] += len(symbols)
        row["entropy_bytes"] = row.get("entropy_bytes", 0.0) + entropy_bytes(symbols, alphabet)

        def huffman_encode(symbols=symbols, alphabet=alphabet):
            buffers: list[bytes] = []
            return codec._encode_stream(symbols, alphabet, "huffman", 0, buffers), buffers

        seconds, (stream, buffers) = best_seconds(huffman_encode)
        row["huffman_bytes"] = row.get("huffman_bytes", 0) + sum(len(buffer) for buffer in buffers)
        row["huffman_encode_s"] = row.get("huffman_encode_s", 0.0) + seconds
        seconds, decoded = best_seconds(
            lambda s=stream, b=buffers, a=alphabet: codec._decode_stream(s, b, "huffman", a, "x")
        )
        assert np.array_equal(decoded, symbols)
        row["huffman_decode_s"] = row.get("huffman_decode_s", 0.0) + seconds

        seconds, (context, data) = best_seconds(lambda s=symbols, a=alphabet: ans.encode_smallest(s, a))
        row["ans_bytes"] = row.get("ans_bytes", 0) + len(data)
        row["ans_encode_s"] = row.get("ans_encode_s", 0.0) + seconds  # both context models tried
        row[f"ans_context_{context}"] = row.get(f"ans_context_{context}", 0) + 1
        seconds, decoded = best_seconds(lambda d=data, n=count, a=alphabet, c=context: ans.decode(d, n, a, c))
        assert np.array_equal(decoded, symbols)
        row["ans_decode_s"] = row.get("ans_decode_s", 0.0) + seconds
        if before is not None:
            seconds, decoded = best_seconds(lambda d=data, n=count, a=alphabet, c=context: before.decode(d, n, a, c))
            assert np.array_equal(decoded, symbols)
            row["ans_before_decode_s"] = row.get("ans_before_decode_s", 0.0) + seconds

        if constriction is not None:
            counts = np.bincount(symbols.astype(np.int64), minlength=alphabet).astype(np.float64)
            model = constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)
            as_int32 = symbols.astype(np.int32)

            def constriction_encode(model=model, as_int32=as_int32):
                coder = constriction.stream.stack.AnsCoder()
                coder.encode_reverse(as_int32, model)
                return coder.get_compressed()

            seconds, compressed = best_seconds(constriction_encode)
            row["constriction_bytes"] = row.get("constriction_bytes", 0) + 4 * len(compressed)
            row["constriction_encode_s"] = row.get("constriction_encode_s", 0.0) + seconds
            seconds, decoded = best_seconds(
                lambda c=compressed, m=model, n=count: constriction.stream.stack.AnsCoder(c).decode(m, n)
            )
            assert np.array_equal(decoded, as_int32)
            row["constriction_decode_s"] = row.get("constriction_decode_s", 0.0) + seconds
    return totals


def print_table(source: str, totals: dict) -> None:
    print(f"\n{source}")
    print(
        "stream  symbols     entropy B  huffman B (+table)  ans B (vs huffman)  constriction B   "
        "MB/s enc/dec: huffman  ans  constriction"
    )
    for kind, row in totals.items():
        megabytes = row["symbols"] / 1e6
        versus = 100 * (row["ans_bytes"] / row["huffman_bytes"] - 1)
        speeds = [
            f"{megabytes / row[f'{coder}_encode_s']:.0f}/{megabytes / row[f'{coder}_decode_s']:.0f}"
            for coder in ("huffman", "ans", "constriction")
            if f"{coder}_encode_s" in row
        ]
        if "ans_before_decode_s" in row:
            speeds.append(f"(ans before: -/{megabytes / row['ans_before_decode_s']:.0f})")
        print(
            f"{kind:6s} {row['symbols']:9,d} {row['entropy_bytes']:12,.0f} {row['huffman_bytes']:12,d} "
            f"{row['ans_bytes']:14,d} ({versus:+.2f}%) {row.get('constriction_bytes', 0):12,d}   {'  '.join(speeds)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="*", default=[], help=".dcz files whose streams to code")
    parser.add_argument("--vgg-scale", type=float, default=1.0, help="fraction of VGG-16's fc rows (0 to skip)")
    parser.add_argument("--ans-before", help="another version of encode/ans.py whose decoder to time beside this one")
    args = parser.parse_args()
    before = load_module(args.ans_before) if args.ans_before else None
    numba.set_num_threads(1)
    sources = {path: file_streams(path) for path in args.files}
    if args.vgg_scale > 0:
        sources["VGG-16-shaped (Laplace, Table 5 densities)"] = vgg_streams(args.vgg_scale)
    warm = np.zeros(100, dtype=np.uint8)
    for module in (ans, before) if before is not None else (ans,):
        module.decode(module.encode(warm, 32), 100, 32, "none")  # compile before timing
    results = {"machine": machine_description(), "sources": {}}
    for source, streams in sources.items():
        totals = measure(streams, before)
        results["sources"][source] = totals
        print_table(source, totals)
    out = Path(__file__).parent / "results" / "ans_coder.json"
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
