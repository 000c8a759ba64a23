"""Adaptive rANS coding of small integer alphabets (weight codes, index gaps): docs/FORMAT.md,
"ANS streams".

An alternative to `huffman.py` that needs no side information and can cost less than one bit
per symbol. It is the range variant of asymmetric numeral systems (Duda 2013), in the 64-bit
form of Giesen's rans64: a state x in [2^31, 2^63) that takes 32-bit words in and out. The
probabilities come from an adaptive model that the encoder and the decoder run alike, so
nothing of it is stored:

- per context, a count per symbol, starting at 1 and raised by INCREMENT on each occurrence,
  halved (never below 1) when their total passes a limit (about 32,000 symbols of memory), so
  the model can follow a stream whose statistics drift along its rows;
- the frequencies rANS codes with (summing to 2^scale, 16 times the alphabet within 2^12 to
  2^18, each at least 1) are rebuilt from the counts after 16, 32, 64, ... symbols of the
  context and then every REBUILD_EVERY symbols (more for the widest alphabets): between
  rebuilds the model is fixed, so decoding is one table lookup per symbol;
- the context is nothing (`none`) or the previous symbol of the stream, in four ranges of the
  alphabet (`previous`): for weight codes ordered by centroid, large negative, small negative,
  small positive, large positive. The encoder codes a stream both ways and keeps the smaller.

rANS decodes in the reverse order of encoding. The encoder runs the model forward to find each
symbol's frequency, then codes backwards; the decoder reads forwards and runs the model as it
goes. Every read is bounds-checked and a stream must end exactly at its last word with the
state the encoder started from: a truncated stream, and almost every corrupted one, is a
FormatError, and none reads outside its buffer (the file's CRCs catch corruption first).
"""

from __future__ import annotations

import numba
import numpy as np

from deepshrink.errors import FormatError

CONTEXTS = ("none", "previous")
PREVIOUS_RANGES = 4  # contexts of `previous`: the previous symbol's quarter of the alphabet
INCREMENT = 32
REBUILD_EVERY = 2048
MIN_SCALE_BITS = 12
MAX_SCALE_BITS = 18  # 2^16 symbols keep 4 slots each on average
MAX_ALPHABET_BITS = 16  # the widest stream coded: codes and gaps of up to 16 bits, row counts up to 2^16
STATE_LOW = 1 << 31  # the state's lower bound (and the encoder's starting state)
HEADER_BYTES = 8  # the final state, little-endian, before the words

# Decoder outcomes other than success.
_TRUNCATED, _BAD_STATE, _NOT_AT_END = 1, 2, 3


def scale_bits(alphabet: int) -> int:
    """Frequency precision for an alphabet: 2^scale is 16 times the alphabet (at least 2^12, at
    most 2^18), so that every symbol keeps a frequency of at least 1 and the likely ones are
    represented finely: at 2^12 slots for 256 symbols, rounding cost 0.5% over the entropy.

    Args:
        alphabet: symbols in the alphabet, 1 to 2^16.

    Returns:
        The bits of the frequency total.
    """
    return min(max(MIN_SCALE_BITS, (max(alphabet, 2) - 1).bit_length() + 4), MAX_SCALE_BITS)


def context_count(alphabet: int, context: str) -> int:
    """How many separate models a stream of `alphabet` symbols uses under `context`.

    Args:
        alphabet: symbols in the alphabet.
        context: one of CONTEXTS.

    Returns:
        The number of contexts.
    """
    return 1 if context == "none" else min(PREVIOUS_RANGES, alphabet)


