"""Canonical, length-limited Huffman coding of small integer alphabets (weight codes, index gaps).

The model (code lengths from symbol counts) is kept apart from the coder (bits in, bits out), so
another entropy coder can replace it behind the same arrays. Only the code lengths are stored:
canonical codes follow from them, so a file carries one small array per stream.

- Lengths: Huffman's algorithm on the counts, then, if the longest code exceeds `max_length`,
  the JPEG (ITU T.81, Annex K.3) rebalancing, which moves leaves up while keeping the Kraft sum
  at 1. With max_length >= log2(alphabet) this always succeeds. The result costs at most one
  bit per symbol over the entropy (the Huffman bound), and usually far less.
- Codes are canonical: sorted by (length, symbol), consecutive integers, MSB first.
- Symbol i goes to lane i mod 4, each lane its own bit string (docs/FORMAT.md). The four
  lanes' dependency chains are independent, so one loop over all four lets the processor
  overlap them. Encoding appends two symbols per lane to a 64-bit accumulator and writes it
  with one 8-byte big-endian store. Decoding keeps a bit position per lane, loads 8 bytes at
  it, and looks the next bits up in a table that gives up to three whole code words at once
  (alphabets of up to 256 symbols; wider ones one symbol per lookup).
"""

from __future__ import annotations

import heapq

import numba
import numpy as np

from deepshrink.encode.bitio import load_big_endian, store_big_endian
from deepshrink.errors import ConfigError, FormatError

DEFAULT_MAX_LENGTH = 16
MAX_MAX_LENGTH = 24  # decode tables of 2^24 entries are the most we ever build


def huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Optimal (unlimited) code lengths for `counts`; unused symbols get length 0.

    A single used symbol gets length 1, so that every symbol costs at least one bit and the
    decoder always advances.

    Args:
        counts: each symbol's count.

    Returns:
        int64 code lengths.
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
    """Rebalance a complete prefix code so that no code is longer than `max_length` (Annex K.3).

    Args:
        lengths: the complete code's lengths.
        max_length: the longest code allowed.

    Returns:
        The new lengths (a copy).

    Raises:
        ConfigError: `max_length` bits cannot give that many symbols a code.
    """
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
    """Length-limited Huffman code lengths for `counts` (uint8 array, 0 for unused symbols).

    Args:
        counts: each symbol's count.
        max_length: the longest code allowed.

    Returns:
        The lengths.

    Raises:
        ConfigError: `max_length` is out of range, or too short for the symbols used.
    """
    if not 1 <= max_length <= MAX_MAX_LENGTH:
        raise ConfigError(f"max_length={max_length} should be between 1 and {MAX_MAX_LENGTH}")
    return limit_lengths(huffman_lengths(counts), max_length).astype(np.uint8)


def check_lengths(lengths: np.ndarray, max_length: int = MAX_MAX_LENGTH) -> None:
    """Raise FormatError unless `lengths` describe a usable prefix code (Kraft sum <= 1).

    Args:
        lengths: the code lengths (from a file).
        max_length: the longest code allowed.

    Raises:
        FormatError: a length out of range, or a Kraft sum above 1.
    """
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
    """The canonical code word of each symbol (int64, read MSB first over its length).

    Args:
        lengths: the code lengths.

    Returns:
        The code words.
    """
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

    Args:
        lengths: the code lengths.
        max_length: the table's index width.

    Returns:
        (symbols, lengths).

    Raises:
        FormatError: the lengths describe no prefix code.
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


# The grouped decoder's table: every TABLE_BITS-bit prefix (at least the longest code) gives up
# to three whole code words of one lane, read with one lookup.
MIN_TABLE_BITS = 13
GROUP = 3
# Rounds between the decoder's bounds checks: a lane moves at most GROUP_ROUNDS x MAX_MAX_LENGTH
# bits between them, which the padding after the data covers.
GROUP_ROUNDS = 32
PADDING = GROUP_ROUNDS * MAX_MAX_LENGTH // 8 + 16


