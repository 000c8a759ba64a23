"""Model <-> .dcz records: bit-exact decoding, and records that lie."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from deepshrink.encode.codec import decode_state_dict, encode_model
from deepshrink.encode.container import from_bytes, to_bytes
from deepshrink.errors import FormatError
from deepshrink.layers import plain_state_dict, select_weights
from deepshrink.models import build_model
from deepshrink.prune.masks import sparsity_mask
from deepshrink.prune.module import apply_masks
from deepshrink.quantize.shared import share_weights


def compressed_model(name: str, sparsity: float = 0.92, bits=None, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(name)
    apply_masks(
        model, {layer: sparsity_mask(module.value, sparsity) for layer, module in select_weights(model).items()}
    )
    share_weights(model, bits)
    return model


def round_trip(model, **options):
    header, buffers = encode_model(model, **options)
    container = from_bytes(to_bytes(header, buffers))
    return decode_state_dict(container.header, container.buffers)


@pytest.mark.parametrize("name", ["lenet-300-100", "lenet-5"])
@pytest.mark.parametrize("coder", ["huffman", "ans", "fixed"])
@pytest.mark.parametrize("layout", ["csr", "csc", "dense"])
def test_decoding_is_bit_exact(name, coder, layout):
    model = compressed_model(name)
    decoded = round_trip(model, coder=coder, layout=layout)
    expected = plain_state_dict(model)
    assert decoded.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(decoded[key], tensor), key
    fresh = build_model(name)
    fresh.load_state_dict(decoded)
    inputs = torch.randn(2, 1, 28, 28)
    assert torch.equal(fresh(inputs), model(inputs))


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.999])
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_extreme_sparsities_and_widths(sparsity, bits):
    model = compressed_model("lenet-300-100", sparsity, {"*": bits})
    decoded = round_trip(model, index_bits={"*": 2})
    for key, tensor in plain_state_dict(model).items():
        assert torch.equal(decoded[key], tensor), key


def test_unshared_layers_and_buffers_are_stored_raw():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4 * 26 * 26, 10)
    )
    model[1].running_mean.fill_(0.25)
    share_weights(model, {"3": 4})
    header, _ = encode_model(model)
    encodings = {record["name"]: record["encoding"] for record in header["tensors"]}
    assert encodings["3.weight"] == "shared" and encodings["0.weight"] == "raw"
    assert encodings["1.running_mean"] == "raw" and encodings["1.num_batches_tracked"] == "raw"
    decoded = round_trip(model)
    assert torch.equal(decoded["1.running_mean"], model[1].running_mean)


def test_encoding_leaves_the_model_usable():
    """Regression: removing parametrizations from a deep copy used to break the original."""
    model = compressed_model("lenet-5")
    before = model(torch.ones(1, 1, 28, 28))
    encode_model(model)
    assert torch.equal(model(torch.ones(1, 1, 28, 28)), before)


def test_the_same_model_gives_the_same_bytes():
    model = compressed_model("lenet-5")
    assert to_bytes(*encode_model(model)) == to_bytes(*encode_model(copy.deepcopy(model)))


def test_huffman_beats_fixed_width_on_real_code_distributions():
    model = compressed_model("lenet-300-100")
    huffman_size = len(to_bytes(*encode_model(model, coder="huffman")))
    fixed_size = len(to_bytes(*encode_model(model, coder="fixed")))
    assert huffman_size < fixed_size


def mutate(header: dict, name: str, **changes) -> dict:
    header = copy.deepcopy(header)
    for record in header["tensors"]:
        if record["name"] == name:
            for key, value in changes.items():
                if "." in key:
                    outer, inner = key.split(".", 1)
                    stream, field = inner.split(".")
                    record[outer][stream][field] = value
                else:
                    record[key] = value
    return header


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"shape": [300, -1]}, "non-negative"),
        ({"shape": [2**30, 2**30]}, "more than"),
        ({"shape": [301, 784]}, "does not match shape"),
        ({"dtype": "complex64"}, "unknown dtype"),
        ({"encoding": "zip"}, "unknown encoding"),
        ({"bits": 0}, "bits is 0; expected an integer from 1"),
        ({"bits": 2}, "codebook has"),
        ({"codebook": 999}, "refers to buffer"),
        ({"coder": "arithmetic"}, "unknown coder"),
        ({"coder": "ans"}, "unknown context"),
        ({"layout": "coo"}, "unknown layout"),
        ({"entries": 10**9}, "entries is"),
        ({"streams.codes.symbols": 5}, "codes"),
        ({"streams.gaps.bits": 10**9}, "gaps bit count"),
        ({"streams.codes.lanes": [1, 2, 3]}, "lanes"),
        ({"streams.counts.width": 0}, "counts width is 0"),
        ({"index_bits": 17}, "index_bits"),
    ],
)
def test_records_that_lie_are_format_errors(changes, message):
    model = compressed_model("lenet-300-100")
    header, buffers = encode_model(model)
    with pytest.raises(FormatError, match=message):
        decode_state_dict(mutate(header, "fc1.weight", **changes), buffers)


def test_corrupt_stream_bytes_are_format_errors():
    model = compressed_model("lenet-300-100")
    header, buffers = encode_model(model)
    record = next(record for record in header["tensors"] if record["name"] == "fc2.weight")
    gaps = record["streams"]["gaps"]["buffer"]
    broken = list(buffers)
    broken[gaps] = bytes(255 - byte for byte in buffers[gaps])
    with pytest.raises(FormatError):
        decode_state_dict(header, broken)


def test_size_totals_are_right_for_a_partly_compressed_model(tmp_path):
    """Only fc1 pruned and shared: the total row counts kept weights among every tensor, and a
    separate row among the weight-shared ones (issue 18: 15.0% was shown for the whole file)."""
    from deepshrink.compressed import inspect_header, save_compressed
    from deepshrink.encode.sizes import format_size_table, size_report

    torch.manual_seed(0)
    model = build_model("lenet-300-100")
    apply_masks(model, {"fc1": sparsity_mask(model.fc1.weight, 0.9)})
    share_weights(model, {"fc1": 5})
    rows, totals = size_report(
        inspect_header(save_compressed(model, tmp_path / "m.dcz", model_name="lenet-300-100"))[0]
    )
    kept_fc1 = int(torch.count_nonzero(model.fc1.weight))
    everything = sum(tensor.numel() for tensor in plain_state_dict(model).values())
    assert (totals["weights"], totals["kept"]) == (300 * 784, kept_fc1)
    assert (totals["all_weights"], totals["all_kept"]) == (everything, everything - 300 * 784 + kept_fc1)
    table = format_size_table(rows, totals)
    shared_row = next(line for line in table.splitlines() if line.startswith("weight-shared tensors"))
    total_row = next(line for line in table.splitlines() if line.startswith("total (file)"))
    assert f"{100 * kept_fc1 / (300 * 784):.1f}%" in shared_row
    assert f"{everything:,}" in total_row and f"{100 * totals['all_kept'] / everything:.1f}%" in total_row


def test_the_size_table_accounts_for_every_byte_of_a_file_of_either_header_format(tmp_path):
    """The table's rows and its header row sum to the file's size, for a file written now and for
    the same content framed as format 2.2 (header deflated without the dictionary), whose header
    is larger: the size comes from the file, not from re-encoding its header."""
    import json

    import hostile

    from deepshrink.compressed import file_sizes, save_compressed
    from deepshrink.encode import container
    from deepshrink.encode.sizes import format_size_table

    model = compressed_model("lenet-300-100")
    path = save_compressed(model, tmp_path / "m.dcz", model_name="lenet-300-100")
    data = path.read_bytes()
    header, data_start = container.parse_header(data)
    text = json.dumps(hostile.legacy_header(header, data[data_start:]), sort_keys=True, separators=(",", ":")).encode()
    older = tmp_path / "older.dcz"
    older.write_bytes(hostile.frame_json(text, data[data_start:], major=2, minor=1))
    assert older.stat().st_size > path.stat().st_size
    for written in (path, older):
        rows, totals = file_sizes(written)
        assert totals["file_bytes"] == written.stat().st_size
        assert sum(row.bytes for row in rows) + totals["header_bytes"] == written.stat().st_size
        header_row = next(line for line in format_size_table(rows, totals).splitlines() if line.startswith("header"))
        assert header_row.split()[-1] == f"{totals['header_bytes']:,}"


def model_with_dead_units(dead_fraction: float = 0.75):
    """LeNet-300-100 pruned to 8% within the rows of fc1 it keeps, the others (dead units) empty."""
    torch.manual_seed(1)
    model = build_model("lenet-300-100")
    masks = {layer: sparsity_mask(module.value, 0.92) for layer, module in select_weights(model).items()}
    rows = masks["fc1"].shape[0]
    masks["fc1"][torch.randperm(rows)[: int(dead_fraction * rows)]] = 0
    apply_masks(model, masks)
    share_weights(model, {"*": 4})
    return model


def test_mostly_empty_rows_have_their_counts_coded_by_ans():
    """Format 2.6: an ans record's row counts are rANS-coded where that is smaller than fixed width
    (fc1's, three quarters zero), stay fixed-width where it is not, and decode bit-exactly."""

    model = model_with_dead_units()
    header, buffers = encode_model(model, coder="ans")
    streams = {record["name"]: record["streams"] for record in header["tensors"] if "streams" in record}
    counts = streams["fc1.weight"]["counts"]
    assert "context" in counts
    assert len(buffers[counts["buffer"]]) < (counts["symbols"] * counts["width"] + 7) // 8
    assert "context" not in streams["fc3.weight"]["counts"]  # 10 rows: the fixed width is smaller
    data = to_bytes(header, buffers)
    decoded = decode_state_dict(from_bytes(data).header, from_bytes(data).buffers)
    for key, tensor in plain_state_dict(model).items():
        assert torch.equal(decoded[key], tensor), key
    # Under Huffman the counts stay fixed-width.
    header, buffers = encode_model(model, coder="huffman")
    assert not any("context" in record["streams"]["counts"] for record in header["tensors"] if "streams" in record)


@pytest.mark.parametrize(
    ("coder", "changes", "message"),
    [
        ("huffman", {"streams.counts.context": "none"}, "counts stream is ans-coded .* in a huffman record"),
        ("ans", {"streams.counts.width": 17}, "counts width is 17; expected an integer from 1 to 16"),
        ("ans", {"streams.counts.context": "next"}, "counts stream: unknown context"),
        ("ans", {"streams.counts.symbols": 299}, "counts stream declares 299 symbols"),
    ],
)
def test_coded_counts_that_lie_are_format_errors(coder, changes, message):
    header, buffers = encode_model(model_with_dead_units(), coder=coder)
    with pytest.raises(FormatError, match=message):
        decode_state_dict(mutate(header, "fc1.weight", **changes), buffers)


def test_corrupt_coded_counts_are_format_errors():
    header, buffers = encode_model(model_with_dead_units(), coder="ans")
    record = next(record for record in header["tensors"] if record["name"] == "fc1.weight")
    counts = record["streams"]["counts"]["buffer"]
    for broken_bytes in (bytes(255 - byte for byte in buffers[counts]), buffers[counts][:-4]):
        broken = list(buffers)
        broken[counts] = broken_bytes
        with pytest.raises(FormatError, match="counts|fc1"):
            decode_state_dict(header, broken)


def model_with_unread_inputs(dead_fraction: float = 0.7):
    """model_with_dead_units, with fc2's weights on the dead units pruned too: inputs it never reads."""
    model = model_with_dead_units(dead_fraction)
    dead = plain_state_dict(model)["fc1.weight"].abs().sum(dim=1) == 0
    masks = {name: (module.value != 0).float() for name, module in select_weights(model).items()}
    masks["fc2"][:, dead] = 0
    apply_masks(model, masks)
    share_weights(model, {"*": 4})
    return model


@pytest.mark.parametrize("layout", ["csr", "csc"])
def test_gaps_over_used_columns_are_smaller_and_decode_bit_exactly(layout, tmp_path):
    """Format 2.7: under ans, fc2 (csr: 70% of its inputs unread) or fc1 (csc: its dead units are
    the stored columns) gets a used stream, its streams shrink, and every reader gives back the
    same weights: decode_state_dict, and the runtime's CSR arrays through its products."""
    from deepshrink.encode.codec import _encode_sparse, _padded_size
    from deepshrink.encode.sparse import to_sparse
    from deepshrink.quantize.shared import sharing_of
    from deepshrink.runtime.load import load_runtime

    model = model_with_unread_inputs()
    narrowed_name = "fc2.weight" if layout == "csr" else "fc1.weight"
    header, buffers = encode_model(model, coder="ans", layout=layout)
    records = {record["name"]: record for record in header["tensors"]}
    assert "used" in records[narrowed_name]["streams"]
    data = to_bytes(header, buffers)
    read = from_bytes(data)
    decoded = decode_state_dict(read.header, read.buffers)
    for key, tensor in plain_state_dict(model).items():
        assert torch.equal(decoded[key], tensor), key
    inputs = torch.randn(5, 1, 28, 28)
    (tmp_path / "model.dcz").write_bytes(data)
    runtime = load_runtime(tmp_path / "model.dcz", build_model("lenet-300-100"), mode="sparse")
    with torch.no_grad():
        torch.testing.assert_close(runtime(inputs), model(inputs), rtol=1e-5, atol=1e-5)
    # The same layer over every column: more bytes, which is why the writer chose the used stream.
    codes = sharing_of(model.get_submodule(narrowed_name.split(".")[0])).indices.numpy().astype("uint8")
    record = records[narrowed_name]
    everything = _padded_size(_encode_sparse(to_sparse(codes, record["index_bits"], layout), 4, "ans")[1])
    used = _padded_size([buffers[stream["buffer"]] for stream in record["streams"].values()])
    assert used + 16 <= everything
    # Under Huffman, the paper's coder, the gaps count every column.
    header, _ = encode_model(model, coder="huffman", layout=layout)
    assert not any("used" in record.get("streams", {}) for record in header["tensors"])


USED_STREAM = {"buffer": 0, "symbols": 300, "bits": 64, "context": "none"}


@pytest.mark.parametrize(
    ("coder", "added", "changes", "message"),
    [
        ("huffman", {"used": USED_STREAM}, {}, "only defined"),
        ("ans", {}, {"streams.used.symbols": 301}, "used stream declares 301 symbols"),
        ("ans", {}, {"streams.used.context": "next"}, "used stream: unknown context"),
        ("ans", {"extra": {}}, {}, "optionally used; found"),
    ],
)
def test_used_streams_that_lie_are_format_errors(coder, added, changes, message):
    """`added`: whole streams put into fc2's record; `changes`: fields of its streams set."""
    header, buffers = encode_model(model_with_unread_inputs(), coder=coder)
    next(record for record in header["tensors"] if record["name"] == "fc2.weight")["streams"].update(added)
    with pytest.raises(FormatError, match=message):
        decode_state_dict(mutate(header, "fc2.weight", **changes), buffers)


def test_used_columns_too_few_or_corrupt_are_format_errors():
    """A used stream that marks fewer columns than the gaps walk, or whose bytes are damaged or
    cut short, is refused; no read lands outside the matrix."""
    from deepshrink.encode import ans

    header, buffers = encode_model(model_with_unread_inputs(), coder="ans")
    record = next(record for record in header["tensors"] if record["name"] == "fc2.weight")
    used = record["streams"]["used"]["buffer"]
    too_few = list(buffers)
    marks = np.r_[np.ones(5, np.uint8), np.zeros(295, np.uint8)]
    too_few[used] = ans.encode(marks, 2, record["streams"]["used"]["context"])
    for broken_bytes, message in (
        (too_few[used], "run past"),
        (bytes(255 - byte for byte in buffers[used]), "fc2"),
        (buffers[used][:-4], "fc2"),
    ):
        broken = list(buffers)
        broken[used] = broken_bytes
        fixed = copy.deepcopy(header)
        target = next(record for record in fixed["tensors"] if record["name"] == "fc2.weight")
        target["streams"]["used"]["bits"] = 8 * len(broken_bytes)
        with pytest.raises(FormatError, match=message):
            decode_state_dict(fixed, broken)


def test_an_empty_tensor_with_a_long_side_counts_its_index_arrays_against_the_limit():
    """A [2^20, 0] weight holds nothing, but its one count per row is 2^20 symbols (8 MiB as
    int64), which rANS codes in a few hundred bytes: the size limit counts them, so a reader held
    to 1 MiB refuses the file instead of allocating them."""
    from deepshrink.encode import ans
    from deepshrink.encode.codec import check

    header, buffers = encode_model(model_with_unread_inputs(), coder="ans")
    record = next(record for record in header["tensors"] if record["name"] == "fc2.weight")
    streams = record["streams"]
    buffers = list(buffers)
    empty = ans.encode(np.zeros(0, np.uint8), 16)
    for key, data in (("codes", empty), ("gaps", empty), ("used", empty)):
        buffers[streams[key]["buffer"]] = data
        streams[key].update(symbols=0, bits=8 * len(data), context="none")
    counts = ans.encode(np.zeros(1 << 20, np.uint8), 2)
    buffers[streams["counts"]["buffer"]] = counts
    streams["counts"] = {
        "buffer": streams["counts"]["buffer"],
        "symbols": 1 << 20,
        "bits": 8 * len(counts),
        "width": 1,
        "context": "none",
    }
    streams["used"]["symbols"] = 0
    record.update(shape=[1 << 20, 0], matrix=[1 << 20, 0], entries=0, nonzeros=0)
    assert len(counts) < 2000
    assert decode_state_dict(header, buffers)["fc2.weight"].shape == (1 << 20, 0)  # valid under the default limit
    with pytest.raises(FormatError, match="decode to more than"):
        check(header, buffers, max_decoded_bytes=1 << 20)
