"""k-means at VGG-16 scale: 100M weights into 32 and 256 clusters, to convergence.

Times our sorted-Lloyd k-means on 100M Laplace-distributed float32 weights, from the paper's
linear initialisation and from our grouped one, after a warm-up that compiles the kernels.
Inertia is compared with scikit-learn's KMeans from the same initialisation on subsamples of
1M (k=32) and 200k (k=256) weights (sklearn at full size takes minutes to hours), and with the
exact 1-D optimum (kmeans1d) on subsamples of 65,536 values (k=32 and 256, every initialisation
including the exact `optimal`) and 1M values (k=256).

    .venv/bin/python benchmarks/kmeans_speed.py [--size 100000000] [--rounds 1] [--timing-only]

--rounds repeats the timing against the anchor (both k, alternating); --timing-only stops after
it (the inertia comparisons take minutes).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numba
import numpy as np

from deepshrink.quantize.kmeans import initial_centroids, kmeans_1d


@numba.njit(cache=True)
def _anchor_lloyd(sorted_values, prefix, centroids):
    """The anchor (issue 21): Lloyd on sorted values with a float64 prefix sum per value; each
    boundary gallops from where it was; no empty-cluster handling beyond keeping the centroid.
    Written independently of deepshrink's kernel, for timing in the same run."""
    count = len(centroids)
    size = len(sorted_values)
    bounds = np.zeros(count + 1, dtype=np.int64)
    bounds[count] = size
    iterations = 0
    while True:
        iterations += 1
        changed = False
        for index in range(1, count):
            threshold = (centroids[index - 1] + centroids[index]) / 2
            position = bounds[index]
            step = 1
            if position < size and sorted_values[position] < threshold:
                low = position + 1
                high = low
                while high < size and sorted_values[high] < threshold:
                    low = high + 1
                    high = low + step
                    step *= 2
                high = min(high, size)
            else:
                high = position
                low = high - 1
                while low >= 0 and sorted_values[low] >= threshold:
                    high = low
                    low = high - step
                    step *= 2
                low = max(low + 1, 0)
            while low < high:
                middle = (low + high) // 2
                if sorted_values[middle] < threshold:
                    low = middle + 1
                else:
                    high = middle
            if low != bounds[index]:
                changed = True
                bounds[index] = low
        if not changed and iterations > 1:
            return iterations
        for index in range(count):
            members = bounds[index + 1] - bounds[index]
            if members > 0:
                centroids[index] = (prefix[bounds[index + 1]] - prefix[bounds[index]]) / members