@numba.njit(cache=True, nogil=True)
def _group_tables(lengths, codes, table_bits):
    """For every `table_bits`-bit prefix: `single` = symbol | length << 8 of its first code word
    (length 0: no code word starts so, a corrupt stream), and `grouped` = up to GROUP symbols
    (8 bits each) | their total length << 24 | how many << 29 (0: corrupt)."""
    size = 1 << table_bits
    single = np.zeros(size, dtype=np.uint16)
    for symbol in range(len(lengths)):
        length = lengths[symbol]
        if length == 0:
            continue
        start = codes[symbol] << (table_bits - length)
        single[start : start + (1 << (table_bits - length))] = symbol | (length << 8)
    grouped = np.zeros(size, dtype=np.uint32)
    for prefix in range(size):
        first = single[prefix]
        total = first >> 8
        if total == 0:
            continue
        entry = np.uint32(first & 0xFF)
        count = 1
        while count < GROUP:
            following = single[(prefix << total) & (size - 1)]
            length = following >> 8
            if length == 0 or total + length > table_bits:
                break
            entry |= np.uint32(following & 0xFF) << np.uint32(8 * count)
            total += length
            count += 1
        grouped[prefix] = entry | np.uint32(total << 24) | np.uint32(count << 29)
    return grouped, single


@numba.njit(cache=True, nogil=True, inline="always")
def _peek(data, bit, shift):
    """The table index at bit position `bit`: the next 64 - shift bits, MSB first."""
    return (load_big_endian(data, bit >> 3) << np.uint64(bit & 7)) >> shift


@numba.njit(cache=True, nogil=True)
def _decode_lanes_grouped(data, starts, ends, count, grouped, single, table_bits, out, consumed):
    """Decode `count` symbols (alphabets of up to 256) interleaved over four lanes.

    Each lane is a bit position into `data` (padded by PADDING bytes): one 8-byte load, one
    table lookup and up to GROUP symbols per step, the four lanes' chains independent, so the
    processor overlaps them. Lane k writes symbols k, k + 4, ...; a step writes all GROUP slots
    and advances by the symbols it had, so the main loop runs while every lane has room for
    GROUP_ROUNDS full steps, and the rest goes symbol by symbol. Positions are checked against
    the lanes' ends every GROUP_ROUNDS steps. Returns 1 for a corrupt stream; `consumed`
    receives the bits each lane used.
    """
    shift = np.uint64(64 - table_bits)
    b0, b1, b2, b3 = starts[0], starts[1], starts[2], starts[3]
    q0, q1, q2, q3 = 0, 1, 2, 3  # the next output index of each lane
    # One past each lane's last index: lane k holds symbols k, k + 4, ... below `count`.
    e0, e1, e2, e3 = (count + 3) // 4 * 4, (count + 2) // 4 * 4 + 1, (count + 1) // 4 * 4 + 2, count // 4 * 4 + 3
    invalid = False
    while min(min(e0 - q0, e1 - q1), min(e2 - q2, e3 - q3)) > 4 * GROUP * GROUP_ROUNDS:
        for _ in range(GROUP_ROUNDS):
            x0 = grouped[_peek(data, b0, shift)]
            x1 = grouped[_peek(data, b1, shift)]
            x2 = grouped[_peek(data, b2, shift)]
            x3 = grouped[_peek(data, b3, shift)]
            out[q0], out[q0 + 4], out[q0 + 8] = x0, x0 >> 8, x0 >> 16
            out[q1], out[q1 + 4], out[q1 + 8] = x1, x1 >> 8, x1 >> 16
            out[q2], out[q2 + 4], out[q2 + 8] = x2, x2 >> 8, x2 >> 16
            out[q3], out[q3 + 4], out[q3 + 8] = x3, x3 >> 8, x3 >> 16
            c0, c1, c2, c3 = x0 >> 29, x1 >> 29, x2 >> 29, x3 >> 29
            invalid |= (c0 == 0) | (c1 == 0) | (c2 == 0) | (c3 == 0)
            q0, q1, q2, q3 = q0 + 4 * c0, q1 + 4 * c1, q2 + 4 * c2, q3 + 4 * c3
            b0 += (x0 >> 24) & 31
            b1 += (x1 >> 24) & 31
            b2 += (x2 >> 24) & 31
            b3 += (x3 >> 24) & 31
        if invalid | (b0 > ends[0]) | (b1 > ends[1]) | (b2 > ends[2]) | (b3 > ends[3]):
            return 1
    positions = np.array([b0, b1, b2, b3])
    nexts = np.array([q0, q1, q2, q3])
    lane_ends = np.array([e0, e1, e2, e3])
    for lane in range(4):
        bit, index = positions[lane], nexts[lane]
        while index < lane_ends[lane]:
            entry = single[_peek(data, bit, shift)]
            if entry >> 8 == 0:
                return 1
            out[index] = entry
            index += 4
            bit += entry >> 8
            if bit > ends[lane]:
                return 1
        consumed[lane] = bit - starts[lane]
    return 0


