"""Canonical length-limited Huffman against a naive reference, and on hostile input."""

from __future__ import annotations

import heapq

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepshrink.encode.huffman import (
    canonical_codes,
    check_lengths,
    code_lengths,
    decode_lanes,
    encode_lanes,
    huffman_lengths,
)
from deepshrink.errors import FormatError


def naive_huffman_cost(counts) -> int:
    """Total coded bits of an optimal prefix code: the sum of all merged weights (textbook)."""
    heap = [int(count) for count in counts if count > 0]
    if len(heap) == 1:
        return heap[0]
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        total += merged
        heapq.heappush(heap, merged)
    return total


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=300).filter(lambda counts: any(counts)))
def test_lengths_are_optimal_like_the_naive_build(counts):
    counts = np.array(counts)
    lengths = huffman_lengths(counts)
    assert int(np.sum(lengths * counts)) == naive_huffman_cost(counts)


def test_length_limit_keeps_a_complete_code_near_optimal():
    counts = np.array([2**i for i in range(30)])  # Fibonacci-like skew: unlimited depth would be 29
    limited = code_lengths(counts, max_length=12)
    assert limited.max() == 12
    kraft = sum(2.0 ** -int(length) for length in limited if length)
    assert kraft == pytest.approx(1.0)
    assert int(np.sum(limited * counts)) <= 1.01 * naive_huffman_cost(counts)


def test_codes_are_canonical_and_prefix_free():
    lengths = np.array([3, 2, 0, 3, 2, 2])
    codes = canonical_codes(lengths)
    words = {format(int(codes[s]), f"0{lengths[s]}b") for s in range(6) if lengths[s]}
    assert words == {"00", "01", "10", "110", "111"}
    for a in words:
        assert not any(b != a and b.startswith(a) for b in words)


def test_bits_per_symbol_are_within_one_percent_of_the_entropy_on_weight_codes():
    generator = np.random.default_rng(0)
    symbols = np.minimum(np.abs(generator.laplace(scale=4, size=200_000)).astype(np.int64), 31)
    counts = np.bincount(symbols, minlength=32)
    _, lanes = encode_lanes(symbols, code_lengths(counts))
    bits = sum(lanes)
    probabilities = counts[counts > 0] / counts.sum()
    entropy = -np.sum(probabilities * np.log2(probabilities))
    assert bits / len(symbols) <= 1.01 * entropy


def test_an_incomplete_code_meets_an_invalid_prefix():
    incomplete = np.array([1, 2, 0])  # the prefix 11 starts no code word
    with pytest.raises(FormatError, match="corrupt"):
        decode_lanes(b"\xff" * 4, [8, 8, 8, 8], 4, incomplete, 2)


def test_lengths_that_break_kraft_are_refused():
    with pytest.raises(FormatError, match="Kraft"):
        check_lengths(np.array([1, 1, 1]))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 300), st.integers(0, 3_000), st.integers(0, 2**32 - 1))
def test_four_lane_round_trip_is_exact(alphabet, size, seed):
    generator = np.random.default_rng(seed)
    symbols = np.minimum(np.abs(generator.laplace(scale=alphabet / 6, size=size)).astype(np.int64), alphabet - 1)
    lengths = code_lengths(np.bincount(symbols, minlength=alphabet), 15)
    data, lanes = encode_lanes(symbols, lengths)
    assert len(lanes) == 4 and sum(lanes) == int(np.sum(lengths[symbols]))
    assert np.array_equal(decode_lanes(data, lanes, size, lengths, 15), symbols)


def test_corrupt_lanes_are_format_errors():
    symbols = np.arange(103) % 9
    lengths = code_lengths(np.bincount(symbols), 15)
    data, lanes = encode_lanes(symbols, lengths)
    with pytest.raises(FormatError, match="4 non-negative"):
        decode_lanes(data, lanes[:3], 103, lengths, 15)
    with pytest.raises(FormatError, match="declare"):
        decode_lanes(data + b"\0", lanes, 103, lengths, 15)  # bytes do not match the lanes
    with pytest.raises(FormatError):
        decode_lanes(data, [lanes[0] + 8, lanes[1], lanes[2], lanes[3] - 8], 103, lengths, 15)
    with pytest.raises(FormatError, match="cannot fit"):
        decode_lanes(data, lanes, 10**9, lengths, 15)
    flipped = bytes(255 - byte for byte in data)
    with pytest.raises(FormatError):
        decode_lanes(flipped, lanes, 103, lengths, 15)


def naive_lanes(symbols, lengths) -> tuple[bytes, list[int]]:
    """The lane layout of docs/FORMAT.md, written as strings of '0' and '1'."""
    codes = canonical_codes(lengths)
    lanes = ["".join(format(int(codes[s]), f"0{int(lengths[s])}b") for s in symbols[lane::4]) for lane in range(4)]
    data = b"".join(
        int(bits.ljust(-(-len(bits) // 8) * 8, "0") or "0", 2).to_bytes(-(-len(bits) // 8), "big") if bits else b""
        for bits in lanes
    )
    return data, [len(bits) for bits in lanes]


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([2, 9, 32, 256, 300, 4096]), st.integers(0, 30_000), st.integers(0, 2**32 - 1))
def test_long_streams_match_a_naive_bit_writer_and_decode_exactly(alphabet, size, seed):
    # Long enough for the encoder's two-symbol steps and the decoder's grouped loop, with every
    # kind of tail; alphabets above 256 take the one-symbol decoder.
    generator = np.random.default_rng(seed)
    symbols = np.minimum(np.abs(generator.laplace(scale=alphabet / 8, size=size)).astype(np.int64), alphabet - 1)
    symbols = symbols.astype(np.uint8 if alphabet <= 256 else np.int32)
    lengths = code_lengths(np.bincount(symbols, minlength=alphabet), 15)
    data, lanes = encode_lanes(symbols, lengths)
    assert (data, lanes) == naive_lanes(symbols, lengths)
    assert np.array_equal(decode_lanes(data, lanes, size, lengths, 15), symbols)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 40))
def test_corrupt_long_streams_are_format_errors_or_decode_in_bounds(seed, flips):
    # Flipped bits, lanes declared shorter or longer, and random bytes under a valid code: the
    # decoder raises FormatError or returns `count` symbols of the alphabet, never reads past
    # its padding or loops.
    generator = np.random.default_rng(seed)
    symbols = np.minimum(np.abs(generator.laplace(scale=3, size=6_000)).astype(np.int64), 31).astype(np.uint8)
    lengths = code_lengths(np.bincount(symbols, minlength=32), 15)
    data, lanes = encode_lanes(symbols, lengths)
    corrupt = bytearray(data)
    for position in generator.integers(0, len(data) * 8, flips):
        corrupt[position // 8] ^= 1 << (position % 8)
    shift = int(generator.integers(-16, 17)) * 8
    cases = [
        (bytes(corrupt), lanes),
        (data, [lanes[0] + shift, lanes[1], lanes[2], lanes[3] - shift]),
        (generator.integers(0, 256, len(data), dtype=np.uint8).tobytes(), lanes),
    ]
    for stream, declared in cases:
        try:
            decoded = decode_lanes(stream, declared, len(symbols), lengths, 15)
        except FormatError:
            continue
        assert len(decoded) == len(symbols) and int(decoded.max()) < 32
