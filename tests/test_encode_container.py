"""The .dcz framing: exact round trips, deterministic bytes, and hostile files."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepshrink.encode.container import (
    COMPACT_TABLE_MINOR_VERSION,
    HEADER_DICTIONARY,
    MAGIC,
    MAX_JSON_DEPTH,
    PREAMBLE,
    from_bytes,
    json_depth,
    read,
    to_bytes,
    write,
)
from deepshrink.errors import FormatError

HEADER = {"format": "deepshrink-dcz", "metadata": {"model": "lenet-5"}, "tensors": [{"name": "fc1.weight"}]}
BUFFERS = [b"abc", b"", b"\x00" * 17, bytes(range(256))]


def test_round_trip_gives_back_the_exact_bytes():
    container = from_bytes(to_bytes(HEADER, BUFFERS))
    assert container.header == HEADER and container.buffers == BUFFERS


def test_same_input_same_bytes_and_aligned_buffers():
    data = to_bytes(HEADER, BUFFERS)
    assert data == to_bytes(dict(reversed(list(HEADER.items()))), BUFFERS)
    header_length = struct.unpack_from("<Q", data, 16)[0]
    # A plain zlib inflater given the preset dictionary reads the header, as in any language.
    inflater = zlib.decompressobj(zdict=HEADER_DICTIONARY)
    stored = json.loads(inflater.decompress(data[PREAMBLE.size : PREAMBLE.size + header_length]))
    # Since 2.7 the table is the lengths, each buffer at the previous one's end rounded up to 8,
    # and one CRC-32 of everything after the header.
    assert struct.unpack_from("<H", data, 10)[0] == COMPACT_TABLE_MINOR_VERSION == 7
    assert stored["buffers"] == [len(buffer) for buffer in BUFFERS]
    start = PREAMBLE.size + header_length
    assert stored["buffers_crc32"] == zlib.crc32(data[start:])
    for buffer in BUFFERS:
        assert start % 8 == 0 and data[start : start + len(buffer)] == buffer
        start += len(buffer) + (-len(buffer) % 8)
    assert start == len(data)


def test_write_is_atomic_and_reads_back(tmp_path):
    path = write(tmp_path / "model.dcz", HEADER, BUFFERS)
    assert [item.name for item in tmp_path.iterdir()] == ["model.dcz"]
    assert read(path).buffers == BUFFERS


def test_every_truncation_is_a_format_error():
    data = to_bytes(HEADER, BUFFERS)
    for length in range(len(data)):
        with pytest.raises(FormatError):
            from_bytes(data[:length])


def test_every_single_bit_flip_is_caught():
    data = to_bytes(HEADER, [b"weights!" * 4])
    for position in range(len(data)):
        for bit in (0, 3, 7):
            corrupt = bytearray(data)
            corrupt[position] ^= 1 << bit
            with pytest.raises(FormatError):
                from_bytes(bytes(corrupt))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_crash(data):
    with pytest.raises(FormatError):
        from_bytes(MAGIC + data)


def lying(header: dict, buffers=(b"abcdefgh",), major: int = 2, minor: int = 0) -> bytes:
    """A file whose header says what we choose, with a correct checksum over the lie.

    Major version 2 stores the header zlib-compressed, version 1 as plain JSON; both are read.
    Minor version 0 has a buffer table of objects, 7 and later one of lengths.
    """
    encoded = json.dumps(header).encode()
    if major == 2:
        encoded = zlib.compress(encoded)
    encoded += (b"\0" if major == 2 else b" ") * (-len(encoded) % 8)
    return framed(encoded, major, minor) + b"".join(buffers)


def framed(encoded: bytes, major: int = 2, minor: int = 0) -> bytes:
    checksum = zlib.crc32(encoded, zlib.crc32(struct.pack("<HH", major, minor)))
    return PREAMBLE.pack(MAGIC, major, minor, checksum, len(encoded)) + encoded


# The preset dictionary is part of format 2.3: files written with it read only with these bytes.
HEADER_DICTIONARY_ADLER32 = 0x5CAC4C06
HEADER_DICTIONARY_LENGTH = 15881


def test_the_header_dictionary_never_changes():
    assert (zlib.adler32(HEADER_DICTIONARY), len(HEADER_DICTIONARY)) == (
        HEADER_DICTIONARY_ADLER32,
        HEADER_DICTIONARY_LENGTH,
    ), "a changed header dictionary breaks every 2.3 file: add it as a new one, with a new minor version"


def test_the_dictionary_shortens_a_real_header_and_is_named_in_the_stream(tmp_path):
    """A pruned, weight-shared LeNet-300-100's header (not one the dictionary was made from)
    deflates to under 70% of its plain-deflate size (63%), and the stream carries zlib's FDICT
    flag and the dictionary's id, so that any zlib reads it given the dictionary."""
    import torch

    import deepshrink
    from deepshrink.layers import select_weights
    from deepshrink.models import build_model
    from deepshrink.prune.masks import sparsity_mask
    from deepshrink.prune.module import apply_masks
    from deepshrink.quantize.shared import share_weights

    torch.manual_seed(0)
    model = build_model("lenet-300-100")
    apply_masks(model, {layer: sparsity_mask(module.value, 0.95) for layer, module in select_weights(model).items()})
    share_weights(model, None)
    data = deepshrink.save_compressed(model, tmp_path / "m.dcz", model_name="lenet-300-100").read_bytes()
    header_length = struct.unpack_from("<Q", data, 16)[0]
    stored = data[PREAMBLE.size : PREAMBLE.size + header_length].rstrip(b"\0")
    text = zlib.decompressobj(zdict=HEADER_DICTIONARY).decompress(stored)
    assert stored[1] & 0x20 and int.from_bytes(stored[2:6], "big") == zlib.adler32(HEADER_DICTIONARY)
    assert len(stored) < 0.7 * len(zlib.compress(text, 9)), (len(stored), len(zlib.compress(text, 9)))
    assert struct.unpack_from("<H", data, 10)[0] == COMPACT_TABLE_MINOR_VERSION  # every file written is 2.7