def max_stream_bytes(symbols: int, alphabet: int) -> int:
    """The most bytes an encoded stream of `symbols` symbols can take: each costs at most
    `scale_bits` bits (a frequency of 1), plus the state and one word of slack.

    Args:
        symbols: the number of symbols.
        alphabet: symbols in the alphabet.

    Returns:
        The bound, in bytes.
    """
    return HEADER_BYTES + 4 * ((symbols * scale_bits(alphabet)) // 32 + 2)


@numba.njit(cache=True, nogil=True)
def _rebuild(counts, frequencies, starts, table, context, alphabet, scale, limit, build_table):
    """At a context's rebuild: halve its counts (never below 1) if their total passed `limit`;
    then frequencies (each >= 1, summing to 2^scale) proportional to the counts, their
    cumulative starts, and for the decoder the slot table, whose entry packs what a decoding
    step needs in one load: the symbol (bits 0-15), its frequency (16-39) and the slot's
    offset from the symbol's start (40-63)."""
    base = context * alphabet
    total = 0
    for symbol in range(alphabet):
        total += counts[base + symbol]
    if total > limit:  # so that the model follows statistics that drift along the stream
        total = 0
        for symbol in range(alphabet):
            halved = counts[base + symbol] // 2
            counts[base + symbol] = halved if halved > 0 else 1
            total += counts[base + symbol]
    largest = 0
    for symbol in range(alphabet):
        if counts[base + symbol] > counts[base + largest]:
            largest = symbol
    spare = (1 << scale) - alphabet
    # Rounded shares, the difference to the total settled on the largest; floored shares (which
    # can only fall short) where rounding overshoots by more than the largest can give.
    divisor = 2 * total
    inverse = 1.0 / divisor
    for rounding in (1, 0):
        assigned = 0
        for symbol in range(alphabet):
            # The exact floor of numerator / divisor, by a multiplication: an integer division
            # per symbol was most of a rebuild's time outside the slot table. The numerator stays
            # below 2^43 (the counts' total below 2^23: the limit, at most 2^22, plus what one
            # stretch between rebuilds adds; spare below 2^18), so it is exact as a float and the
            # float quotient is off by at most one, which the two comparisons correct.
            numerator = 2 * counts[base + symbol] * spare + rounding * total
            quotient = np.int64(numerator * inverse)
            if quotient * divisor > numerator:
                quotient -= 1
            elif (quotient + 1) * divisor <= numerator:
                quotient += 1
            frequency = 1 + quotient
            frequencies[base + symbol] = frequency
            assigned += frequency
        if frequencies[base + largest] + (1 << scale) - assigned >= 1:
            break
    frequencies[base + largest] += (1 << scale) - assigned
    start = 0
    slots = context << scale
    for symbol in range(alphabet):
        frequency = frequencies[base + symbol]
        starts[base + symbol] = start
        if build_table:
            # A slice and unsigned arithmetic let LLVM vectorise the fill, which a rebuild spends
            # most of its time on: 7 times faster at 32 symbols, and decoding 1.5 times as fast.
            value = np.uint64(symbol | (frequency << 16))
            row = table[slots + start : slots + start + frequency]
            for offset in range(frequency):
                row[offset] = value + (np.uint64(offset) << np.uint64(40))
        start += frequency


@numba.njit(cache=True, nogil=True)
def _new_model(alphabet, contexts, scale, limit, decoding):
    """The adaptive model's state before the first symbol: (counts, frequencies, starts, slot
    table (one entry unless decoding), symbols left until each context's next rebuild, the
    count of symbols each context will have seen then, the context each symbol sets for the
    next one). The context is looked up because a division per symbol, on the decoder's
    critical path, had made `previous` decode at two thirds of `none`'s speed."""
    counts = np.ones(contexts * alphabet, dtype=np.int64)
    frequencies = np.zeros(contexts * alphabet, dtype=np.int64)
    starts = np.zeros(contexts * alphabet, dtype=np.int64)
    table = np.zeros((contexts << scale) if decoding else 1, dtype=np.uint64)
    remaining = np.full(contexts, 16, dtype=np.int64)
    next_rebuild = np.full(contexts, 16, dtype=np.int64)
    for context in range(contexts):
        _rebuild(counts, frequencies, starts, table, context, alphabet, scale, limit, decoding)
    context_after = np.empty(alphabet, dtype=np.int64)
    for symbol in range(alphabet):
        context_after[symbol] = (symbol * contexts) // alphabet
    return counts, frequencies, starts, table, remaining, next_rebuild, context_after


@numba.njit(cache=True, nogil=True)
def _schedule_rebuild(remaining, next_rebuild, context, scale):
    """After a context's rebuild: the next comes when it has seen twice as many symbols, and
    then every REBUILD_EVERY (more for the widest alphabets)."""
    remaining[context] = min(next_rebuild[context], max(REBUILD_EVERY, 1 << (scale - 3)))
    next_rebuild[context] += remaining[context]


@numba.njit(cache=True, nogil=True)
def _model_frequencies(symbols, alphabet, contexts, scale, limit, starts_out, frequencies_out):
    """The encoder's pass over the adaptive model: each symbol's start and frequency, as the
    decoder will see them, into starts_out and frequencies_out. `_decode` runs the same model
    (the same `_new_model`, `_rebuild` and `_schedule_rebuild`, in the same order); the
    round-trip tests hold the two to each other."""
    counts, frequencies, starts, table, remaining, next_rebuild, context_after = _new_model(
        alphabet, contexts, scale, limit, False
    )
    context = 0
    for index in range(len(symbols)):
        symbol = np.int64(symbols[index])
        starts_out[index] = starts[context * alphabet + symbol]
        frequencies_out[index] = frequencies[context * alphabet + symbol]
        counts[context * alphabet + symbol] += INCREMENT
        remaining[context] -= 1
        if remaining[context] == 0:
            _schedule_rebuild(remaining, next_rebuild, context, scale)
            _rebuild(counts, frequencies, starts, table, context, alphabet, scale, limit, False)
        context = context_after[symbol]  # the next symbol's context: this one's range of the alphabet


@numba.njit(cache=True, nogil=True)
def _decode(symbols, words, initial_state, alphabet, contexts, scale, limit):
    """Decode len(symbols) symbols from `words` into `symbols`; returns 0, or the outcome code
    of a corrupt stream.

    The stream is decoded in stretches that end where the first context reaches its rebuild:
    within a stretch the tables are fixed, so its loop carries no rebuild check, which made
    decoding about 1.2 times as fast. The one-context loop is the general one without the
    context: written twice because that was 1.26-1.3 times as fast on 20M symbols. The step is
    written inline in both because a call per symbol that passes the model's arrays cost about
    90 ns in reference counting, 30 times the work itself, and a helper inlined by numba
    (`inline="always"`, returning a tuple) decoded at a third of the speed.
    """
    low = np.uint64(STATE_LOW)
    if initial_state < low or initial_state >= (low << np.uint64(32)):
        return _BAD_STATE
    counts, frequencies, starts, table, remaining, next_rebuild, context_after = _new_model(
        alphabet, contexts, scale, limit, True
    )
    state = initial_state
    shift = np.uint64(scale)
    mask = np.uint64((1 << scale) - 1)
    field = np.uint64(0xFFFFFF)
    position = 0
    context = 0
    index = 0
    while index < len(symbols):
        stretch = remaining[0]
        for other in range(1, contexts):
            stretch = min(stretch, remaining[other])
        end = min(index + stretch, len(symbols))
        if contexts == 1:
            for at in range(index, end):
                entry = table[np.int64(state & mask)]
                symbol = np.int64(entry & np.uint64(0xFFFF))
                state = ((entry >> np.uint64(16)) & field) * (state >> shift) + (entry >> np.uint64(40))
                if state < low:
                    if position >= len(words):
                        return _TRUNCATED
                    state = (state << np.uint64(32)) | np.uint64(words[position])
                    position += 1
                symbols[at] = symbol
                counts[symbol] += INCREMENT
            remaining[0] -= end - index
        else:
            for at in range(index, end):
                entry = table[(context << scale) + np.int64(state & mask)]
                symbol = np.int64(entry & np.uint64(0xFFFF))
                state = ((entry >> np.uint64(16)) & field) * (state >> shift) + (entry >> np.uint64(40))
                if state < low:
                    if position >= len(words):
                        return _TRUNCATED
                    state = (state << np.uint64(32)) | np.uint64(words[position])
                    position += 1
                symbols[at] = symbol
                counts[context * alphabet + symbol] += INCREMENT
                remaining[context] -= 1
                context = context_after[symbol]
        # Only the stretch's last symbol can have brought its context to a rebuild.
        for reached in range(contexts):
            if remaining[reached] == 0:
                _schedule_rebuild(remaining, next_rebuild, reached, scale)
                _rebuild(counts, frequencies, starts, table, reached, alphabet, scale, limit, True)
        index = end
    if state != low or position != len(words):
        return _NOT_AT_END
    return 0


@numba.njit(cache=True, nogil=True)
def _encode_backwards(starts, frequencies, scale, words):
    """rans64 encoding of the symbols from last to first; returns (final state, words written).
    The words come out in reverse of the order the decoder reads them."""
    state = np.uint64(STATE_LOW)
    written = 0
    shift = np.uint64(scale)
    for index in range(len(starts) - 1, -1, -1):
        frequency = np.uint64(frequencies[index])
        limit = ((np.uint64(STATE_LOW) >> shift) << np.uint64(32)) * frequency
        if state >= limit:
            words[written] = np.uint32(state & np.uint64(0xFFFFFFFF))
            written += 1
            state >>= np.uint64(32)
        state = ((state // frequency) << shift) + (state % frequency) + np.uint64(starts[index])
    return state, written


def _count_limit(alphabet: int) -> int:
    """The counts' total past which they are halved: about 32,000 symbols of memory, so that the
    estimates settle on a stationary stream (halving every 2,000 symbols cost 0.8% over the
    entropy at 256 symbols) and still follow one whose statistics drift."""
    return max(1 << 20, 64 * alphabet)


def encode(symbols: np.ndarray, alphabet: int, context: str = "none") -> bytes:
    """Encode `symbols` (each below `alphabet`) under one of CONTEXTS.

    Args:
        symbols: the symbols, a 1-D integer array.
        alphabet: symbols in the alphabet, 1 to 2^16.
        context: the context model.

    Returns:
        The stream: the final state (8 bytes, little-endian), then 32-bit little-endian words in
        the order the decoder reads them.
    """
    symbols = np.ascontiguousarray(symbols)
    scale = scale_bits(alphabet)
    contexts = context_count(alphabet, context)
    starts = np.empty(len(symbols), dtype=np.int64)
    frequencies = np.empty(len(symbols), dtype=np.int64)
    _model_frequencies(symbols, alphabet, contexts, scale, _count_limit(alphabet), starts, frequencies)
    words = np.empty(len(symbols) + 2, dtype=np.uint32)  # at most one word per symbol
    state, written = _encode_backwards(starts, frequencies, scale, words)
    return np.uint64(state).astype("<u8").tobytes() + words[:written][::-1].astype("<u4").tobytes()


def encode_smallest(symbols: np.ndarray, alphabet: int) -> tuple[str, bytes]:
    """Encode under every context model and keep the smallest stream (the first on a tie).

    Args:
        symbols: the symbols.
        alphabet: symbols in the alphabet.

    Returns:
        (context, stream).
    """
    encoded = [(context, encode(symbols, alphabet, context)) for context in CONTEXTS]
    return min(encoded, key=lambda pair: len(pair[1]))


def decode(data: bytes, count: int, alphabet: int, context: str) -> np.ndarray:
    """Decode `count` symbols of a stream `encode` wrote.

    Args:
        data: the stream, whose length schema.check_header checked (at least HEADER_BYTES, a
            whole number of words, at most max_stream_bytes).
        count: the number of symbols.
        alphabet: symbols in the alphabet.
        context: the context model it was encoded with.

    Returns:
        The symbols: uint8 for alphabets of up to 256 symbols, else uint16.

    Raises:
        FormatError: the stream ends early, holds an impossible state, or does not end where
            and as the encoder ended it (a corrupt stream).
    """
    if len(data) < HEADER_BYTES or (len(data) - HEADER_BYTES) % 4:
        raise FormatError(f"an ANS stream of {len(data)} bytes is not an 8-byte state followed by 4-byte words")
    initial = np.frombuffer(data, dtype="<u8", count=1)[0]
    words = np.frombuffer(data, dtype="<u4", offset=HEADER_BYTES).astype(np.uint32)
    out = np.empty(count, dtype=np.uint8 if alphabet <= 256 else np.uint16)
    contexts, scale = context_count(alphabet, context), scale_bits(alphabet)
    outcome = _decode(out, words, np.uint64(initial), alphabet, contexts, scale, _count_limit(alphabet))
    if outcome == _TRUNCATED:
        raise FormatError(f"the ANS stream ends before its {count} symbols are decoded")
    if outcome == _BAD_STATE:
        raise FormatError(f"the ANS stream starts with an impossible state {int(initial)}")
    if outcome == _NOT_AT_END:
        raise FormatError("the ANS stream does not end where its symbols do: the stream is corrupt")
    return out
