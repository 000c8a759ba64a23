"""Magnitude masks by selection (issue 21, point 1): `sparsity_mask` against the stable float64
argsort it replaced and an `np.partition` anchor that finds the same threshold, interleaved in one
process, on Laplace weights of 1M, 10M, 30M and 138M (VGG-16's count) values, 92.4% pruned.

    .venv/bin/python benchmarks/mask_selection.py [--sizes 1 10 30 138] [--repeats 3]

The sort is skipped above 30M (55 s and +3.7 GB at 138M, as issue 21 measured).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from deepshrink.prune.masks import sparsity_mask

SPARSITY = 0.924  # VGG-16 in the paper: 7.6% kept


def sorted_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    order = torch.argsort(weight.abs().flatten().double(), stable=True)
    mask = torch.ones(weight.numel(), dtype=torch.bool)
    mask[order[: round(sparsity * weight.numel())]] = False
    return mask.view_as(weight)


def partition_anchor(weight: torch.Tensor, sparsity: float) -> np.ndarray:
    magnitude = np.abs(weight.numpy().ravel())
    count = round(sparsity * magnitude.size)
    threshold = np.partition(magnitude, count - 1)[count - 1]
    return magnitude > threshold  # ties aside: the anchor's work, not its exact mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 30, 138])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for millions in args.sizes:
        torch.manual_seed(millions)
        weight = torch.distributions.Laplace(0.0, 0.02).sample((millions * 1_000_000,))
        candidates = {
            "selection": lambda weight=weight: sparsity_mask(weight, SPARSITY),
            "np.partition": lambda weight=weight: partition_anchor(weight, SPARSITY),
        }
        if millions <= 30:
            candidates["stable argsort"] = lambda weight=weight: sorted_mask(weight, SPARSITY)
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(args.repeats):
            for name, function in candidates.items():
                started = time.perf_counter()
                function()
                times[name].append(time.perf_counter() - started)
        if millions <= 30:
            assert torch.equal(sparsity_mask(weight, SPARSITY), sorted_mask(weight, SPARSITY))
        row = {"weights": millions * 1_000_000} | {name: statistics.median(values) for name, values in times.items()}
        rows.append(row)
        print(
            f"{millions:>4}M: "
            + ", ".join(f"{name} {seconds:.3f} s" for name, seconds in row.items() if name != "weights"),
            flush=True,
        )
    out = Path(__file__).resolve().parent / "results" / "mask_selection.json"
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
