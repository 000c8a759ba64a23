"""1-D k-means for weight sharing, exact Lloyd iterations on sorted data.

In one dimension every k-means cluster is a contiguous run of the sorted values, bounded by the
midpoints between neighbouring centroids. So we sort once and keep prefix sums of the values
(one per block of 64); a Lloyd step then costs k searches for the boundaries, each outward
from where it was (galloping), and k short sums for the clusters' totals and counts: at most
O(k log n) instead of O(n k). We iterate until the boundaries stop moving, which is exact
convergence (a fixed point of Lloyd's algorithm), not a tolerance. The cost is dominated by
the one sort (np.sort, or a radix sort for large float32 inputs where that is faster) and the
final labelling.

Empty clusters are relocated as scikit-learn does: onto the value farthest from its centroid
(in 1-D, an end point of some cluster), so centroids are not stranded in the tails.

Initialisations (Han et al. 2016, section 3.1 and Figure 4):
- linear: k values evenly spaced between the minimum and the maximum weight;
- density: the weights' empirical CDF is cut at k evenly spaced heights (i + 0.5) / k and the
  centroids are the weights at those quantiles, so they crowd where the weights do;
- forgy: k distinct weights drawn at random (seeded);
- optimal (ours): the globally optimal clustering by dynamic programming (Wang & Song 2011,
  with the divide-and-conquer speed-up that the monotone split points allow) over the distinct
  values, exact, for inputs of up to 65,536 distinct values (a ConfigError above, naming
  `grouped`): the search costs O(k m log m) for m distinct values, and a float32 layer of
  millions of weights has millions of them;
- grouped (ours): the same search over 65,536 runs of consecutive sorted values, each kept
  whole, at any size; Lloyd's iterations on the full data then refine it. Not the optimum
  (on 1M weights at k=256 it ended 3.4% above it), but usually below linear's local optimum.
Lloyd's algorithm alone stops at a local optimum; from linear initialisation on heavy-tailed
weights that can be 15% worse than the optimum.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numba
import numpy as np

from deepshrink.errors import ConfigError

INITIALIZATIONS = ("linear", "density", "forgy", "optimal", "grouped")
OPTIMAL_LIMIT = 1 << 16  # "optimal": the most distinct values the exact search takes
GROUPS = 1 << 16  # "grouped": runs of consecutive sorted values the search keeps whole
MAX_CLUSTERS = 1 << 16


@dataclass(frozen=True)
class KMeansResult:
    centroids: np.ndarray  # float64, ascending, length k (fewer only if there are fewer distinct values)
    labels: np.ndarray  # cluster index of each input value, uint8 or uint16, in the input's order
    inertia: float  # sum of squared distances to the assigned centroid
    iterations: int
    initial: np.ndarray  # the starting centroids, ascending


def initial_centroids(sorted_values: np.ndarray, clusters: int, method: str, seed: int = 0) -> np.ndarray:
    """The starting centroids for `method`, ascending, from already sorted values.

    Args:
        sorted_values: the values, ascending.
        clusters: how many centroids.
        method: one of INITIALIZATIONS (see the module's docstring).
        seed: the seed of "random".

    Returns:
        The centroids, float64.

    Raises:
        ConfigError: an unknown method, or "optimal" on more than OPTIMAL_LIMIT distinct values.
    """
    if method not in INITIALIZATIONS:
        raise ConfigError(f"init={method!r} should be one of {', '.join(INITIALIZATIONS)}")
    if method == "optimal":
        # Each distinct value a group: an optimal 1-D clustering never needs to split equal values.
        edges = np.concatenate(([0], np.flatnonzero(np.diff(sorted_values)) + 1, [len(sorted_values)]))
        if len(edges) - 1 > OPTIMAL_LIMIT:
            raise ConfigError(
                f"init='optimal' is exact only up to {OPTIMAL_LIMIT:,} distinct values and these weights have "
                f"{len(edges) - 1:,}; use init='grouped' (the same search over {GROUPS:,} runs of sorted values, "
                "then Lloyd) or 'linear'"
            )
        return _centroids_over_groups(sorted_values, edges, clusters)
    if method == "grouped":
        groups = min(len(sorted_values), GROUPS)
        return _centroids_over_groups(
            sorted_values, (np.arange(groups + 1, dtype=np.int64) * len(sorted_values)) // groups, clusters
        )
    if method == "linear":
        return np.linspace(float(sorted_values[0]), float(sorted_values[-1]), clusters)
    if method == "density":
        heights = (np.arange(clusters) + 0.5) / clusters
        positions = np.minimum((heights * len(sorted_values)).astype(np.int64), len(sorted_values) - 1)
        return sorted_values[positions].astype(np.float64)
    distinct = np.unique(sorted_values)
    chosen = np.random.default_rng(seed).choice(len(distinct), size=min(clusters, len(distinct)), replace=False)
    return np.sort(distinct[chosen].astype(np.float64))


def _centroids_over_groups(sorted_values: np.ndarray, edges: np.ndarray, clusters: int) -> np.ndarray:
    """The centroids of the optimal clustering of `sorted_values` that keeps each group
    (sorted_values[edges[i]:edges[i + 1]]) whole."""
    groups = len(edges) - 1
    counts = np.diff(edges).astype(np.float64)
    sums, squares = _group_statistics(sorted_values, edges)
    clusters = min(clusters, groups)
    splits = _optimal_splits(
        np.concatenate(([0.0], np.cumsum(counts))),
        np.concatenate(([0.0], np.cumsum(sums))),
        np.concatenate(([0.0], np.cumsum(squares))),
        clusters,
    )
    return np.array([(np.sum(sums[a:b]) / np.sum(counts[a:b])) for a, b in zip(splits[:-1], splits[1:], strict=True)])


RADIX_FROM = 1_000_000  # below this many float32 values numpy's sort is as fast


def sort_values(values: np.ndarray) -> np.ndarray:
    """`values` sorted ascending, as np.sort gives them (finite values).

    Large float32 inputs go through whichever of np.sort and a three-pass radix sort is faster
    on this machine, measured once per process (`radix_sort_is_faster`). Which one wins
    depends on the CPU: numpy dispatches a vectorised sort on some CPUs and not on others. For
    100M weights, on an AMD EPYC np.sort took 6.07 s and the radix sort 1.56 s; on an Intel
    Xeon np.sort took 1.1-1.3 s and the radix sort 2.8 s.

    Args:
        values: a flat array of finite values.

    Returns:
        A sorted copy.
    """
    if values.dtype != np.float32 or values.size < RADIX_FROM or not radix_sort_is_faster():
        return np.sort(values)
    return _radix_sort(values)


def _radix_sort(values: np.ndarray) -> np.ndarray:
    out = np.empty_like(values)
    _radix_sort_float32(np.ascontiguousarray(values), out, np.empty(values.size, dtype=np.uint32))
    return out


@functools.cache
def radix_sort_is_faster() -> bool:
    """Whether the radix sort beats np.sort on this machine, timed on RADIX_FROM Laplace float32
    values (the best of three each, about 0.1 s once per process). The ratio measured at 1M
    values held at 4M, 20M and 100M on both machines above.

    Returns:
        True when the radix sort took less time.
    """
    sample = np.random.default_rng(0).laplace(0.0, 1.0, RADIX_FROM).astype(np.float32)
    _radix_sort(sample[:1000])  # compile (or load from the cache) outside the timing
    timings = {}
    for name, sort in (("radix", _radix_sort), ("numpy", np.sort)):
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            sort(sample)
            best = min(best, time.perf_counter() - started)
        timings[name] = best
    return timings["radix"] < timings["numpy"]


@numba.njit(cache=True, nogil=True)
def _radix_sort_float32(values, out, scratch):
    """LSD radix sort of float32 by their bits, 11 bits per pass. Each float becomes an unsigned
    key that orders as the float does (negatives: all bits flipped; positives: the sign bit
    set); `out`, viewed as keys, and `scratch` take turns as source and destination."""
    count = len(values)
    bits = values.view(np.uint32)
    keys = out.view(np.uint32)
    histograms = np.zeros((3, 2048), dtype=np.int64)
    for index in range(count):
        word = np.int64(bits[index])
        key = (word ^ 0xFFFFFFFF) if word & 0x80000000 else (word | 0x80000000)
        keys[index] = np.uint32(key)
        histograms[0, key & 2047] += 1
        histograms[1, (key >> 11) & 2047] += 1
        histograms[2, key >> 22] += 1
    for digit in range(3):
        total = 0
        for bucket in range(2048):
            size = histograms[digit, bucket]
            histograms[digit, bucket] = total
            total += size
    source, destination = keys, scratch
    for digit in range(3):
        shift = 11 * digit
        for index in range(count):
            bucket = (np.int64(source[index]) >> shift) & 2047
            destination[histograms[digit, bucket]] = source[index]
            histograms[digit, bucket] += 1
        source, destination = destination, source
    for index in range(count):  # three passes leave the keys in `scratch`: back to floats in `out`
        key = np.int64(source[index])
        keys[index] = np.uint32((key & 0x7FFFFFFF) if key & 0x80000000 else (key ^ 0xFFFFFFFF))


@numba.njit(cache=True, nogil=True)
def _group_statistics(sorted_values, edges):
    """Per group of consecutive values: the sum and the sum of squares, in float64."""
    groups = len(edges) - 1
    sums = np.zeros(groups)
    squares = np.zeros(groups)
    for group in range(groups):
        for index in range(edges[group], edges[group + 1]):
            value = float(sorted_values[index])
            sums[group] += value
            squares[group] += value * value
    return sums, squares


@numba.njit(cache=True, nogil=True, inline="always")
def _segment_cost(weights, sums, squares, start, end):
    """Sum of squared deviations from the mean of groups start..end-1."""
    weight = weights[end] - weights[start]
    total = sums[end] - sums[start]
    return (squares[end] - squares[start]) - total * total / weight


@numba.njit(cache=True, nogil=True)
def _optimal_splits(weights, sums, squares, clusters):
    """Group indices where each of the `clusters` optimal segments starts (plus the end).

    cost[c][j] = min over i of cost[c-1][i] + segment(i, j); the best i never decreases as j
    grows, so each layer is solved by divide and conquer in O(m log m).
    """
    groups = len(weights) - 1
    previous = np.empty(groups + 1)
    current = np.empty(groups + 1)
    choice = np.zeros((clusters, groups + 1), dtype=np.int32)
    for end in range(1, groups + 1):
        previous[end] = _segment_cost(weights, sums, squares, 0, end)
    stack = np.empty((4 * (groups + 2), 4), dtype=np.int64)
    for layer in range(1, clusters):
        for end in range(groups + 1):
            current[end] = np.inf
        depth = 0
        stack[0, 0], stack[0, 1], stack[0, 2], stack[0, 3] = layer + 1, groups, layer, groups - 1
        depth = 1
        while depth > 0:
            depth -= 1
            low, high, option_low, option_high = stack[depth, 0], stack[depth, 1], stack[depth, 2], stack[depth, 3]
            if low > high:
                continue
            middle = (low + high) // 2
            best, best_start = np.inf, option_low
            for start in range(option_low, min(middle - 1, option_high) + 1):
                value = previous[start] + _segment_cost(weights, sums, squares, start, middle)
                if value < best:
                    best, best_start = value, start
            current[middle] = best
            choice[layer, middle] = best_start
            stack[depth, 0], stack[depth, 1], stack[depth, 2], stack[depth, 3] = low, middle - 1, option_low, best_start
            depth += 1
            stack[depth, 0], stack[depth, 1], stack[depth, 2], stack[depth, 3] = (
                middle + 1,
                high,
                best_start,
                option_high,
            )
            depth += 1
        for end in range(groups + 1):
            previous[end] = current[end]
    splits = np.empty(clusters + 1, dtype=np.int64)
    splits[clusters] = groups
    end = groups
    for layer in range(clusters - 1, 0, -1):
        end = choice[layer, end]
        splits[layer] = end
    splits[0] = 0
    return splits


@numba.njit(cache=True, nogil=True, inline="always")
def _gallop(sorted_values, threshold, hint):
    """Index of the first sorted value >= threshold (compared in float64, no array copies),
    searched outward from `hint` (last iteration's boundary) in doubling steps, then by
    bisection: O(log distance moved) probes near the hint instead of O(log n)
    across the whole array. Late in convergence boundaries move by a few values, so this is
    what makes 33,000 iterations at k=256 cheap (issue 21: 2.6x per iteration otherwise)."""
    count = len(sorted_values)
    if hint < count and sorted_values[hint] < threshold:  # the answer is right of the hint
        low = hint + 1
        probe, step = low, 1
        while probe < count and sorted_values[probe] < threshold:
            low = probe + 1
            probe = low + step
            step *= 2
        high = min(probe, count)
    else:  # the answer is at the hint or left of it
        high = min(hint, count)
        probe, step = high - 1, 1
        while probe >= 0 and sorted_values[probe] >= threshold:
            high = probe
            probe = high - step
            step *= 2
        low = max(probe + 1, 0)
    while low < high:
        middle = (low + high) // 2
        if sorted_values[middle] < threshold:
            low = middle + 1
        else:
            high = middle
    return low


@numba.njit(cache=True, nogil=True)
def _boundaries(sorted_values, centroids, bounds, hints):
    """The clusters' boundaries (midpoints between neighbouring centroids) into `bounds`,
    each searched from the same boundary in `hints`."""
    count = len(centroids)
    bounds[0] = 0
    bounds[count] = len(sorted_values)
    for index in range(count - 1):
        bounds[index + 1] = _gallop(sorted_values, (centroids[index] + centroids[index + 1]) / 2, hints[index + 1])


@numba.njit(cache=True, nogil=True)
def _lloyd(sorted_values, sums, centroids, max_iterations):
    """Lloyd steps on sorted data until the cluster boundaries stop moving."""
    count = len(centroids)
    bounds = np.empty(count + 1, dtype=np.int64)
    new_bounds = np.empty(count + 1, dtype=np.int64)
    prefixes = np.empty(count + 1)
    for index in range(count + 1):  # first hints: even spacing
        new_bounds[index] = (index * len(sorted_values)) // count
    _boundaries(sorted_values, centroids, bounds, new_bounds)
    previous = np.empty_like(centroids)
    iterations = 0
    while iterations < max_iterations:
        iterations += 1
        previous[:] = centroids
        empty = 0
        for index in range(count + 1):  # each boundary's prefix sum once, shared by its two clusters
            prefixes[index] = _prefix(sorted_values, sums, bounds[index])
        for index in range(count):
            size = bounds[index + 1] - bounds[index]
            if size > 0:
                centroids[index] = (prefixes[index + 1] - prefixes[index]) / size
            else:
                empty += 1
        if empty:  # relocated centroids can land anywhere; means of ordered runs stay ordered
            _relocate_empty(sorted_values, sums, previous, centroids, bounds)
            centroids.sort()
        _boundaries(sorted_values, centroids, new_bounds, bounds)
        changed = False
        for index in range(count + 1):
            if new_bounds[index] != bounds[index]:
                changed = True
            bounds[index] = new_bounds[index]
        if not changed:
            break
    return iterations


@numba.njit(cache=True, nogil=True)
def _relocate_empty(sorted_values, sums, previous, centroids, bounds):
    """Move the empty clusters' centroids onto the values farthest from their own centroids.

    As scikit-learn does: the empty clusters take the n_empty farthest points overall, and each
    donor cluster's centroid becomes the mean of the points it keeps.
    """
    left = bounds[:-1].copy()
    right = bounds[1:] - 1
    _give_farthest_to_empty(sorted_values, previous, centroids, bounds, left, right)
    for cluster in range(len(centroids)):
        if left[cluster] <= right[cluster] and (
            left[cluster] != bounds[cluster] or right[cluster] != bounds[cluster + 1] - 1
        ):
            kept = right[cluster] - left[cluster] + 1
            high = _prefix(sorted_values, sums, right[cluster] + 1)
            centroids[cluster] = (high - _prefix(sorted_values, sums, left[cluster])) / kept


@numba.njit(cache=True, nogil=True)
def _give_farthest_to_empty(sorted_values, previous, centroids, bounds, left, right):
    """Set each empty cluster's centroid to the value farthest from the centroid it was assigned
    by (`previous`), each value given once. In 1-D a cluster's farthest values lie at its ends, so
    each cluster has a pointer at either end (`left`, `right`, moved in place) that walks inward
    as values are taken; the donors' new means are the caller's (weighted or not)."""
    count = len(centroids)
    for empty in range(count):
        if bounds[empty + 1] > bounds[empty]:
            continue
        best_distance, best_cluster, best_side = -1.0, -1, 0
        for cluster in range(count):
            if left[cluster] > right[cluster]:
                continue
            low_distance = previous[cluster] - sorted_values[left[cluster]]
            high_distance = sorted_values[right[cluster]] - previous[cluster]
            if low_distance > best_distance:
                best_distance, best_cluster, best_side = low_distance, cluster, 0
            if high_distance > best_distance:
                best_distance, best_cluster, best_side = high_distance, cluster, 1
        if best_cluster < 0:
            return
        if best_side == 0:
            centroids[empty] = sorted_values[left[best_cluster]]
            left[best_cluster] += 1
        else:
            centroids[empty] = sorted_values[right[best_cluster]]
            right[best_cluster] -= 1


BLOCK = 64  # values per stored prefix sum


@numba.njit(cache=True, nogil=True)
def _block_sums(sorted_values, blocks):
    """blocks[j] = sum of the first j * BLOCK values, accumulated in float64.

    Storing one sum per BLOCK values instead of one per value keeps this array small
    (12 MB for 100M weights instead of 800 MB), which matters more than the arithmetic:
    first-touching 800 MB of fresh pages costs over a second.
    """
    total = 0.0
    blocks[0] = 0.0
    for index in range(len(sorted_values)):
        total += sorted_values[index]
        if (index + 1) % BLOCK == 0:
            blocks[(index + 1) // BLOCK] = total


@numba.njit(cache=True, nogil=True, inline="always")
def _prefix(sorted_values, blocks, end):
    """Sum of sorted_values[:end] from the block sums plus at most BLOCK - 1 values."""
    block = end // BLOCK
    total = blocks[block]
    for index in range(block * BLOCK, end):
        total += sorted_values[index]
    return total


@numba.njit(cache=True, parallel=True)
def _assign(values, centroids, labels):
    """Label each value with its nearest centroid; returns the total squared error.

    The midpoints are padded with +inf to a power of two so that the binary search runs a
    fixed number of steps with no data-dependent branch: on random weights a branchy search
    mispredicts about every other step.
    """
    count = len(centroids)
    steps = 0
    while (1 << steps) < count:
        steps += 1
    padded = np.full(1 << steps, np.inf)
    for index in range(count - 1):
        padded[index] = (centroids[index] + centroids[index + 1]) / 2
    error = 0.0
    for position in numba.prange(len(values)):
        value = float(values[position])
        low = 0
        for step in range(steps - 1, -1, -1):
            probe = low + (1 << step) - 1
            low += (1 << step) * (padded[probe] <= value)
        labels[position] = low
        difference = value - centroids[low]
        error += difference * difference
    return error


def _assign_float32(values: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> float:
    """`_assign` for float32 values, the same labels and error, faster: a table over the top 16
    bits of each value's order-preserving key gives the label of the smallest value in its
    bucket, and a short scan over the few midpoints inside the bucket (usually none) finishes.
    At k=256 on 100M weights, two threads: 0.8 s against the binary search's 3.3 s, timed in turn
    on a loaded machine (BENCHMARKS.md)."""
    midpoints = (centroids[:-1] + centroids[1:]) / 2
    smallest_keys = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    bits = np.where(smallest_keys & np.uint32(0x80000000), smallest_keys & np.uint32(0x7FFFFFFF), ~smallest_keys)
    with np.errstate(invalid="ignore"):  # buckets of NaN patterns: no finite value falls in them
        smallest = bits.view(np.float32).astype(np.float64)
    first = np.searchsorted(midpoints, smallest, side="right").astype(np.int32)
    padded = np.append(midpoints, np.inf)  # the scan stops at the last centroid
    return _assign_by_table(values.view(np.uint32), values, first, padded, centroids, labels)


@numba.njit(cache=True, parallel=True)
def _assign_by_table(keys_of, values, first, padded, centroids, labels):
    error = 0.0
    for position in numba.prange(len(values)):
        word = np.int64(keys_of[position])
        key = (word ^ 0xFFFFFFFF) if word & 0x80000000 else (word | 0x80000000)
        label = first[key >> 16]
        value = float(values[position])
        while padded[label] <= value:
            label += 1
        labels[position] = label
        difference = value - centroids[label]
        error += difference * difference
    return error


def _check_arguments(values: np.ndarray, clusters) -> None:
    """The checks both k-means forms make of their values and k."""
    if not isinstance(clusters, int | np.integer) or not 1 <= clusters <= MAX_CLUSTERS:
        raise ConfigError(f"clusters={clusters!r} should be an integer from 1 to {MAX_CLUSTERS}")
    if values.size == 0:
        raise ConfigError("k-means needs at least one value; the layer has no weights to share")
    if not np.all(np.isfinite(values)):
        raise ConfigError("k-means input holds NaN or infinite weights; the model is broken, retrain or reload it")


def _starting_centroids(sorted_values: np.ndarray, clusters: int, init: str | np.ndarray, seed: int) -> np.ndarray:
    """`init`'s centroids: a method's (`initial_centroids`) or the given ones, ascending."""
    if isinstance(init, str):
        return initial_centroids(sorted_values, clusters, init, seed)
    centroids = np.sort(np.asarray(init, dtype=np.float64).reshape(-1))
    if len(centroids) != clusters:
        raise ConfigError(f"init has {len(centroids)} centroids but clusters={clusters}")
    return centroids


def kmeans_1d(
    values: np.ndarray,
    clusters: int,
    init: str | np.ndarray = "linear",
    *,
    seed: int = 0,
    max_iterations: int = 1_000_000,
) -> KMeansResult:
    """Cluster 1-D `values` into `clusters` groups by Lloyd's algorithm, run to convergence.

    `init` is a method name or an explicit array of starting centroids.

    Args:
        values: the values (flattened).
        clusters: k, 1 to MAX_CLUSTERS.
        init: the initialisation (see `initial_centroids`), or starting centroids.
        seed: the seed of random initialisation.
        max_iterations: a bound on Lloyd's iterations.

    Returns:
        The KMeansResult: centroids, labels, inertia, iterations and starting centroids.

    Raises:
        ConfigError: `clusters` out of range, no values, non-finite values, or an explicit
            init of another length.
    """
    values = np.asarray(values)
    if values.ndim != 1:
        values = values.reshape(-1)
    if values.dtype not in (np.float32, np.float64):
        values = values.astype(np.float32)
    _check_arguments(values, clusters)
    sorted_values = sort_values(values)
    distinct = np.unique(sorted_values) if values.size <= 4 * clusters else None
    if distinct is not None and len(distinct) <= clusters:
        # Every distinct value can be its own centroid: the exact optimum, with zero error.
        labels = np.searchsorted(distinct, values).astype(np.uint8 if clusters <= 256 else np.uint16)
        return KMeansResult(distinct.astype(np.float64), labels, 0.0, 0, distinct.astype(np.float64))
    centroids = _starting_centroids(sorted_values, clusters, init, seed)
    centroids = np.ascontiguousarray(centroids, dtype=np.float64)
    initial = centroids.copy()
    sums = np.empty(len(sorted_values) // BLOCK + 1, dtype=np.float64)
    _block_sums(sorted_values, sums)
    iterations = _lloyd(sorted_values, sums, centroids, max_iterations)
    del sorted_values, sums
    labels = np.empty(values.shape, dtype=np.uint8 if len(centroids) <= 256 else np.uint16)
    inertia = (_assign_float32 if values.dtype == np.float32 else _assign)(values, centroids, labels)
    return KMeansResult(centroids, labels, float(inertia), int(iterations), initial)


def weighted_kmeans_1d(
    values: np.ndarray,
    importance: np.ndarray,
    clusters: int,
    init: str | np.ndarray = "linear",
    *,
    seed: int = 0,
    max_iterations: int = 1_000_000,
) -> KMeansResult:
    """Cluster 1-D `values` minimising sum_i importance_i * (value_i - centroid_i)^2.

    Each value's importance scales all of its distances alike, so the nearest centroid is still
    each value's best one and the clusters are still contiguous runs of the sorted values; only the
    centroids move, to the importance-weighted means of their runs. With importance the loss's
    second derivative for each weight, this is Choi, El-Khamy & Lee's Hessian-weighted k-means
    ("Towards the limit of network quantization", ICLR 2017): the codebook is spent where an error
    costs the most loss. A cluster whose values all have zero importance keeps its centroid.

    Args:
        values: the values (flattened).
        importance: one non-negative finite weight per value, summing to more than zero.
        clusters: k, 1 to MAX_CLUSTERS.
        init: the initialisation (see `initial_centroids`; it reads the values, not the importance),
            or starting centroids. Lloyd's steps never raise the weighted error, so starting from
            the unweighted clustering's centroids ends no worse than it on the weighted error.
        seed: the seed of random initialisation.
        max_iterations: a bound on Lloyd's iterations.

    Returns:
        The KMeansResult; its inertia is the weighted sum of squared errors.

    Raises:
        ConfigError: `clusters` out of range, no values, non-finite values, or an importance of
            another length, negative, non-finite or all zero.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    importance = np.asarray(importance, dtype=np.float64).reshape(-1)
    if importance.shape != values.shape:
        raise ConfigError(f"importance has {importance.size} entries for {values.size} values; give one per value")
    if not np.all(np.isfinite(importance)) or np.any(importance < 0) or not importance.sum() > 0:
        raise ConfigError("importance should be finite and non-negative with a positive sum, one weight per value")
    _check_arguments(values, clusters)
    label_type = np.uint8 if clusters <= 256 else np.uint16
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    distinct = np.unique(sorted_values)
    if len(distinct) <= clusters:
        labels = np.searchsorted(distinct, values).astype(label_type)
        return KMeansResult(distinct, labels, 0.0, 0, distinct.copy())
    sorted_importance = importance[order]
    # Prefix sums of w and w*x: a run's weighted mean is then two differences.
    mass = np.concatenate(([0.0], np.cumsum(sorted_importance)))
    moment = np.concatenate(([0.0], np.cumsum(sorted_importance * sorted_values)))
    centroids = np.sort(_starting_centroids(sorted_values, clusters, init, seed))
    initial = centroids.copy()
    edges = None
    iterations = 0
    while iterations < max_iterations:
        # A value on a midpoint goes to the upper centroid, as `_assign` labels it.
        bounds = np.concatenate(
            ([0], np.searchsorted(sorted_values, (centroids[:-1] + centroids[1:]) / 2), [values.size])
        )
        if edges is not None and np.array_equal(bounds, edges):
            break
        edges = bounds
        weights = mass[edges[1:]] - mass[edges[:-1]]
        sums = moment[edges[1:]] - moment[edges[:-1]]
        filled = weights > 0
        previous = centroids
        centroids = np.where(filled, sums / np.where(filled, weights, 1.0), centroids)
        if np.any(edges[1:] == edges[:-1]):
            centroids = _relocate_empty_weighted(sorted_values, mass, moment, previous, centroids, edges)
        # Relocated centroids land anywhere, and two can meet when a run's values all weigh nothing.
        centroids = np.sort(centroids)
        iterations += 1
    labels = np.empty(values.shape, dtype=label_type)
    _assign(values, centroids, labels)
    inertia = float(np.sum(importance * (values - centroids[labels]) ** 2))
    return KMeansResult(centroids, labels, inertia, iterations, initial)


def _relocate_empty_weighted(sorted_values, mass, moment, previous, centroids, edges) -> np.ndarray:
    """`_relocate_empty` with importance: the empty clusters take the farthest values, and each
    donor's centroid becomes the weighted mean of the values it keeps (as scikit-learn relocates
    with sample weights)."""
    centroids = centroids.copy()
    left = edges[:-1].copy()
    right = edges[1:] - 1
    _give_farthest_to_empty(sorted_values, previous, centroids, edges, left, right)
    for cluster in range(len(centroids)):
        taken = left[cluster] != edges[cluster] or right[cluster] != edges[cluster + 1] - 1
        weight = mass[right[cluster] + 1] - mass[left[cluster]]
        if left[cluster] <= right[cluster] and taken and weight > 0:
            centroids[cluster] = (moment[right[cluster] + 1] - moment[left[cluster]]) / weight
    return centroids
