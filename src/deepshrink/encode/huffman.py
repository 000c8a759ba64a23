"""Canonical, length-limited Huffman coding of small integer alphabets (weight codes, index gaps).

The model (code lengths from symbol counts) is kept apart from the coder (bits in, bits out), so
another entropy coder can replace it behind the same arrays. Only the code lengths are stored:
canonical codes follow from them, so a file carries one small array per stream.

- Lengths: Huffman's algorithm on the counts, then, if the longest code exceeds `max_length`,
  the JPEG (ITU T.81, Annex K.3) rebalancing, which moves leaves up while keeping the Kraft sum
  at 1. With max_length >= log2(alphabet) this always succeeds. The result costs at most one
  bit per symbol over the entropy (the Huffman bound), and usually far less.
- Codes are canonical: sorted by (length, symbol), consecutive integers, MSB first.
- Symbol i goes to lane i mod 4, each lane its own bit string (docs/FORMAT.md). Encoding and
  decoding are numba loops over 64-bit bit buffers; decoding reads `max_length` bits at a time
  through a table of 2^max_length (symbol, length) entries, the four lanes in one loop.
"""

from __future__ import annotations

import heapq

import numba
import numpy as np

from deepshrink.encode.bitio import MAX_WIDTH
from deepshrink.errors import ConfigError, FormatError

DEFAULT_MAX_LENGTH = 16
MAX_MAX_LENGTH = 24  # decode tables of 2^24 entries are the most we ever build


def huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Optimal (unlimited) code lengths for `counts`; unused symbols get length 0.

    A single used symbol gets length 1, so that every symbol costs at least one bit and the
    decoder always advances.
    """
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(len(counts), dtype=np.int64)
    used = np.flatnonzero(counts > 0)
    if len(used) == 0:
        return lengths
    if len(used) == 1:
        lengths[used[0]] = 1
        return lengths
    # Heap items: (count, tie-breaker, symbols in this subtree). Merging deepens every leaf below.
    heap = [(int(counts[symbol]), int(symbol), [int(symbol)]) for symbol in used]
    heapq.heapify(heap)
    while len(heap) > 1:
        count_a, order_a, symbols_a = heapq.heappop(heap)
        count_b, order_b, symbols_b = heapq.heappop(heap)
        for symbol in symbols_a:
            lengths[symbol] += 1
        for symbol in symbols_b:
            lengths[symbol] += 1
        merged = symbols_a + symbols_b if len(symbols_a) >= len(symbols_b) else symbols_b + symbols_a
        heapq.heappush(heap, (count_a + count_b, min(order_a, order_b), merged))
    return lengths


def limit_lengths(lengths: np.ndarray, max_length: int) -> np.ndarray:
    """Rebalance a complete prefix code so that no code is longer than `max_length` (Annex K.3)."""
    lengths = np.asarray(lengths, dtype=np.int64).copy()
    used = int((lengths > 0).sum())
    if used and (1 << max_length) < used:
        raise ConfigError(f"max_length={max_length} is too short for {used} symbols (needs >= {used.bit_length()})")
    longest = int(lengths.max(initial=0))
    if longest <= max_length:
        return lengths
    per_length = np.bincount(lengths[lengths > 0], minlength=longest + 1)
    for length in range(longest, max_length, -1):
        while per_length[length] > 0:
            shorter = length - 2
            while per_length[shorter] == 0:
                shorter -= 1
            per_length[length] -= 2  # two leaves at this depth ...
            per_length[length - 1] += 1  # ... one moves up to replace their parent,
            per_length[shorter + 1] += 2  # and a shorter leaf becomes a parent of two.
            per_length[shorter] -= 1
    # Give the shortest lengths to the most frequent symbols: the symbols keep their rank order.
    order = np.lexsort((np.arange(len(lengths)), lengths))
    order = order[lengths[order] > 0]
    new_lengths = np.zeros_like(lengths)
    position = 0
    for length in range(1, max_length + 1):
        for _ in range(per_length[length]):
            new_lengths[order[position]] = length
            position += 1
    return new_lengths


def code_lengths(counts: np.ndarray, max_length: int = DEFAULT_MAX_LENGTH) -> np.ndarray:
    """Length-limited Huffman code lengths for `counts` (uint8 array, 0 for unused symbols)."""
    if not 1 <= max_length <= MAX_MAX_LENGTH:
        raise ConfigError(f"max_length={max_length} should be between 1 and {MAX_MAX_LENGTH}")
    return limit_lengths(huffman_lengths(counts), max_length).astype(np.uint8)


def check_lengths(lengths: np.ndarray, max_length: int = MAX_MAX_LENGTH) -> None:
    """Raise FormatError unless `lengths` describe a usable prefix code (Kraft sum <= 1)."""
    lengths = np.asarray(lengths)
    if lengths.size and (lengths.min() < 0 or lengths.max() > max_length):
        raise FormatError(f"Huffman code lengths must be between 0 and {max_length}, got up to {int(lengths.max())}")
    used = lengths[lengths > 0].astype(np.int64)
    if used.size == 0:
        return
    kraft = int(np.sum(np.left_shift(np.int64(1), max_length - used)))
    if kraft > (1 << max_length):
        raise FormatError("Huffman code lengths violate the Kraft inequality: they describe no prefix code")


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code word of each symbol (int64, read MSB first over its length)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(lengths), dtype=np.int64)
    order = np.lexsort((np.arange(len(lengths)), lengths))
    code = 0
    previous = 0
    for symbol in order:
        length = lengths[symbol]
        if length == 0:
            continue
        code <<= length - previous
        codes[symbol] = code
        code += 1
        previous = length
    return codes


def decode_table(lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Tables of 2^max_length entries: the symbol and code length for every max_length-bit prefix.

    Prefixes that start no code word (an incomplete code) have length 0: reading one is a
    corrupt stream.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    check_lengths(lengths, max_length)
    codes = canonical_codes(lengths)
    table_symbols = np.zeros(1 << max_length, dtype=np.uint8 if len(lengths) <= 256 else np.int32)
    table_lengths = np.zeros(1 << max_length, dtype=np.uint8)
    for symbol in np.flatnonzero(lengths):
        shift = max_length - lengths[symbol]
        start = codes[symbol] << shift
        table_symbols[start : start + (1 << shift)] = symbol
        table_lengths[start : start + (1 << shift)] = lengths[symbol]
    return table_symbols, table_lengths


LANES = 4


@numba.njit(cache=True, nogil=True)
def _decode_lanes(data, starts, ends, count, table_symbols, table_lengths, max_length, out, consumed):
    """Decode `count` symbols interleaved over four lanes (symbol i lives in lane i % 4).

    The four bit readers are independent, so the processor overlaps their dependency chains.
    Returns 1 if some prefix was invalid; `consumed` receives the bits each lane used.
    """
    mask = (1 << max_length) - 1
    buffers = np.zeros(4, dtype=np.int64)
    filled = np.zeros(4, dtype=np.int64)
    positions = starts.copy()
    used = np.zeros(4, dtype=np.int64)
    invalid = 0
    for index in range(count):
        lane = index & 3
        buffer = buffers[lane]
        bits = filled[lane]
        position = positions[lane]
        if bits < max_length:
            end = ends[lane]
            if position + 6 <= end:
                for _ in range(6 - bits // 8):
                    buffer = (buffer << 8) | data[position]
                    position += 1
                    bits += 8
            else:
                while bits < max_length:
                    byte = data[position] if position < end else 0
                    buffer = (buffer << 8) | byte
                    position += 1
                    bits += 8
            buffer &= 0xFFFFFFFFFFFFFF
            positions[lane] = position
        prefix = (buffer >> (bits - max_length)) & mask
        length = table_lengths[prefix]
        invalid |= length == 0
        out[index] = table_symbols[prefix]
        buffers[lane] = buffer
        filled[lane] = bits - length
        used[lane] += length
    for lane in range(4):
        consumed[lane] = used[lane]
    return invalid


@numba.njit(cache=True, nogil=True, inline="always")
def _put(accumulator, filled, position, value, width, out):
    """Append `width` bits of `value` to a lane, branch-free: the 64-bit accumulator is written
    as 7 bytes every time and the position moves by the whole bytes completed. The bytes past
    the position are rewritten by the next call (or are the zero-padded last byte)."""
    accumulator = (accumulator << np.uint64(width)) | np.uint64(value)
    filled += width
    top = (accumulator << np.uint64(63 - filled)) << np.uint64(1)  # two shifts: never by 64
    out[position] = np.uint8(top >> np.uint64(56))
    out[position + 1] = np.uint8((top >> np.uint64(48)) & np.uint64(0xFF))
    out[position + 2] = np.uint8((top >> np.uint64(40)) & np.uint64(0xFF))
    out[position + 3] = np.uint8((top >> np.uint64(32)) & np.uint64(0xFF))
    out[position + 4] = np.uint8((top >> np.uint64(24)) & np.uint64(0xFF))
    out[position + 5] = np.uint8((top >> np.uint64(16)) & np.uint64(0xFF))
    out[position + 6] = np.uint8((top >> np.uint64(8)) & np.uint64(0xFF))
    position += filled >> 3
    filled &= 7
    return accumulator, filled, position


@numba.njit(cache=True, nogil=True)
def _encode_four_lanes(symbols, codes, lengths, out, starts, bits):
    """Write all four lanes in one pass, lane k from out[starts[k]]; bits[k] gets its bit count.

    Returns False as soon as a symbol lies outside the alphabet or has no code.
    """
    alphabet = len(lengths)
    a0 = a1 = a2 = a3 = np.uint64(0)
    f0 = f1 = f2 = f3 = 0
    p0, p1, p2, p3 = starts[0], starts[1], starts[2], starts[3]
    rounds = len(symbols) // 4
    for index in range(rounds):
        base = 4 * index
        s0, s1, s2, s3 = symbols[base], symbols[base + 1], symbols[base + 2], symbols[base + 3]
        if (s0 >= alphabet) | (s1 >= alphabet) | (s2 >= alphabet) | (s3 >= alphabet):
            return False
        l0, l1, l2, l3 = lengths[s0], lengths[s1], lengths[s2], lengths[s3]
        if (l0 == 0) | (l1 == 0) | (l2 == 0) | (l3 == 0):
            return False
        a0, f0, p0 = _put(a0, f0, p0, codes[s0], l0, out)
        a1, f1, p1 = _put(a1, f1, p1, codes[s1], l1, out)
        a2, f2, p2 = _put(a2, f2, p2, codes[s2], l2, out)
        a3, f3, p3 = _put(a3, f3, p3, codes[s3], l3, out)
    for index in range(4 * rounds, len(symbols)):
        symbol = symbols[index]
        if symbol < 0 or symbol >= alphabet or lengths[symbol] == 0:
            return False
        if index % 4 == 0:
            a0, f0, p0 = _put(a0, f0, p0, codes[symbol], lengths[symbol], out)
        elif index % 4 == 1:
            a1, f1, p1 = _put(a1, f1, p1, codes[symbol], lengths[symbol], out)
        else:
            a2, f2, p2 = _put(a2, f2, p2, codes[symbol], lengths[symbol], out)
    bits[0] = 8 * (p0 - starts[0]) + f0
    bits[1] = 8 * (p1 - starts[1]) + f1
    bits[2] = 8 * (p2 - starts[2]) + f2
    bits[3] = 8 * (p3 - starts[3]) + f3
    return True


def encode_lanes(symbols: np.ndarray, lengths: np.ndarray) -> tuple[bytes, list[int]]:
    """Encode symbol i into lane i % 4; returns the lanes' bytes back to back and each lane's bits.

    One pass: each lane gets a region sized for its worst case (every symbol at the longest code
    length, plus the 7 bytes a write may run ahead), and the lanes are joined afterwards.
    """
    symbols = np.ascontiguousarray(symbols)
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and lengths.max() > MAX_WIDTH:
        raise ConfigError(f"code lengths above {MAX_WIDTH} bits do not fit the bit writer")
    region = ((len(symbols) + 3) // 4 * int(lengths.max(initial=1)) + 7) // 8 + 8
    out = np.zeros(LANES * region, dtype=np.uint8)
    starts = np.arange(LANES, dtype=np.int64) * region
    bits = np.zeros(LANES, dtype=np.int64)
    if not _encode_four_lanes(symbols, canonical_codes(lengths), lengths, out, starts, bits):
        raise ConfigError(f"a symbol to encode lies outside [0, {len(lengths)}) or has no code (its count was zero)")
    data = b"".join(
        out[start : start + (lane_bits + 7) // 8].tobytes() for start, lane_bits in zip(starts, bits, strict=True)
    )
    return data, [int(lane_bits) for lane_bits in bits]


def decode_lanes(data: bytes, lane_bits: list[int], count: int, lengths: np.ndarray, max_length: int) -> np.ndarray:
    """Decode what encode_lanes wrote. Corrupt input raises FormatError, never loops or overreads."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if (
        not isinstance(lane_bits, list)
        or len(lane_bits) != LANES
        or not all(isinstance(bits, int) and not isinstance(bits, bool) and bits >= 0 for bits in lane_bits)
    ):
        raise FormatError(f"a lane-coded stream needs {LANES} non-negative bit counts, got {lane_bits!r}")
    sizes = [(bits + 7) // 8 for bits in lane_bits]
    if sum(sizes) != len(data):
        raise FormatError(f"the lanes declare {sum(sizes)} bytes, the stream holds {len(data)}")
    lane_counts = [len(range(lane, count, LANES)) for lane in range(LANES)] if count >= 0 else None
    if lane_counts is None or any(lane_count > bits for lane_count, bits in zip(lane_counts, lane_bits, strict=True)):
        raise FormatError(f"{count} symbols cannot fit in lanes of {lane_bits} bits")
    if count > 0 and not np.any(lengths):
        raise FormatError(f"cannot decode {count} symbols with an empty code")
    table_symbols, table_lengths = decode_table(lengths, max_length)
    ends = np.cumsum(sizes)
    starts = ends - np.asarray(sizes)
    out = np.empty(count, dtype=np.uint8 if len(lengths) <= 256 else np.int32)
    consumed = np.zeros(LANES, dtype=np.int64)
    invalid = _decode_lanes(
        np.frombuffer(data, dtype=np.uint8),
        starts.astype(np.int64),
        ends.astype(np.int64),
        count,
        table_symbols,
        table_lengths,
        max_length,
        out,
        consumed,
    )
    if invalid:
        raise FormatError("the Huffman stream is corrupt: an invalid code word")
    if consumed.tolist() != list(lane_bits):
        raise FormatError(f"the Huffman lanes used {consumed.tolist()} bits but declare {lane_bits}")
    return out