def test_a_header_deflated_against_another_dictionary_is_refused():
    text = json.dumps({"buffers": []}).encode()
    deflater = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, b'{"buffers":[]} another dictionary')
    encoded = deflater.compress(text) + deflater.flush()
    with pytest.raises(FormatError, match=r"preset dictionary 0x[0-9a-f]{8}.*newer deepshrink"):
        from_bytes(framed(encoded + b"\0" * (-len(encoded) % 8)))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_a_stream_that_names_our_dictionary_but_holds_garbage_is_refused(body, whole):
    """A zlib header with FDICT and our dictionary's id, then random deflate data (or a valid
    stream cut short at a random place): a FormatError, never a crash; the checksum is right, so
    only the inflating can refuse it."""
    dictionary_id = zlib.adler32(HEADER_DICTIONARY).to_bytes(4, "big")
    if whole:  # a real stream over our dictionary, truncated where the random bytes say
        deflater = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, HEADER_DICTIONARY)
        stream = deflater.compress(b'{"buffers":[],"format":"deepshrink-dcz"}') + deflater.flush()
        encoded = stream[: len(body) % len(stream)]
    else:
        encoded = b"\x78\xf9" + dictionary_id + body  # 0x78f9: deflate, 32 KB window, FDICT, check bits right
    with pytest.raises(FormatError):
        from_bytes(framed(encoded + b"\0" * (-len(encoded) % 8)))


def test_version_1_files_with_a_plain_json_header_are_still_read():
    header = {"buffers": [{"offset": 0, "length": 8, "crc32": zlib.crc32(b"abcdefgh")}], "format": "x"}
    for major in (1, 2):
        assert from_bytes(lying(header, major=major)).header == {"format": "x"}


def padded(encoded: bytes) -> bytes:
    return encoded + b"\0" * (-len(encoded) % 8)