@numba.njit(cache=True, nogil=True, inline="always")
def _flush(accumulator, filled, position, out):
    """Write a lane's waiting bits: the 64-bit accumulator's top `filled` bits as 8 bytes (one
    store), then move by the whole bytes completed; the rest is rewritten by the next flush (or
    is the zero-padded last byte). Returns the new (filled, position)."""
    store_big_endian(out, position, (accumulator << np.uint64(63 - filled)) << np.uint64(1))  # never by 64
    return filled & 7, position + (filled >> 3)


@numba.njit(cache=True, nogil=True, inline="always")
def _append(accumulator, code, length):
    return (accumulator << np.uint64(length)) | np.uint64(code)


@numba.njit(cache=True, nogil=True)
def _encode_four_lanes(symbols, codes, lengths, out, starts, bits):
    """Write all four lanes in one pass, lane k from out[starts[k]]; bits[k] gets its bit count.

    Two symbols per lane between flushes (7 waiting bits + 2 x MAX_MAX_LENGTH fit 64), so one
    8-byte store per two symbols. Returns False as soon as a symbol lies outside the alphabet
    or has no code.
    """
    alphabet = len(lengths)
    a0 = a1 = a2 = a3 = np.uint64(0)
    f0 = f1 = f2 = f3 = 0
    p0, p1, p2, p3 = starts[0], starts[1], starts[2], starts[3]
    rounds = len(symbols) // 8
    for index in range(rounds):
        base = 8 * index
        s0, s1, s2, s3 = symbols[base], symbols[base + 1], symbols[base + 2], symbols[base + 3]
        t0, t1, t2, t3 = symbols[base + 4], symbols[base + 5], symbols[base + 6], symbols[base + 7]
        if (
            (s0 < 0) | (s0 >= alphabet) | (s1 < 0) | (s1 >= alphabet) | (s2 < 0) | (s2 >= alphabet)
            | (s3 < 0) | (s3 >= alphabet) | (t0 < 0) | (t0 >= alphabet) | (t1 < 0) | (t1 >= alphabet)
            | (t2 < 0) | (t2 >= alphabet) | (t3 < 0) | (t3 >= alphabet)
        ):  # fmt: skip
            return False
        l0, l1, l2, l3 = lengths[s0], lengths[s1], lengths[s2], lengths[s3]
        m0, m1, m2, m3 = lengths[t0], lengths[t1], lengths[t2], lengths[t3]
        if (l0 == 0) | (l1 == 0) | (l2 == 0) | (l3 == 0) | (m0 == 0) | (m1 == 0) | (m2 == 0) | (m3 == 0):
            return False
        a0 = _append(_append(a0, codes[s0], l0), codes[t0], m0)
        a1 = _append(_append(a1, codes[s1], l1), codes[t1], m1)
        a2 = _append(_append(a2, codes[s2], l2), codes[t2], m2)
        a3 = _append(_append(a3, codes[s3], l3), codes[t3], m3)
        f0, p0 = _flush(a0, f0 + l0 + m0, p0, out)
        f1, p1 = _flush(a1, f1 + l1 + m1, p1, out)
        f2, p2 = _flush(a2, f2 + l2 + m2, p2, out)
        f3, p3 = _flush(a3, f3 + l3 + m3, p3, out)
    for index in range(8 * rounds, len(symbols)):
        symbol = symbols[index]
        if symbol < 0 or symbol >= alphabet or lengths[symbol] == 0:
            return False
        code, length = codes[symbol], lengths[symbol]
        lane = index & 3
        if lane == 0:
            a0 = _append(a0, code, length)
            f0, p0 = _flush(a0, f0 + length, p0, out)
        elif lane == 1:
            a1 = _append(a1, code, length)
            f1, p1 = _flush(a1, f1 + length, p1, out)
        elif lane == 2:
            a2 = _append(a2, code, length)
            f2, p2 = _flush(a2, f2 + length, p2, out)
        else:
            a3 = _append(a3, code, length)
            f3, p3 = _flush(a3, f3 + length, p3, out)
    bits[0] = 8 * (p0 - starts[0]) + f0
    bits[1] = 8 * (p1 - starts[1]) + f1
    bits[2] = 8 * (p2 - starts[2]) + f2
    bits[3] = 8 * (p3 - starts[3]) + f3
    return True


