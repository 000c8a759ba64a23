"""The adaptive rANS coder: bit-exact round trips, its cost against the entropy and Huffman,
hostile streams and records, and files that use it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_encode_codec import compressed_model, mutate

import deepshrink
from deepshrink.encode import ans, container
from deepshrink.encode.codec import decode_state_dict, encode_model
from deepshrink.encode.huffman import code_lengths
from deepshrink.errors import FormatError
from deepshrink.layers import plain_state_dict


def laplace_symbols(count: int, alphabet: int, scale: float, seed: int = 0) -> np.ndarray:
    values = np.abs(np.random.default_rng(seed).laplace(0, scale, count)).astype(np.int64)
    return np.minimum(values, alphabet - 1).astype(np.uint8 if alphabet <= 256 else np.uint16)


def entropy_bits(symbols: np.ndarray) -> float:
    counts = np.bincount(symbols.astype(np.int64))
    probabilities = counts[counts > 0] / len(symbols)
    return float(-(probabilities * np.log2(probabilities)).sum() * len(symbols))


@settings(max_examples=150, deadline=None)
@given(
    st.integers(0, 16).map(lambda bits: 1 << bits) | st.integers(1, 70_000).map(lambda size: min(size, 1 << 16)),
    st.lists(st.integers(0, 1 << 16), max_size=3000),
    st.sampled_from(ans.CONTEXTS),
)
def test_every_stream_round_trips_bit_exactly(alphabet, raw, context):
    symbols = np.array([value % alphabet for value in raw], dtype=np.uint8 if alphabet <= 256 else np.uint16)
    data = ans.encode(symbols, alphabet, context)
    assert len(data) <= ans.max_stream_bytes(len(symbols), alphabet)
    decoded = ans.decode(data, len(symbols), alphabet, context)
    assert decoded.dtype == symbols.dtype and np.array_equal(decoded, symbols)


@pytest.mark.parametrize("alphabet", [2, 32, 256])
def test_long_streams_cost_little_over_their_entropy_and_about_what_huffman_does(alphabet):
    """The adaptive model pays for learning, not for a table: within 1% of the order-0 entropy
    plus what learning the counts costs ((A - 1) / 2 log2 n bits, the bound for any adaptive
    code) on 200,000 weight-code-like symbols. Against a Huffman code of the same counts
    (without its table): smaller on 2 and 32 symbols, within 0.5% on 256, where learning 255
    probabilities costs more than Huffman's rounding to whole bits."""
    symbols = laplace_symbols(200_000, alphabet, alphabet / 12 + 0.2, seed=alphabet)
    coded_bits = 8 * len(ans.encode(symbols, alphabet, "none"))
    counts = np.bincount(symbols.astype(np.int64), minlength=alphabet)
    huffman_bits = int((code_lengths(counts).astype(np.int64) * counts).sum())
    assert coded_bits <= 1.01 * entropy_bits(symbols) + (alphabet - 1) / 2 * np.log2(len(symbols))
    assert coded_bits < huffman_bits * (1.005 if alphabet > 32 else 1.0)


def test_the_previous_symbol_context_finds_order_one_structure():
    """A stream where each symbol predicts the next: `previous` codes it in far fewer bits than
    `none`, and encode_smallest keeps it."""
    generator = np.random.default_rng(0)
    symbols = np.empty(100_000, dtype=np.uint8)
    symbols[0] = 0
    for index in range(1, len(symbols)):  # stays in the previous symbol's quarter 95% of the time
        quarter = symbols[index - 1] // 8 if generator.random() < 0.95 else generator.integers(0, 4)
        symbols[index] = quarter * 8 + generator.integers(0, 8)
    assert len(ans.encode(symbols, 32, "previous")) < 0.8 * len(ans.encode(symbols, 32, "none"))
    assert ans.encode_smallest(symbols, 32)[0] == "previous"


def test_truncated_and_corrupted_streams_are_format_errors_never_wrong_reads():
    """Every truncation to whole words is refused; a changed byte is refused or decodes to
    symbols of the alphabet (rANS carries no checksum: the file's CRCs and the record's counts
    catch the rest), and a bad length or starting state is refused before decoding."""
    symbols = laplace_symbols(5000, 32, 3.0)
    data = ans.encode(symbols, 32, "previous")
    for end in range(ans.HEADER_BYTES, len(data), 4):
        with pytest.raises(FormatError):
            ans.decode(data[:end], len(symbols), 32, "previous")
    for cut in (0, 3, 7, len(data) - 1):
        with pytest.raises(FormatError):
            ans.decode(data[:cut], len(symbols), 32, "previous")
    with pytest.raises(FormatError, match="impossible state"):
        ans.decode(bytes(8) + data[8:], len(symbols), 32, "previous")
    with pytest.raises(FormatError):  # one symbol more than was coded
        ans.decode(data, len(symbols) + 1, 32, "previous")
    refused = 0
    generator = np.random.default_rng(1)
    for position in generator.integers(0, len(data), 300):
        broken = bytearray(data)
        broken[position] ^= 1 << int(generator.integers(0, 8))
        try:
            decoded = ans.decode(bytes(broken), len(symbols), 32, "previous")
        except FormatError:
            refused += 1
            continue
        assert len(decoded) == len(symbols) and int(decoded.max()) < 32
    assert refused > 250


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"streams.codes.context": "order-2"}, "unknown context"),
        ({"streams.codes.bits": 8}, "declares 8 bits"),
        ({"streams.gaps.symbols": 3}, "gaps"),
    ],
)
def test_ans_records_that_lie_are_format_errors(changes, message):
    header, buffers = encode_model(compressed_model("lenet-300-100"), coder="ans")
    with pytest.raises(FormatError, match=message):
        decode_state_dict(mutate(header, "fc1.weight", **changes), buffers)


def test_stream_lengths_an_encoder_cannot_make_are_refused_before_decoding():
    header, buffers = encode_model(compressed_model("lenet-300-100"), coder="ans")
    record = next(record for record in header["tensors"] if record["name"] == "fc2.weight")
    stream = record["streams"]["codes"]
    for extra in (b"\0\0", bytes(4 * (stream["symbols"] + 8))):  # not whole words; longer than possible
        longer = list(buffers)
        longer[stream["buffer"]] = buffers[stream["buffer"]] + extra
        stream["bits"] = 8 * len(longer[stream["buffer"]])
        with pytest.raises(FormatError, match="words|more than"):
            decode_state_dict(header, longer)


def test_a_file_with_ans_streams_loads_bit_exactly_and_says_it_needs_format_2_2(tmp_path):
    model = compressed_model("lenet-5")
    path = deepshrink.save_compressed(model, tmp_path / "ans.dcz", model_name="lenet-5", coder="ans")
    huffman = deepshrink.save_compressed(model, tmp_path / "huffman.dcz", model_name="lenet-5")
    assert path.read_bytes()[8:12] == b"\x02\x00\x02\x00" and huffman.read_bytes()[8:12] == b"\x02\x00\x01\x00"
    assert all(record.get("coder", "ans") == "ans" for record in container.read(path).header["tensors"])
    loaded, _ = deepshrink.load_compressed(path)
    for key, tensor in plain_state_dict(model).items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