@pytest.mark.parametrize(
    ("encoded", "message"),
    [
        (padded(zlib.compress(b" " * (65 << 20), 9)), "inflates to more than"),  # a zip bomb
        (padded(zlib.compress(b'{"buffers": []}')[:-6]), "zlib stream"),  # cut short, then zeros
        (b"not zlib", "not a valid zlib stream"),
        (zlib.compress(b'{"buffers": []}') + b"\0" * 9, "unexpected bytes after the header"),
        (padded(zlib.compress(b'{"buffers": []}') + b"x"), "unexpected bytes after the header"),
    ],
    ids=["bomb", "truncated", "not-zlib", "long-padding", "trailing-garbage"],
)
def test_a_hostile_compressed_header_is_refused(encoded, message):
    encoded += b"\0" * (-len(encoded) % 8)
    with pytest.raises(FormatError, match=message):
        from_bytes(framed(encoded))


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"buffers": [{"offset": 0, "length": 10**12, "crc32": 0}]}, "truncated"),
        ({"buffers": [{"offset": 8, "length": 0, "crc32": 0}]}, "expected 0"),
        ({"buffers": [{"offset": 0, "length": 8, "crc32": 1}]}, "checksum"),
        ({"buffers": [{"offset": 0, "length": -8, "crc32": 0}]}, "negative"),
        ({"buffers": [{"offset": 0, "length": 8}]}, "exactly offset, length and crc32"),
        ({"buffers": "all of them"}, "'buffers' list"),
        ({"no": "buffers"}, "'buffers' list"),
        ({"buffers": []}, "unexpected bytes"),
    ],
)
def test_a_header_that_lies_is_refused(header, message):
    with pytest.raises(FormatError, match=message):
        from_bytes(lying(header))


EIGHT = zlib.crc32(b"abcdefgh")


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"buffers": [8]}, "buffers_crc32 is None"),
        ({"buffers": [8], "buffers_crc32": 1 << 32}, "buffers_crc32 is 4294967296"),
        ({"buffers": [8], "buffers_crc32": -1}, "buffers_crc32 is -1"),
        ({"buffers": [8], "buffers_crc32": EIGHT ^ 1}, "checksum does not match"),
        ({"buffers": [{"offset": 0, "length": 8, "crc32": EIGHT}], "buffers_crc32": EIGHT}, "lists each buffer's"),
        ({"buffers": [True], "buffers_crc32": EIGHT}, "lists each buffer's length"),
        ({"buffers": [-8], "buffers_crc32": EIGHT}, "lists each buffer's length"),
        ({"buffers": [10**12], "buffers_crc32": EIGHT}, "truncated"),
        ({"buffers": [4], "buffers_crc32": EIGHT}, "padding after buffer 0"),
        ({"buffers": [3, 1], "buffers_crc32": EIGHT}, "truncated"),
        ({"buffers": [], "buffers_crc32": EIGHT}, "unexpected bytes"),
    ],
)
def test_a_compact_table_that_lies_is_refused(header, message):
    """Since 2.7 (by the preamble's minor version) the table is lengths and one checksum."""
    assert from_bytes(lying({"buffers": [8], "buffers_crc32": EIGHT}, minor=7)).buffers == [b"abcdefgh"]
    with pytest.raises(FormatError, match=message):
        from_bytes(lying(header, minor=7))


def test_padding_under_the_compact_checksum_must_still_be_zero():
    data = lying({"buffers": [3], "buffers_crc32": zlib.crc32(b"abc\0\0\0\0x")}, buffers=(b"abc\0\0\0\0x",), minor=7)
    with pytest.raises(FormatError, match="padding after buffer 0"):
        from_bytes(data)


def test_huge_header_length_is_refused_before_reading():
    data = PREAMBLE.pack(MAGIC, 1, 0, 0, 1 << 40)
    with pytest.raises(FormatError, match="header length"):
        from_bytes(data)


def test_other_major_version_is_refused():
    data = bytearray(to_bytes(HEADER, BUFFERS))
    struct.pack_into("<H", data, 8, 3)
    with pytest.raises(FormatError, match=rf"version 3\.{COMPACT_TABLE_MINOR_VERSION} is not readable"):
        from_bytes(bytes(data))


def _nesting(value) -> int:
    """json_depth's reference: the plain recursive definition."""
    if isinstance(value, dict):
        return 1 + max(map(_nesting, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_nesting, value), default=0)
    return 0


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=3),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children, max_size=4),
    max_leaves=30,
)


@given(JSON)
def test_json_depth_matches_the_recursive_definition(value):
    assert json_depth(value) == _nesting(value)


def test_a_header_nested_too_deep_is_refused():
    header = {"buffers": [{"offset": 0, "length": 8, "crc32": zlib.crc32(b"abcdefgh")}]}
    nested: list = []  # the header object and this list are two levels
    for _ in range(MAX_JSON_DEPTH - 2):
        nested = [nested]
    assert from_bytes(lying({**header, "x": nested})).header == {"x": nested}
    with pytest.raises(FormatError, match=f"nests {MAX_JSON_DEPTH + 1} levels deep; at most {MAX_JSON_DEPTH}"):
        from_bytes(lying({**header, "x": [nested]}))