def encode_lanes(symbols: np.ndarray, lengths: np.ndarray) -> tuple[bytes, list[int]]:
    """Encode symbol i into lane i % 4; returns the lanes' bytes back to back and each lane's bits.

    One pass: each lane gets a region sized for its worst case (every symbol at the longest code
    length, plus the 7 bytes a write may run ahead), and the lanes are joined afterwards.

    Args:
        symbols: the symbols.
        lengths: the code lengths (the code is canonical).

    Returns:
        (bytes, [bits in each lane]).

    Raises:
        ConfigError: a code longer than the bit writer takes.
    """
    symbols = np.ascontiguousarray(symbols)
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and lengths.max() > MAX_MAX_LENGTH:
        raise ConfigError(f"code lengths above {MAX_MAX_LENGTH} bits do not fit the bit writer")
    # Worst case, and the 8 bytes the last flush writes from its position.
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
    """Decode what encode_lanes wrote. Corrupt input raises FormatError, never loops or overreads.

    Args:
        data: the lanes' bytes.
        lane_bits: the bits in each lane.
        count: how many symbols.
        lengths: the code lengths.
        max_length: the longest code allowed.

    Returns:
        The symbols (uint8 for alphabets up to 256, else int32).

    Raises:
        FormatError: corrupt lanes, lengths or code words.
    """
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
    ends = np.cumsum(sizes)
    starts = ends - np.asarray(sizes)
    out = np.empty(count, dtype=np.uint8 if len(lengths) <= 256 else np.int32)
    consumed = np.zeros(LANES, dtype=np.int64)
    if len(lengths) <= 256:
        check_lengths(lengths, min(max_length, MAX_MAX_LENGTH))
        table_bits = max(int(lengths.max(initial=1)), MIN_TABLE_BITS)
        grouped, single = _group_tables(lengths, canonical_codes(lengths), table_bits)
        padded = np.zeros(len(data) + PADDING, dtype=np.uint8)
        padded[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        invalid = _decode_lanes_grouped(
            padded, 8 * starts, 8 * starts + np.asarray(lane_bits), count, grouped, single, table_bits, out, consumed
        )
    else:  # wider symbols (codes or gaps of more than 8 bits): one symbol per lookup
        invalid = _decode_wide_lanes(lengths, max_length, data, starts, ends, count, out, consumed)
    if invalid:
        raise FormatError("the Huffman stream is corrupt: an invalid code word")
    if consumed.tolist() != list(lane_bits):
        raise FormatError(f"the Huffman lanes used {consumed.tolist()} bits but declare {lane_bits}")
    return out


def _decode_wide_lanes(lengths, max_length, data, starts, ends, count, out, consumed) -> int:
    table_symbols, table_lengths = decode_table(lengths, max_length)
    return _decode_lanes(
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
