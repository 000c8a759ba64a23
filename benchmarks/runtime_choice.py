"""Auto mode's measured choice against dense torch and torch CSR, per batch size, on this CPU.

For each layer (AlexNet's FC shapes at 9% and 4% kept, 5-bit codebooks, and LeNet-300-100's
fc1 at 8%) and for the whole LeNet-300-100 (92% pruned, 5-bit; auto mode as `load_runtime`
gives it), timed in the same run, interleaved (five rounds, median):
- dense: an nn.Linear holding the decoded float32 weight and the bias;
- torch CSR: torch.sparse_csr_tensor of float32 values, then the bias;
- auto: CompressedLinear with the plans measured at load (compressed form, CSR or dense per
  batch range; runtime/choice.py), so the ratio shows whether the choice is ever slower.

Every row names the CPU model and the instruction set the kernels were built for (AVX-512 or
AVX2: set DEEPSHRINK_AVX512=0 NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=-avx512f to run the
AVX2 path on an AVX-512 CPU; the CPU name alone keeps the host's AVX-512 features in numba's code),
and the load average. One thread and two.

    .venv/bin/python benchmarks/runtime_choice.py [--repeats 20] [--out FILE] [--whole-only]

`--whole-only` times the whole LeNet-300-100 alone (seconds instead of minutes), for repeating it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deepshrink.encode.sparse import to_sparse
from deepshrink.runtime.bench import machine_description, median_seconds
from deepshrink.runtime.choice import measure_linear
from deepshrink.runtime.forms import CodebookWeight
from deepshrink.runtime.kernels import csr_from_layout
from deepshrink.runtime.modules import CompressedLinear

LAYERS = [
    ("alexnet fc6 9%", 4096, 9216, 0.09),
    ("alexnet fc7 9%", 4096, 4096, 0.09),
    ("alexnet fc8 9%", 1000, 4096, 0.09),
    ("alexnet fc6 4%", 4096, 9216, 0.04),
    ("alexnet fc7 4%", 4096, 4096, 0.04),
    ("alexnet fc8 4%", 1000, 4096, 0.04),
    ("lenet-300-100 fc1 8%", 300, 784, 0.08),
]
BATCHES = (1, 8, 64)


def random_weight(rows: int, columns: int, density: float, seed: int = 0) -> CodebookWeight:
    generator = np.random.default_rng(seed)
    codes = np.where(generator.random((rows, columns)) < density, generator.integers(1, 32, (rows, columns)), 0)
    codebook = np.concatenate(([0.0], generator.standard_normal(31))).astype(np.float32)
    sparse = to_sparse(codes.astype(np.uint8), 5, "csr")
    return CodebookWeight(*csr_from_layout(sparse, int(np.count_nonzero(codes))), codebook, (rows, columns))


def time_layer(weight: CodebookWeight, repeats: int) -> list[dict]:
    """What a caller would run otherwise, bias included: the dense nn.Linear of the decoded
    weight, and torch's CSR product plus the bias; against the auto-mode layer."""
    bias = torch.randn(weight.shape[0])
    dense = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        dense.weight.copy_(weight.to_dense())
        dense.bias.copy_(bias)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "sparse CSR support is in beta"
        csr = dense.weight.detach().to_sparse_csr()
    layer = CompressedLinear(weight, bias, measure_linear(weight))
    rows = []
    with torch.no_grad():
        for batch in BATCHES:
            inputs = torch.randn(batch, weight.shape[1])
            calls = {
                "dense": lambda x=inputs: dense(x),
                "torch CSR": lambda x=inputs: (csr @ x.T).T + bias,
                "auto": lambda x=inputs: layer(x),
            }
            rounds = {name: [] for name in calls}
            for _ in range(5):
                for name, call in calls.items():
                    rounds[name].append(median_seconds(call, repeats, warmup=1))
            medians = {name: statistics.median(values) * 1e6 for name, values in rounds.items()}
            rows.append(
                {
                    "batch": batch,
                    "dense_us": medians["dense"],
                    "csr_us": medians["torch CSR"],
                    "auto_us": medians["auto"],
                    "auto_vs_dense": medians["dense"] / medians["auto"],
                    "auto_vs_best_torch": min(medians["dense"], medians["torch CSR"]) / medians["auto"],
                    "plans": "/".join(layer.choice.plans),
                    "form": weight.form,
                }
            )
    return rows


def whole_lenet(repeats: int) -> list[dict]:
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import hostile

    from deepshrink.compressed import load_compressed, save_compressed
    from deepshrink.runtime.load import load_runtime

    with tempfile.TemporaryDirectory() as directory:
        path = save_compressed(
            hostile.small_model(sparsity=0.92, bits=5), Path(directory) / "lenet.dcz", model_name="lenet-300-100"
        )
        dense, _ = load_compressed(path)
        dense.eval()
        auto = load_runtime(path)
    rows = []
    with torch.no_grad():
        for batch in BATCHES:
            inputs = torch.randn(batch, 1, 28, 28)
            rounds = {"dense": [], "auto": []}
            for _ in range(5):
                rounds["dense"].append(median_seconds(lambda x=inputs: dense(x), repeats * 10, warmup=1))
                rounds["auto"].append(median_seconds(lambda x=inputs: auto(x), repeats * 10, warmup=1))
            dense_us, auto_us = (statistics.median(rounds[name]) * 1e6 for name in ("dense", "auto"))
            plans = {
                name: "/".join(module.choice.plans)
                for name, module in auto.named_modules()
                if isinstance(module, CompressedLinear)
            }
            rows.append(
                {"batch": batch, "dense_us": dense_us, "auto_us": auto_us, "ratio": dense_us / auto_us, "plans": plans}
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default="benchmarks/results/runtime_choice.json")
    parser.add_argument("--whole-only", action="store_true", help="only the whole LeNet-300-100")
    args = parser.parse_args()
    results = {"machine": machine_description(), "command": " ".join(sys.argv), "runs": []}
    print(json.dumps(results["machine"]))
    for threads in args.threads:
        torch.set_num_threads(threads)
        import numba

        numba.set_num_threads(threads)
        for name, rows, columns, density in [] if args.whole_only else LAYERS:
            for row in time_layer(random_weight(rows, columns, density), args.repeats):
                row |= {"layer": name, "threads": threads, **results["machine"]}
                results["runs"].append(row)
                print(
                    f"{threads}t {name:22} b{row['batch']:<3} dense {row['dense_us']:9.1f} csr {row['csr_us']:9.1f} "
                    f"auto {row['auto_us']:9.1f} us  {row['auto_vs_dense']:6.2f}x dense  "
                    f"{row['auto_vs_best_torch']:5.2f}x best torch  plans {row['plans']} ({row['form']})",
                    flush=True,
                )
        for row in whole_lenet(args.repeats):
            row |= {"layer": "lenet-300-100 whole", "threads": threads, **results["machine"]}
            results["runs"].append(row)
            print(
                f"{threads}t lenet-300-100 whole  b{row['batch']:<3} dense {row['dense_us']:9.1f} "
                f"auto {row['auto_us']:9.1f} us  {row['ratio']:6.2f}x  plans {row['plans']}",
                flush=True,
            )
    results["machine"]["load_after"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
