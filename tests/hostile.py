"""Hostile .dcz files, made as an attacker would, and a runner that feeds them to every reader.

The files lie *after* the checksums: each is re-framed with its CRCs recomputed, so the checks
behind the CRC (types, ranges, lengths, the model, resource limits) are what stops them.

Used by tests/test_hostile_files.py (a CI-sized set) and benchmarks/hostile_files.py (longer).
Run as a script, the runner reads files from a directory under a memory limit and prints one
JSON line per (file, reader) with the outcome.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import sys
import zlib
from pathlib import Path

import numpy as np
import torch

from deepshrink.encode import container
from deepshrink.layers import select_weights
from deepshrink.models import build_model
from deepshrink.prune.masks import sparsity_mask
from deepshrink.prune.module import apply_masks
from deepshrink.quantize.shared import share_weights

MODEL = "lenet-300-100"
MEMORY_LIMIT = 2 << 30  # address space of the runner: a crafted file must not need more
CLEAN_EXIT_CODES = {3, 4, 5, 6, 7, 8, 9}  # our error kinds (cli.EPILOG); 70 is an internal error


def small_model(name: str = MODEL, sparsity: float = 0.97, bits: int = 4, seed: int = 0, dead_rows: float = 0.0):
    """A registered model (LeNet-300-100) pruned and weight-shared (random weights: the format
    does not care); `dead_rows` of the largest layer's rows emptied, as dead units are (their
    row counts mostly zero: rANS-coded under the ans coder, format 2.6), and the columns that
    read them in a layer of as many inputs (unread: under ans, a used stream, format 2.7)."""
    torch.manual_seed(seed)
    model = build_model(name)
    masks = {name: sparsity_mask(layer.value, sparsity) for name, layer in select_weights(model).items()}
    largest = max(masks, key=lambda layer: masks[layer].numel())
    rows = masks[largest].shape[0]
    dead = torch.randperm(rows)[: int(dead_rows * rows)]
    masks[largest][dead] = 0
    for mask in masks.values():
        if mask.dim() == 2 and mask.shape[1] == rows:
            mask[:, dead] = 0
    apply_masks(model, masks)
    share_weights(model, {"*": bits})
    return model


def split(data: bytes) -> tuple[dict, list[bytes]]:
    """A valid file's header (without its buffer table) and buffers."""
    parsed = container.from_bytes(data)
    return parsed.header, parsed.buffers


def frame_json(text: bytes, body: bytes = b"", major: int = 2, minor: int = container.MINOR_VERSION) -> bytes:
    """Bytes of a file whose header is `text` (deflated for 2.x), checksum recomputed. The minor
    version decides the buffer table a reader expects: lengths and one checksum since 2.7,
    objects of offset, length and crc32 before (see legacy_table)."""
    encoded = zlib.compress(text, 9) if major == 2 else text
    encoded += b"\0" * (-len(encoded) % container.ALIGNMENT)
    checksum = zlib.crc32(encoded, zlib.crc32(container.VERSIONS.pack(major, minor)))
    return container.PREAMBLE.pack(container.MAGIC, major, minor, checksum, len(encoded)) + encoded + body


def frame(header: dict, buffers: list[bytes]) -> bytes:
    """A file with `header`'s records over `buffers`, every checksum and offset recomputed."""
    return container.to_bytes(header, buffers)


def frame_table(header: dict, table: list, body: bytes, checksum=None, minor: int = container.MINOR_VERSION) -> bytes:
    """A file with an explicit buffer table and body (for lies about the table itself); the
    body's checksum (2.7) is recomputed unless given, and left out for an object table."""
    fields = {"buffers": table}
    if not (table and isinstance(table[0], dict)):
        fields["buffers_crc32"] = zlib.crc32(body) if checksum is None else checksum
    text = json.dumps({**header, **fields}, sort_keys=True, separators=(",", ":")).encode()
    return frame_json(text, body, minor=minor)


def legacy_table(lengths: list[int], body: bytes) -> list[dict]:
    """The buffer table as formats before 2.7 wrote it, for a body of buffers of `lengths`."""
    table, offset = [], 0
    for length in lengths:
        table.append({"offset": offset, "length": length, "crc32": zlib.crc32(body[offset : offset + length])})
        offset += length + (-length % container.ALIGNMENT)
    return table


