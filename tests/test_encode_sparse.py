"""The relative-index sparse layout: filler zeros, round trips, and corrupt entries."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepshrink.encode.sparse import SparseLayout, from_sparse, to_sparse
from deepshrink.errors import FormatError


def test_the_papers_figure_2_example():
    """Index bits 3: a gap of 8 zeros needs a filler entry (7, 0) before the real one."""
    row = np.zeros((1, 16), dtype=np.uint8)
    row[0, 1] = 3
    row[0, 11] = 5
    sparse = to_sparse(row, index_bits=3)
    assert sparse.gaps.tolist() == [1, 7, 1]
    assert sparse.codes.tolist() == [3, 0, 5]
    assert sparse.fillers == 1
    assert np.array_equal(from_sparse(sparse, row.shape), row)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(1, 40),
    st.floats(0, 1),
    st.integers(1, 8),
    st.sampled_from(["csr", "csc"]),
    st.integers(0, 2**32 - 1),
    st.booleans(),
)
def test_round_trip_is_exact(rows, columns, density, index_bits, layout, seed, used_only):
    generator = np.random.default_rng(seed)
    codes = (generator.random((rows, columns)) < density) * generator.integers(1, 256, (rows, columns))
    codes = codes.astype(np.uint8)
    if used_only:  # some columns (rows, under csc) wholly empty, as a dead input leaves them
        codes[:, generator.random(columns) < 0.5] = 0
        codes[generator.random(rows) < 0.5] = 0
    sparse = to_sparse(codes, index_bits, layout, used_only=used_only)
    assert int(np.count_nonzero(sparse.codes)) == int(np.count_nonzero(codes))
    assert sparse.gaps.max(initial=0) <= 2**index_bits - 1
    assert np.array_equal(from_sparse(sparse, codes.shape), codes)
    if used_only:
        stored = codes.T if layout == "csc" else codes
        assert sparse.used.tolist() == np.flatnonzero(stored.any(axis=0)).tolist()


def test_gaps_over_the_used_columns_skip_the_empty_ones():
    """Columns 1-3 hold nothing: counted over the used columns (0, 4, 5), no gap skips them."""
    codes = np.array([[1, 0, 0, 0, 2, 0], [0, 0, 0, 0, 0, 3]], dtype=np.uint8)
    assert to_sparse(codes, 4).gaps.tolist() == [0, 3, 5]
    narrowed = to_sparse(codes, 4, used_only=True)
    assert narrowed.used.tolist() == [0, 4, 5] and narrowed.gaps.tolist() == [0, 0, 2]
    assert np.array_equal(from_sparse(narrowed, codes.shape), codes)
    # Used columns that do not leave room for a row's gaps are a corrupt layout, not a wrong read.
    short = SparseLayout(narrowed.gaps, narrowed.codes, narrowed.counts, (2, 6), "csr", 4, np.array([0, 4]))
    with pytest.raises(FormatError, match="run past"):
        from_sparse(short)


def test_convolution_weights_are_viewed_as_out_by_in_kh_kw():
    codes = np.zeros((4, 3, 5, 5), dtype=np.uint8)
    codes[2, 1, 3, 4] = 9
    sparse = to_sparse(codes, 8)
    assert sparse.shape == (4, 75) and sparse.counts.tolist() == [0, 0, 1, 0]
    assert np.array_equal(from_sparse(sparse, codes.shape), codes)


def test_empty_and_full_layers():
    for codes in (np.zeros((3, 7), dtype=np.uint8), np.ones((3, 7), dtype=np.uint8)):
        assert np.array_equal(from_sparse(to_sparse(codes, 2), codes.shape), codes)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"counts": np.array([5])}, "do not add up"),
        ({"counts": np.array([1, 1])}, "entry counts for"),
        ({"gaps": np.array([200], dtype=np.uint8), "codes": np.array([1], dtype=np.uint8)}, "index range"),
        ({"gaps": np.array([6], dtype=np.uint8), "codes": np.array([1], dtype=np.uint8)}, "run past"),
    ],
)
def test_corrupt_entries_are_format_errors(change, message):
    fields = {
        "gaps": np.array([1], dtype=np.uint8),
        "codes": np.array([1], dtype=np.uint8),
        "counts": np.array([1]),
        "shape": (1, 4),
        "layout": "csr",
        "index_bits": 3,
    }
    with pytest.raises(FormatError, match=message):
        from_sparse(SparseLayout(**{**fields, **change}))


@pytest.mark.parametrize("layout", ["csr", "csc"])
def test_weights_written_from_the_entries_equal_the_codebook_of_the_dense_codes(layout):
    from deepshrink.encode.sparse import values_from_sparse

    generator = np.random.default_rng(3)
    codes = generator.integers(1, 16, (40, 300)).astype(np.uint8)
    codes[generator.random(codes.shape) < 0.93] = 0
    codebook = np.concatenate(([0.0], generator.normal(size=15))).astype(np.float32)
    codes[:, 100:160] = 0  # inputs no weight reads (and, for csc, outputs none writes): counted over
    codes[10:15] = 0  # the used columns or over all, the same weights
    for sparse in (to_sparse(codes, 4, layout), to_sparse(codes, 4, layout, used_only=True)):
        out = np.full(codes.size, np.nan, dtype=np.float32)
        assert values_from_sparse(sparse, codebook, out) == int(np.count_nonzero(codes))
        assert np.array_equal(out.reshape(codes.shape), codebook[codes.astype(np.int64)])
    sparse = to_sparse(codes, 4, layout)
    out = np.full(codes.size, np.nan, dtype=np.float32)
    assert values_from_sparse(sparse, codebook, out) == int(np.count_nonzero(codes))
    assert np.array_equal(out.reshape(codes.shape), codebook[from_sparse(sparse, codes.shape).astype(np.int64)])