def anchor_kmeans(values: np.ndarray, clusters: int) -> tuple[float, int]:
    """The anchor's seconds to convergence from linear initialisation (sort included) and its iterations."""
    started = time.perf_counter()
    sorted_values = np.sort(values)
    prefix = np.concatenate(([0.0], np.cumsum(sorted_values, dtype=np.float64)))
    centroids = np.linspace(float(sorted_values[0]), float(sorted_values[-1]), clusters)
    iterations = _anchor_lloyd(sorted_values, prefix, centroids)
    return time.perf_counter() - started, int(iterations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=100_000_000)
    parser.add_argument("--rounds", type=int, default=1, help="timing rounds against the anchor")
    parser.add_argument("--timing-only", action="store_true", help="stop after the timing against the anchor")
    args = parser.parse_args()
    generator = np.random.default_rng(0)
    values = generator.laplace(scale=0.01, size=args.size).astype(np.float32)
    kmeans_1d(values[:10_000], 32)  # compile
    anchor_kmeans(values[:10_000], 32)
    results = []
    for round_index, clusters in [(r, k) for r in range(args.rounds) for k in (32, 256)]:
        # the anchor and ours, alternating, in the same process
        anchor_seconds, anchor_iterations = anchor_kmeans(values, clusters)
        started = time.perf_counter()
        ours = kmeans_1d(values, clusters, "linear")
        ours_seconds = time.perf_counter() - started
        results.append(
            {
                "size": args.size,
                "round": round_index,
                "clusters": clusters,
                "anchor_seconds": anchor_seconds,
                "anchor_iterations": anchor_iterations,
                "ours_seconds": ours_seconds,
                "ours_iterations": ours.iterations,
            }
        )
        print(
            f"{args.size:,} weights, k={clusters}, linear: anchor (np.sort + per-value prefix + galloping Lloyd) "
            f"{anchor_seconds:.2f} s, {anchor_iterations} iterations; ours {ours_seconds:.2f} s, "
            f"{ours.iterations} iterations ({ours_seconds / anchor_seconds:.2f}x the anchor's time)",
            flush=True,
        )
    out = Path("benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    if args.timing_only:
        (out / "kmeans_speed_timing.json").write_text(json.dumps(results, indent=2))
        return
    for clusters, init in ((32, "linear"), (256, "linear"), (32, "grouped"), (256, "grouped")):
        started = time.perf_counter()
        result = kmeans_1d(values, clusters, init)
        seconds = time.perf_counter() - started
        results.append(
            {
                "size": args.size,
                "clusters": clusters,
                "init": init,
                "seconds": seconds,
                "iterations": result.iterations,
                "inertia": result.inertia,
            }
        )
        print(
            f"{args.size:,} weights, k={clusters}, {init} init: {seconds:.2f} s, {result.iterations} Lloyd iterations, "
            f"inertia {result.inertia:.6g}",
            flush=True,
        )

    from sklearn.cluster import KMeans

    # sklearn needs minutes at k=256 on a million points, so that comparison uses 200k.
    for clusters, count in ((32, 1_000_000), (256, 200_000)):
        subsample = values[:count]
        ours = kmeans_1d(subsample, clusters, "linear")
        start = initial_centroids(np.sort(subsample), clusters, "linear")
        started = time.perf_counter()
        reference = KMeans(clusters, init=start.reshape(-1, 1), n_init=1, algorithm="lloyd", tol=0, max_iter=100_000)
        reference.fit(subsample.reshape(-1, 1).astype(np.float64))
        sklearn_seconds = time.perf_counter() - started
        results.append(
            {
                "size": len(subsample),
                "clusters": clusters,
                "ours_inertia": ours.inertia,
                "sklearn_inertia": float(reference.inertia_),
                "sklearn_seconds": sklearn_seconds,
                "sklearn_iterations": int(reference.n_iter_),
            }
        )
        print(
            f"{count:,} subsample, k={clusters}: inertia ours {ours.inertia:.6g}, sklearn {reference.inertia_:.6g} "
            f"(ratio {ours.inertia / reference.inertia_:.9f}); sklearn took {sklearn_seconds:.1f} s",
            flush=True,
        )

    import kmeans1d

    # Against the exact optimum: "optimal" on 65,536 values (its limit, all distinct here), the
    # others also on 1M values at k=256, where "grouped" is the search over runs of values.
    for count, clusters in ((65_536, 32), (65_536, 256), (1_000_000, 256)):
        small = values[:count].astype(np.float64)
        labels, centroids = kmeans1d.cluster(small, clusters)
        optimum = float(np.sum((small - np.asarray(centroids)[labels]) ** 2))
        for init in ("linear", "density", "forgy", "grouped", "optimal"):
            if init == "optimal" and count > 65_536:
                continue
            ours = kmeans_1d(small, clusters, init)
            results.append(
                {
                    "size": len(small),
                    "clusters": clusters,
                    "init": init,
                    "ours_inertia": ours.inertia,
                    "exact_optimum": optimum,
                }
            )
            print(
                f"{count:,} subsample, k={clusters}, {init}: inertia {ours.inertia:.6g} vs exact optimum "
                f"{optimum:.6g} (+{100 * (ours.inertia / optimum - 1):.2f}%)",
                flush=True,
            )
    (out / "kmeans_speed.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
