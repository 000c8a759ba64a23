"""1-D k-means against trusted references: scikit-learn's Lloyd (with sample weights for the
importance-weighted form) and the exact optimum."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans

from deepshrink.errors import ConfigError
from deepshrink.quantize.kmeans import initial_centroids, kmeans_1d, weighted_kmeans_1d


def laplace(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).laplace(scale=0.05, size=size).astype(np.float32)


@pytest.mark.parametrize("init", ["linear", "density", "forgy"])
@pytest.mark.parametrize("clusters", [4, 31, 32])
def test_at_least_as_good_as_sklearn_from_the_same_initialisation(init, clusters):
    values = laplace(5000, seed=clusters)
    ours = kmeans_1d(values, clusters, init)
    start = initial_centroids(np.sort(values), clusters, init)
    reference = KMeans(clusters, init=start.reshape(-1, 1), n_init=1, algorithm="lloyd", tol=0, max_iter=100_000)
    reference.fit(values.reshape(-1, 1).astype(np.float64))
    assert ours.inertia <= reference.inertia_ * (1 + 1e-9)


def test_inertia_and_labels_are_consistent():
    values = laplace(3000)
    result = kmeans_1d(values, 16, "density")
    assert result.labels.dtype == np.uint8
    recomputed = float(np.sum((values.astype(np.float64) - result.centroids[result.labels]) ** 2))
    assert result.inertia == pytest.approx(recomputed, rel=1e-9)
    # Lloyd's fixed point: every value is labelled with its nearest centroid, every centroid is its cluster's mean.
    nearest = np.argmin(np.abs(values[:, None] - result.centroids[None, :]), axis=1)
    assert np.array_equal(nearest, result.labels)
    for cluster in range(16):
        members = values[result.labels == cluster]
        if members.size:
            assert result.centroids[cluster] == pytest.approx(members.astype(np.float64).mean(), rel=1e-9)


def test_linear_initialisation_is_evenly_spaced_between_min_and_max():
    values = np.sort(laplace(1000))
    start = initial_centroids(values, 5, "linear")
    assert start[0] == values[0] and start[-1] == values[-1]
    assert np.allclose(np.diff(start), (values[-1] - values[0]) / 4)


def test_density_initialisation_sits_at_evenly_spaced_quantiles():
    values = np.arange(1000, dtype=np.float32)
    assert initial_centroids(values, 4, "density").tolist() == [125.0, 375.0, 625.0, 875.0]


def test_forgy_initialisation_samples_distinct_weights_reproducibly():
    values = np.sort(laplace(1000))
    first = initial_centroids(values, 8, "forgy", seed=3)
    assert len(set(first.tolist())) == 8 and set(first.tolist()) <= set(values.astype(np.float64).tolist())
    assert np.array_equal(first, initial_centroids(values, 8, "forgy", seed=3))


def test_empty_clusters_are_relocated_not_stranded():
    """Linear init on heavy tails leaves clusters empty; relocation puts every centroid to use."""
    values = laplace(2000)
    result = kmeans_1d(values, 64, "linear")
    assert len(np.unique(result.labels)) == 64


def test_fewer_distinct_values_than_clusters_is_exact():
    values = np.array([0.5, -0.5, 0.5, 2.0], dtype=np.float32)
    result = kmeans_1d(values, 8, "linear")
    assert result.inertia == 0.0 and np.array_equal(result.centroids[result.labels], values)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((np.ones(3), 0), "clusters=0"),
        ((np.array([]), 4), "at least one"),
        ((np.array([1.0, np.nan]), 2), "NaN"),
        ((np.ones(5), 2, "kmeans++"), "init='kmeans\\+\\+'"),
    ],
)
def test_bad_arguments_are_named(arguments, message):
    with pytest.raises(ConfigError, match=message):
        kmeans_1d(np.asarray(arguments[0], dtype=np.float32) + np.arange(len(arguments[0])), *arguments[1:])


@pytest.mark.parametrize("clusters", [2, 32, 255])
def test_optimal_initialisation_reaches_the_exact_optimum(clusters):
    """Checked against kmeans1d, an exact O(kn) 1-D k-means solver."""
    import kmeans1d

    values = laplace(20_000, seed=clusters)
    labels, centroids = kmeans1d.cluster(values.astype(np.float64), clusters)
    optimum = float(np.sum((values.astype(np.float64) - np.asarray(centroids)[labels]) ** 2))
    assert kmeans_1d(values, clusters, "optimal").inertia == pytest.approx(optimum, rel=1e-9)


def test_optimal_is_exact_on_many_tied_values_and_refuses_more_distinct_values_than_it_can_search():
    """Ties are grouped: 200,000 weights of 4,001 distinct values get the exact optimum (which a
    search over runs of values would miss); past OPTIMAL_LIMIT distinct values, a clean error
    that names `grouped`, which runs at any size and equals `optimal` where both run on single values."""
    import kmeans1d

    from deepshrink.quantize.kmeans import OPTIMAL_LIMIT

    values = np.round(laplace(200_000, seed=3), 3)
    assert len(np.unique(values)) <= OPTIMAL_LIMIT
    labels, centroids = kmeans1d.cluster(values.astype(np.float64), 32)
    optimum = float(np.sum((values.astype(np.float64) - np.asarray(centroids)[labels]) ** 2))
    assert kmeans_1d(values, 32, "optimal").inertia == pytest.approx(optimum, rel=1e-9)
    many = laplace(OPTIMAL_LIMIT + 1000, seed=4)
    with pytest.raises(ConfigError, match="grouped"):
        kmeans_1d(many, 32, "optimal")
    assert kmeans_1d(many, 32, "grouped").inertia <= kmeans_1d(many, 32, "linear").inertia
    few = laplace(20_000, seed=6)
    assert kmeans_1d(few, 32, "grouped").inertia == kmeans_1d(few, 32, "optimal").inertia


@pytest.mark.parametrize("clusters", [1, 2, 32, 256, 4000])
def test_labelling_by_table_gives_the_binary_searchs_labels_and_error(clusters):
    """The float32 labelling (a table over the values' top 16 bits) against the branch-free binary
    search, on values at the midpoints, ties, signed zeros, subnormals and the extremes."""
    from deepshrink.quantize.kmeans import _assign, _assign_float32

    generator = np.random.default_rng(clusters)
    centroids = np.sort(generator.laplace(scale=0.05, size=clusters))
    values = laplace(200_000, seed=clusters)
    midpoints = (centroids[:-1] + centroids[1:]) / 2
    values[: len(midpoints)] = midpoints.astype(np.float32)  # on (or a rounding from) each midpoint
    values[5000:5010] = [-0.0, 0.0, np.finfo(np.float32).max, -np.finfo(np.float32).max, 1e-45, -1e-45, 3, -3, 1, -1]
    values[6000:7000] = generator.integers(-2, 3, 1000)
    dtype = np.uint8 if clusters <= 256 else np.uint16
    by_table, by_search = np.empty(values.shape, dtype), np.empty(values.shape, dtype)
    table_error = _assign_float32(values, centroids, by_table)
    search_error = _assign(values, centroids, by_search)
    assert np.array_equal(by_table, by_search)
    assert table_error == pytest.approx(search_error, rel=1e-12)


def test_lloyd_from_the_optimum_stays_there_and_beats_the_paper_initialisations():
    values = laplace(20_000, seed=5)
    optimal = kmeans_1d(values, 32, "optimal")
    assert optimal.iterations == 1
    for init in ("linear", "density", "forgy"):
        assert optimal.inertia <= kmeans_1d(values, 32, init).inertia * (1 + 1e-12)


def test_the_galloping_search_finds_what_a_binary_search_finds_from_any_hint():
    from deepshrink.quantize.kmeans import _gallop

    generator = np.random.default_rng(0)
    values = np.sort(generator.integers(0, 50, 1000).astype(np.float32))  # many duplicates
    thresholds = np.concatenate((generator.uniform(-5, 55, 300), np.arange(-1, 52), [np.inf, -np.inf]))
    for threshold in thresholds:
        expected = int(np.searchsorted(values, threshold, side="left"))
        for hint in (0, 1, 499, 998, 999, 1000, int(generator.integers(0, 1001))):
            assert _gallop(values, float(threshold), hint) == expected, (threshold, hint)


def test_the_radix_sort_gives_numpys_order():
    """The radix sort itself, whichever sort `sort_values` chose on this machine."""
    from deepshrink.quantize.kmeans import RADIX_FROM, _radix_sort, sort_values

    generator = np.random.default_rng(1)
    values = generator.laplace(scale=0.01, size=RADIX_FROM + 17).astype(np.float32)
    values[:1000] = generator.integers(-3, 4, 1000)  # ties, zeros, whole numbers
    values[1000:1004] = [np.float32(-0.0), np.float32(0.0), np.finfo(np.float32).max, -np.finfo(np.float32).max]
    values[1004:1006] = [np.finfo(np.float32).tiny, -np.finfo(np.float32).smallest_subnormal]
    for result in (_radix_sort(values), sort_values(values)):
        assert result.dtype == np.float32 and np.array_equal(result, np.sort(values))


@pytest.mark.parametrize("clusters", [3, 15, 63])
@pytest.mark.parametrize("tails", ["laplace", "student-t"])
def test_weighted_kmeans_is_sklearns_lloyd_with_sample_weights(clusters, tails):
    """The same centroids, labels and weighted inertia as scikit-learn from the same start, run to
    convergence; Student-t's outliers leave linear initialisation's clusters empty, so this also
    checks that empty clusters are relocated as scikit-learn relocates them under weights."""
    rng = np.random.default_rng(clusters)
    values = laplace(4000, seed=clusters) if tails == "laplace" else rng.standard_t(3, size=4000).astype(np.float32)
    importance = rng.gamma(0.5, size=values.size)
    ours = weighted_kmeans_1d(values, importance, clusters)
    start = initial_centroids(np.sort(values).astype(np.float64), clusters, "linear")
    reference = KMeans(clusters, init=start.reshape(-1, 1), n_init=1, tol=0, max_iter=100_000, algorithm="lloyd")
    reference.fit(values.reshape(-1, 1).astype(np.float64), sample_weight=importance)
    order = np.argsort(reference.cluster_centers_.ravel())
    np.testing.assert_allclose(ours.centroids, reference.cluster_centers_.ravel()[order], rtol=0, atol=1e-7)
    np.testing.assert_array_equal(ours.labels, np.argsort(order)[reference.labels_])
    assert ours.inertia == pytest.approx(reference.inertia_, rel=1e-9)


def test_weighted_kmeans_under_equal_importance_is_kmeans():
    values = np.random.default_rng(5).standard_t(3, size=6000).astype(np.float32)
    weighted = weighted_kmeans_1d(values, np.full(values.size, 0.25), 31)
    plain = kmeans_1d(values, 31)
    np.testing.assert_array_equal(weighted.centroids, plain.centroids)
    np.testing.assert_array_equal(weighted.labels, plain.labels)


def test_an_important_value_gets_a_centroid_of_its_own():
    """Han's k-means spends its codebook where the weights crowd; weighted, a value the loss is
    sensitive to pulls a centroid onto itself even inside a crowd."""
    values = laplace(3000, seed=1)
    importance = np.ones(values.size)
    target = int(np.argsort(values)[1700])  # inside the dense middle
    importance[target] = 1e9
    plain = kmeans_1d(values, 7)
    weighted = weighted_kmeans_1d(values, importance, 7)
    assert abs(weighted.centroids[weighted.labels[target]] - values[target]) < 1e-6
    assert abs(plain.centroids[plain.labels[target]] - values[target]) > 1e-4


@pytest.mark.parametrize(
    ("importance", "message"),
    [
        (np.ones(4), "4 entries for 5 values"),
        (np.array([1.0, -1.0, 1.0, 1.0, 1.0]), "non-negative"),
        (np.array([1.0, np.nan, 1.0, 1.0, 1.0]), "finite"),
        (np.zeros(5), "positive sum"),
    ],
)
def test_bad_importance_is_named(importance, message):
    with pytest.raises(ConfigError, match=message):
        weighted_kmeans_1d(np.arange(5, dtype=np.float32), importance, 2)