def legacy_header(header: dict, body: bytes) -> dict:
    """A header parsed from a 2.7 file, with the table a 2.6 writer would have written for `body`."""
    legacy = {key: value for key, value in header.items() if key != "buffers_crc32"}
    return {**legacy, "buffers": legacy_table(header["buffers"], body)}


def _record(header: dict, name: str) -> dict:
    return next(record for record in header["tensors"] if record["name"] == name)


def set_field(header: dict, name: str, path: str, value) -> dict:
    """A copy of `header` with field `path` ("bits", "streams.codes.lanes") of record `name` set."""
    changed = copy.deepcopy(header)
    target = _record(changed, name)
    *outer, last = path.split(".")
    for key in outer:
        target = target[key]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return changed


_DELETE = object()


def record_lies(header: dict) -> list[tuple[str, object]]:
    """(field path, lie) pairs for a sparse shared record: too large, negative, wrong type, inconsistent."""
    record = _record(header, "fc1.weight")
    entries, nonzeros = record["entries"], record["nonzeros"]
    return [
        ("name", None),
        ("name", 5),
        ("name", ""),
        ("name", "x" * 5000),
        ("name", "fc2.weight"),  # a duplicate
        ("name", "fc9.weight"),  # not in the model
        ("shape", [1, 2**31]),  # a 26 KB file declaring an 8 GiB tensor
        ("shape", [2**70, 1]),
        ("shape", [300, -784]),
        ("shape", "300x784"),
        ("shape", [300.5, 784]),
        ("shape", [[300], 784]),
        ("shape", [784, 300]),  # the same size transposed: a different matrix
        ("shape", [0, 2**40, 2**40]),
        ("dtype", None),
        ("dtype", ["float32"]),
        ("dtype", "bfloat16"),
        ("dtype", "complex64"),
        ("encoding", "zip"),
        ("encoding", 3),
        ("encoding", "raw"),
        ("bits", 0),
        ("bits", 17),
        ("bits", -1),
        ("bits", "4"),
        ("bits", True),
        ("bits", 1),
        ("bits", 2**70),
        ("zero_code", "yes"),
        ("zero_code", False),
        ("codebook", 999),
        ("codebook", -1),
        ("codebook", "0"),
        ("codebook", 0),  # another tensor's buffer
        ("coder", "ans"),
        ("coder", None),
        ("coder", "fixed"),
        ("layout", "coo"),
        ("layout", "dense"),
        ("layout", "csc"),
        ("layout", None),
        ("index_bits", 0),
        ("index_bits", 17),
        ("index_bits", "5"),
        ("index_bits", 4),
        ("entries", -1),
        ("entries", 10**9),
        ("entries", entries + 1),
        ("entries", 2**64),
        ("nonzeros", -1),
        ("nonzeros", 10**12),
        ("nonzeros", nonzeros + 1),
        ("nonzeros", "many"),
        ("nonzeros", _DELETE),
        ("matrix", [300, 785]),
        ("matrix", None),
        ("streams", None),
        ("streams", {}),
        ("streams", []),
        ("streams.gaps", _DELETE),
        ("streams.codes", 7),
        ("streams.codes.symbols", 5),
        ("streams.codes.symbols", 10**10),
        ("streams.codes.bits", 10**9),
        ("streams.codes.bits", -8),
        ("streams.codes.lanes", [1, 2, 3]),
        ("streams.codes.lanes", [-8, 8, 0, 0]),
        ("streams.codes.lanes", ["8", 0, 0, 0]),
        ("streams.codes.lanes", None),
        ("streams.codes.lengths", 999),
        ("streams.codes.lengths", None),
        ("streams.codes.buffer", 0),
        ("streams.gaps.symbols", 0),
        ("streams.counts.width", 0),
        ("streams.counts.width", 33),
        ("streams.counts.width", 2**70),
        ("streams.counts.symbols", 1),
        ("streams.counts.bits", 0),
    ]


