"""Running AlexNet's fully connected layers from the compressed form, against dense torch.

Synthetic weights with AlexNet's FC shapes and random masks at Han et al.'s densities (fc6 and
fc7 9%, fc8 25%; `--density D` puts all three at D instead), 5-bit codebooks. Every candidate
computes the same product and is checked against the dense result; all are timed in the same
run, interleaved, so a noisy neighbour slows every candidate alike:
- dense: torch.nn.functional.linear on the decoded float32 matrix (MKL/oneDNN GEMV);
- torch CSR: torch.sparse_csr_tensor of float32 values;
- scipy CSR: scipy.sparse.csr_matrix of float32 values;
- codebook ours: the form auto mode builds on this CPU for single samples: with AVX-512 the
  tiled form (16-row x 32-column register tiles, 10-bit (column in tile, code) entries, inputs
  and codebook looked up by permutes, no gathers); with AVX2 the blocked form (8 rows, 8
  weights of one code a block, one gather of their inputs); the per-entry form elsewhere;
- codebook grouped: each row's entries grouped by code, uint16 columns + per-row code counts +
  the codebook, one vector gather per 16 entries (the default before the tiled form);
- codebook per entry: uint8 code + uint16 column per entry, numba.

`--bits 6` runs 6-bit codebooks (the tiled form's wide layout). `--threads N` sets torch's and
numba's threads (default: torch's). For the AVX2 path on an AVX-512 CPU, run it with
DEEPSHRINK_AVX512=0 NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=-avx512f; dense torch still uses
the CPU's own instructions then.

Hot: the same copy every call. Cold: rotate through copies whose total is larger than the
last-level cache, so every call reads its weights from memory.

    .venv/bin/python benchmarks/inference_speed.py [--repeats 30] [--cold-bytes 1.5e9] \
        [--density 0.09] [--threads 1] [--candidates "dense torch" "torch CSR" "codebook ours"]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import tracemalloc
from pathlib import Path

import numba
import numpy as np
import scipy.sparse
import torch
from torch.nn import functional

from deepshrink.encode.sparse import to_sparse
from deepshrink.runtime import blocked_avx2, tiled
from deepshrink.runtime.bench import machine_description
from deepshrink.runtime.forms import CodebookWeight
from deepshrink.runtime.kernels import csr_from_layout

ALEXNET_FC = [("fc6", 4096, 9216, 0.09), ("fc7", 4096, 4096, 0.09), ("fc8", 1000, 4096, 0.25)]


def make_layer(rows: int, columns: int, density: float, seed: int, bits: int = 5):
    generator = np.random.default_rng(seed)
    mask = generator.random((rows, columns), dtype=np.float32) < density
    codes = np.where(mask, generator.integers(1, 1 << bits, (rows, columns), dtype=np.uint8), 0).astype(np.uint8)
    codebook = np.concatenate(([0.0], generator.laplace(0, 0.02, (1 << bits) - 1))).astype(np.float32)
    csr = csr_from_layout(to_sparse(codes, 5, "csr"), int(mask.sum()))
    return torch.from_numpy(codebook[codes]), csr, codebook


CANDIDATES = (
    "dense torch",
    "torch CSR",
    "scipy CSR",
    "codebook ours",
    "codebook grouped",
    "codebook per entry",
)
OURS = "tiled" if tiled.available() else "blocked" if blocked_avx2.available() else "per-entry"
FORMS = {"codebook ours": OURS, "codebook grouped": "grouped", "codebook per entry": "per-entry"}


def build(candidate: str, dense: torch.Tensor, csr, codebook: np.ndarray):
    """(resident weight bytes, function of a (batch, columns) float32 tensor), on fresh copies."""
    indptr, columns, codes = (array.copy() for array in csr)
    shape = tuple(dense.shape)
    if candidate == "dense torch":
        copy = dense.clone()
        return copy.numel() * 4, lambda inputs: functional.linear(inputs, copy)
    values = codebook[codes.astype(np.int64)]
    if candidate == "torch CSR":
        matrix = torch.sparse_csr_tensor(
            torch.from_numpy(indptr), torch.from_numpy(columns.astype(np.int64)), torch.from_numpy(values), size=shape
        )
        return values.nbytes + 8 * (len(indptr) + len(columns)), lambda inputs: torch.sparse.mm(matrix, inputs.T).T
    if candidate == "scipy CSR":
        matrix = scipy.sparse.csr_matrix((values, columns.astype(np.int32), indptr), shape=shape)
        resident = values.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes
        return resident, lambda inputs: (matrix @ inputs.numpy().T).T
    weight = CodebookWeight(indptr, columns, codes, codebook, shape, form=FORMS[candidate])
    return weight.nbytes, lambda inputs: weight.product(inputs.numpy())


def traced_resident_bytes(csr, codebook: np.ndarray, shape: tuple[int, int]) -> int:
    """Memory the default form holds once built from CSR and after one batch-1 product, as
    tracemalloc sees it (numpy's allocations included): what the layer keeps, measured rather
    than summed from its arrays."""
    # Compile the kernels first (the serial and the threaded one, whichever this shape runs):
    # the compiler's memory is not the layer's.
    CodebookWeight(*csr, codebook, shape, form=OURS).product(np.ones((1, shape[1]), np.float32))
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    # Copied under tracing: a form may keep the arrays it is given (the blocked form keeps the
    # per-entry ones, for batches), and those are part of what it holds.
    copies = [array.copy() for array in csr]
    weight = CodebookWeight(*copies, codebook, shape, form=OURS)
    del copies
    weight.product(np.ones((1, shape[1]), dtype=np.float32))
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert weight.nbytes <= held
    return held


def time_rotating(functions: list, inputs: torch.Tensor, repeats: int) -> float:
    """Median seconds per call, cycling through `functions` (copies of one candidate)."""
    for function in functions[:2]:
        function(inputs)
    times = []
    for index in range(repeats):
        started = time.perf_counter()
        functions[index % len(functions)](inputs)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median round is reported")
    parser.add_argument("--cold-bytes", type=float, default=1.2e9, help="total bytes of rotated copies when cold")
    parser.add_argument("--bits", type=int, default=5, choices=range(2, 9), help="codebook bits (the paper: 5 for FC)")
    parser.add_argument("--density", type=float, help="every layer's density (default: Han et al.'s)")
    parser.add_argument("--threads", type=int, help="torch's and numba's threads (default: torch's)")
    parser.add_argument("--candidates", nargs="+", choices=CANDIDATES, default=list(CANDIDATES))
    parser.add_argument("--out", default="benchmarks/results/inference_speed.json")
    args = parser.parse_args()
    if "dense torch" not in args.candidates:
        parser.error("the candidates must include dense torch, the baseline")
    if args.threads:
        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    results = {
        "machine": machine_description(),
        "threads": torch.get_num_threads(),
        "bits": args.bits,
        "ours": OURS,
        "layers": [],
    }
    print(json.dumps(results["machine"]), f"ours: {OURS}", flush=True)
    for index, (name, rows, columns, density) in enumerate(ALEXNET_FC):
        density = args.density or density
        dense, csr, codebook = make_layer(rows, columns, density, index, args.bits)
        traced = traced_resident_bytes(csr, codebook, (rows, columns))
        built = {candidate: build(candidate, dense, csr, codebook) for candidate in args.candidates}
        layer = {
            "layer": name,
            "shape": [rows, columns],
            "density": len(csr[1]) / (rows * columns),
            "traced_bytes": traced,
            "candidates": {},
        }
        # Cold copies: as many as it takes to exceed --cold-bytes of that candidate's weights.
        cold = {}
        for candidate, (resident, function) in built.items():
            copies = min(max(2, int(args.cold_bytes // resident) + 1), 200)
            cold[candidate] = [function] + [build(candidate, dense, csr, codebook)[1] for _ in range(copies - 1)]
        for batch in (1, 8, 64):
            inputs = torch.randn(batch, columns, generator=torch.Generator().manual_seed(batch))
            expected = functional.linear(inputs.double(), dense.double())
            for candidate, (_, function) in built.items():
                difference = (torch.as_tensor(function(inputs)).double() - expected).abs().max()
                assert difference / expected.abs().max() < 1e-5, candidate
            for temperature in ("hot", "cold") if batch == 1 else ("hot",):
                rounds = {candidate: [] for candidate in built}
                for _ in range(args.rounds):
                    for candidate, (_, function) in built.items():
                        functions = [function] if temperature == "hot" else cold[candidate]
                        rounds[candidate].append(time_rotating(functions, inputs, args.repeats))
                for candidate, (resident, _) in built.items():
                    seconds = statistics.median(rounds[candidate])
                    entry = layer["candidates"].setdefault(candidate, {"resident_bytes": resident})
                    entry[f"batch{batch}_{temperature}_ms"] = 1000 * seconds
                dense_ms = layer["candidates"]["dense torch"][f"batch{batch}_{temperature}_ms"]
                line = "  ".join(
                    f"{candidate} {dense_ms / layer['candidates'][candidate][f'batch{batch}_{temperature}_ms']:.2f}x"
                    for candidate in built
                    if candidate != "dense torch"
                )
                print(f"{name} batch {batch} {temperature}: dense {dense_ms:.3f} ms; speedup {line}", flush=True)
        del cold
        results["layers"].append(layer)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    for layer in results["layers"]:
        dense_bytes = layer["candidates"]["dense torch"]["resident_bytes"]
        ours = layer["candidates"].get("codebook ours", {}).get("resident_bytes")
        if ours is None:
            continue
        traced = layer["traced_bytes"]
        print(
            f"{layer['layer']}: resident {ours:,} bytes against {dense_bytes:,} dense (1/{dense_bytes / ours:.1f}); "
            f"tracemalloc after loading and one product: {traced:,} bytes (1/{dense_bytes / traced:.1f})"
        )


if __name__ == "__main__":
    main()