def header_lies() -> list[tuple[str, object]]:
    """(header key, lie) pairs."""
    return [
        ("format", "other"),
        ("format", None),
        ("tensors", None),
        ("tensors", {}),
        ("tensors", [5]),
        ("tensors", [None]),
        ("metadata", None),
        ("metadata", []),
        ("metadata", "lenet"),
        ("metadata", 5),
        ("metadata", {"model": 5}),
        ("metadata", {"model": "no-such-model"}),
        ("metadata", {"model": "os:system"}),
        ("metadata", {"model": MODEL, "lowrank_structure": {"scheme": "zhang", "ranks": {"fc1": 600000}}}),
        ("metadata", {"model": MODEL, "lowrank_structure": {"scheme": "zhang", "ranks": {"fc1": "8"}}}),
        ("metadata", {"model": MODEL, "lowrank_structure": {"scheme": "nope", "ranks": {"fc1": 8}}}),
        ("metadata", {"model": MODEL, "lowrank_structure": [1, 2]}),
        ("metadata", {"model": MODEL, "lowrank_structure": {"scheme": "zhang", "ranks": {"nothing": 8}}}),
        ("metadata", {"model": MODEL, "fp32_parameter_bytes": -5}),
        ("metadata", {"model": MODEL, "fp32_parameter_bytes": "big"}),
        # bench and predict allocate example inputs from these
        ("metadata", {"model": MODEL, "input_shape": [100000, 100000, 100000]}),
        ("metadata", {"model": MODEL, "input_shape": "784"}),
        ("metadata", {"model": MODEL, "input_shape": [784.5]}),
        ("metadata", {"model": MODEL, "input_shape": [0]}),
        ("metadata", {"model": MODEL, "input_dtype": "complex128"}),
        ("metadata", {"model": MODEL, "input_names": [5]}),
        ("metadata", {"model": MODEL, "output": ["logits"]}),
    ]


def _nested(depth: int):
    value: object = 0
    for _ in range(depth):
        value = [value]
    return value


def crafted_files(data: bytes) -> dict[str, bytes]:
    """One file per header field and lie, from a valid file's bytes; names say what each lies about."""
    header, buffers = split(data)
    files = {}
    for path, lie in record_lies(header):
        files[f"record-{path}={_label(lie)}"] = frame(set_field(header, "fc1.weight", path, lie), buffers)
    other = _record(header, "fc2.bias")["data"]
    raw_lies = [("shape", [100, 3]), ("shape", [299]), ("dtype", "float16"), ("data", 999), ("data", other)]
    raw_lies += [("scale", 0.5), ("dtype", "int8")]  # a float32 record given a scale; its bytes read as int8
    for path, lie in raw_lies:
        files[f"raw-{path}={_label(lie)}"] = frame(set_field(header, "fc1.bias", path, lie), buffers)
    files["raw-shape-consistent-transposed"] = frame(set_field(header, "fc3.weight", "shape", [100, 10]), buffers)
    for key, lie in header_lies():
        files[f"header-{key}={_label(lie)}"] = frame({**header, key: lie}, buffers)
    metadata = header.get("metadata", {})
    for depth in (20, 40):  # within the nesting limit, and beyond it
        files[f"header-metadata-deep-{depth}"] = frame(
            {**header, "metadata": {**metadata, "deep": _nested(depth)}}, buffers
        )
    files["json-deep-5000"] = frame_json(b"[" * 5000 + b"]" * 5000)
    files["json-huge-integer"] = frame_json(b'{"buffers":[],"x":' + b"9" * 5000 + b"}")
    files["json-amplified-63MiB"] = frame_json(b'{"buffers":[],"padding":"' + b" " * (63 << 20) + b'"}')
    files["json-not-an-object"] = frame_json(b"[1, 2, 3]")
    files["json-invalid-utf8"] = frame_json(b'{"buffers":[], "x": "\xff\xfe"}')
    codebook = _record(header, "fc1.weight")["codebook"]
    odd = list(buffers)
    odd[codebook] = buffers[codebook][:-1]
    files["buffer-codebook-not-float32"] = frame(header, odd)
    files["buffer-unclaimed"] = frame(header, [*buffers, b"hidden data"])
    parsed, body_start = container.parse_header(data)
    lengths, checksum = parsed["buffers"], parsed["buffers_crc32"]
    body = data[body_start:]
    files["table-last-length+1"] = frame_table(header, [*lengths[:-1], lengths[-1] + 1], body)
    files["table-first-length+8"] = frame_table(header, [lengths[0] + 8, *lengths[1:]], body)
    files["table-one-buffer-fewer"] = frame_table(header, lengths[:-1], body)
    files["table-checksum-wrong"] = frame_table(header, lengths, body, checksum ^ 1)
    files["table-checksum-missing"] = frame_json(
        json.dumps({**header, "buffers": lengths}, sort_keys=True, separators=(",", ":")).encode(), body
    )
    table = legacy_table(lengths, body)
    padded = next(index for index, entry in enumerate(table) if entry["length"] % 8)
    end = table[padded]["offset"] + table[padded]["length"]
    files["table-nonzero-padding"] = frame_table(header, lengths, body[:end] + b"\x01" + body[end + 1 :])
    files["table-objects-in-2.7"] = frame_table(header, table, body)
    files["table-lengths-in-2.6"] = frame_table(header, lengths, body, minor=6)
    shifted = copy.deepcopy(table)
    shifted[1]["offset"] += 8
    files["table-2.6-offset-shifted"] = frame_table(header, shifted, body, minor=6)
    files["table-2.6-nonzero-padding"] = frame_table(header, table, body[:end] + b"\x01" + body[end + 1 :], minor=6)
    files["version-minor-9"] = frame_table(header, lengths, body, minor=9)
    return files


def header_bit_flips(data: bytes, limit: int | None = None, seed: int = 0) -> dict[str, bytes]:
    """Files whose header JSON has one bit flipped, re-deflated with the checksum recomputed
    (every bit, or `limit` of them at random)."""
    parsed, body_start = container.parse_header(data)
    text = json.dumps(parsed, sort_keys=True, separators=(",", ":")).encode()
    body = data[body_start:]
    positions = np.arange(8 * len(text))
    if limit is not None and limit < len(positions):
        positions = np.random.default_rng(seed).choice(positions, limit, replace=False)
    files = {}
    for bit in positions.tolist():
        flipped = bytearray(text)
        flipped[bit // 8] ^= 1 << (bit % 8)
        files[f"header-bit-{bit}"] = frame_json(bytes(flipped), body)
    return files


def body_bit_flips(data: bytes, count: int, seed: int = 0) -> dict[str, bytes]:
    """Files with one bit of one buffer flipped and the buffer checksums recomputed."""
    header, buffers = split(data)
    generator = np.random.default_rng(seed)
    sizes = np.array([len(buffer) for buffer in buffers])
    files = {}
    for _ in range(count):
        index = int(generator.choice(len(buffers), p=sizes / sizes.sum()))
        bit = int(generator.integers(8 * sizes[index]))
        changed = list(buffers)
        flipped = bytearray(buffers[index])
        flipped[bit // 8] ^= 1 << (bit % 8)
        changed[index] = bytes(flipped)
        files[f"body-buffer-{index}-bit-{bit}"] = frame(header, changed)
    return files


def _label(value) -> str:
    if value is _DELETE:
        return "deleted"
    text = json.dumps(value)
    return text if len(text) <= 24 else f"{text[:12]}...({len(text)})"


def decode_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Every in-memory reading step: framing, the schema and the codec."""
    from deepshrink.encode.codec import check, decode_state_dict

    parsed = container.from_bytes(data)
    return decode_state_dict(parsed.header, parsed.buffers, check(parsed.header, parsed.buffers))


def load_or_refuse(data: bytes, directory: Path, model: str = MODEL) -> str:
    """Write `data` and load it as the runtime does into registered `model`: "refused" (one of
    our errors) or "loaded" (its sparse runtime outputs equal the decoded dense model's).
    Anything else raises."""
    from deepshrink.compressed import load_compressed
    from deepshrink.errors import DeepshrinkError
    from deepshrink.runtime.load import load_runtime

    path = directory / "case.dcz"
    path.write_bytes(data)
    try:
        runtime = load_runtime(path, model, mode="sparse")
        dense, _ = load_compressed(path, model)
    except DeepshrinkError:
        return "refused"
    inputs = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = dense.eval()(inputs)
        if not torch.isfinite(expected).all():
            # A flipped bit made a raw tensor (a float16 bias) infinite: the file says so, and
            # the sparse product, which skips the zeros that dense multiplies by infinity, need
            # not agree where the values are not numbers.
            return "loaded"
        # A flipped exponent bit can make a codebook value 1e37: the two products sum such terms
        # in different orders, so their rounding is relative to the largest output, not to each.
        scale = max(1.0, float(expected.abs().max()))
        torch.testing.assert_close(runtime(inputs), expected, rtol=1e-4, atol=1e-4 * scale)
    return "loaded"


def fuzz_strategy():
    """Hypothesis strategy of (record, field path, JSON value): any value in any field of any record."""
    from hypothesis import strategies as st

    values = st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=8),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
        max_leaves=8,
    )
    fields = sorted(
        {path for path, _ in record_lies({"tensors": [{"name": "fc1.weight", "entries": 0, "nonzeros": 0}]})}
    )
    return st.tuples(
        st.sampled_from(["fc1.weight", "fc2.weight", "fc3.weight", "fc1.bias"]), st.sampled_from(fields), values
    )


def fuzz_case(data: bytes, case: tuple[str, str, object], directory: Path) -> str:
    """The fuzz target: set field `case[1]` of record `case[0]` to `case[2]`, recompute the
    checksums, load. "skipped" when the record has no such field (a raw tensor has no streams)."""
    header, buffers = split(data)
    record, field, value = case
    try:
        lied = set_field(header, record, field, value)
    except (KeyError, TypeError):
        return "skipped"
    return load_or_refuse(frame(lied, buffers), directory)


# ---------------------------------------------------------------------------------------------
# The runner: every reader on every file, under a memory limit.

READERS = ("read_state_dict", "load_compressed", "load_runtime", "inspect", "decode", "predict", "bench")


def _outputs_match(path: Path) -> bool:
    """The runtime model (sparse) computes what the decoded dense model computes."""
    from deepshrink.compressed import load_compressed
    from deepshrink.runtime.load import load_runtime

    dense, _ = load_compressed(path, MODEL)
    runtime = load_runtime(path, MODEL, mode="sparse")
    inputs = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = dense.eval()(inputs).double()
        got = runtime(inputs).double()
    return bool(torch.allclose(got, expected, rtol=1e-4, atol=1e-4))


def run_reader(reader: str, path: Path, scratch: Path, data_dir: Path | None = None) -> str:
    """The outcome of one reader on one file: "ok", "ok-outputs-match", "error-N" (a clean error
    with exit code N), or "BAD: ..." (anything else: a foreign exception, a traceback, a wrong result)."""
    from deepshrink import cli
    from deepshrink.compressed import inspect_header, load_compressed, read_state_dict
    from deepshrink.errors import DeepshrinkError
    from deepshrink.runtime.load import load_runtime

    library = {
        "read_state_dict": lambda: read_state_dict(path),
        "load_compressed": lambda: load_compressed(path, MODEL),
        "load_runtime": lambda: load_runtime(path, MODEL, mode="sparse"),
        "inspect": lambda: inspect_header(path, header_only=False),
    }
    if reader in library:
        try:
            library[reader]()
        except DeepshrinkError as error:
            return f"error-{error.exit_code}"
        except BaseException as error:  # noqa: BLE001 - what the test is looking for
            return f"BAD: {type(error).__name__}: {str(error)[:200]}"
        if reader == "load_runtime":
            return "ok-outputs-match" if _outputs_match(path) else "BAD: runtime outputs differ from the decoded model"
        return "ok"
    arguments = {
        "inspect": ["inspect", str(path)],
        "decode": ["decode", str(path), "--out", str(scratch / "decoded.safetensors")],
        "predict": ["predict", str(path), "--model", MODEL, "--mode", "sparse", "--batch-size", "1000"],
        "bench": ["bench", str(path), "--model", MODEL, "--mode", "sparse", "--batch", "1", "--repeats", "1"]
        + ["--input-shape", "1", "28", "28"],
    }[reader.removeprefix("cli-")]
    if reader.removeprefix("cli-") == "predict" and data_dir is not None:
        arguments += ["--data-dir", str(data_dir)]
    errors, output = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(output):
            code = cli.main(["--quiet", *arguments])
    except BaseException as error:  # noqa: BLE001
        return f"BAD: {type(error).__name__} escaped the CLI: {str(error)[:200]}"
    message = errors.getvalue().strip()
    if code == 0:
        return "ok"
    if code not in CLEAN_EXIT_CODES or "Traceback" in message or "\n" in message:
        return f"BAD: exit {code}: {message[:300]}"
    return f"error-{code}"


def main(directory: str, readers: str, data_dir: str | None = None) -> int:
    """Run `readers` (comma-separated; "cli-*" names run the command) on every *.dcz in
    `directory` under MEMORY_LIMIT, printing {"file", "reader", "outcome"} lines as it goes.
    `predict` reads the default data set, or the one in `data_dir`."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    scratch = Path(directory) / "scratch"
    scratch.mkdir(exist_ok=True)
    for path in sorted(Path(directory).glob("*.dcz")):
        for reader in readers.split(","):
            print(json.dumps({"file": path.name, "reader": reader, "started": True}), flush=True)
            outcome = run_reader(reader, path, scratch, data_dir and Path(data_dir))
            print(json.dumps({"file": path.name, "reader": reader, "outcome": outcome}), flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_kib": peak}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
