"""Hostile .dcz files (tests/hostile.py): every reader refuses them cleanly, or loads them right.

The files lie behind recomputed checksums, so what stops them is the validation at open
(encode/schema.py), the model check and the runtime's own checks. Expected outcome of every
case: one of our errors, or a load whose outputs equal the decoded dense model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import hostile
import pytest
from conftest import write_dataset
from hypothesis import HealthCheck, given, settings

from deepshrink.compressed import read_state_dict, save_compressed
from deepshrink.errors import DeepshrinkError, FormatError

RUNNER_TIMEOUT_SECONDS = 300


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Path:
    return save_compressed(
        hostile.small_model(), tmp_path_factory.mktemp("hostile") / "valid.dcz", model_name=hostile.MODEL
    )


@pytest.fixture(scope="module")
def reference(valid):
    return read_state_dict(valid)[0]


def test_every_truncation_is_a_format_error(valid):
    data = valid.read_bytes()
    for end in range(len(data)):
        with pytest.raises(FormatError):
            hostile.decode_bytes(data[:end])


def test_every_header_bit_flip_behind_a_valid_checksum(valid, reference, tmp_path):
    """Each bit of the header's JSON flipped, the checksum recomputed: refused, or decoded to
    tensors that load only where they fit the model and then compute like the dense model."""
    outcomes = {"refused": 0, "decoded": 0}
    for data in hostile.header_bit_flips(valid.read_bytes()).values():
        try:
            state = hostile.decode_bytes(data)
        except DeepshrinkError:
            outcomes["refused"] += 1
            continue
        outcomes["decoded"] += 1
        if state.keys() == reference.keys() and all(state[key].shape == reference[key].shape for key in state):
            assert hostile.load_or_refuse(data, tmp_path) in ("refused", "loaded")
    # Most flips break JSON or a field; some only touch free text (metadata, a name's letter).
    assert outcomes["refused"] > 0.5 * sum(outcomes.values()), outcomes


def test_body_bit_flips_behind_valid_checksums(valid, tmp_path):
    """A sample of single bit flips in the buffers, CRCs recomputed: a flipped code or gap either
    fails decoding, or gives a different but well-formed model that the runtime computes exactly."""
    outcomes = []
    for data in hostile.body_bit_flips(valid.read_bytes(), 150).values():
        outcomes.append(hostile.load_or_refuse(data, tmp_path))
    assert "refused" in outcomes and "loaded" in outcomes


def test_crafted_files_through_every_reader_in_a_memory_limited_process(valid, tmp_path):
    """One file per header field and lie, each through the library's readers and the CLI's
    inspect, decode, predict --mode sparse and bench, in a process limited to 2 GiB of address
    space and a timeout: no crash, no foreign exception, no traceback, no huge allocation."""
    files = hostile.crafted_files(valid.read_bytes())
    for name, data in files.items():
        (tmp_path / f"{name.replace('/', '_')}.dcz").write_bytes(data)
    (tmp_path / "valid.dcz").write_bytes(valid.read_bytes())
    readers = ",".join([*hostile.READERS[:4], *(f"cli-{name}" for name in ("inspect", "decode", "predict", "bench"))])
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    # predict reads a small data set of the model's input shape: the full one costs a second a file.
    data_dir = write_dataset(tmp_path / "data", train=5100, test=100)
    finished = subprocess.run(
        [sys.executable, str(Path(hostile.__file__)), str(tmp_path), readers, str(data_dir)],
        capture_output=True,
        text=True,
        timeout=RUNNER_TIMEOUT_SECONDS,
        env=environment,
        check=False,
    )
    lines = [json.loads(line) for line in finished.stdout.splitlines() if line.startswith("{")]
    assert finished.returncode == 0, (
        f"the runner died (exit {finished.returncode}) at {lines[-1:]}: {finished.stderr[-2000:]}"
    )
    outcomes = {(line["file"], line["reader"]): line["outcome"] for line in lines if "outcome" in line}
    assert len(outcomes) == (len(files) + 1) * len(readers.split(","))
    bad = {key: outcome for key, outcome in outcomes.items() if outcome.startswith("BAD")}
    assert not bad, bad
    # The untouched file loads and runs right everywhere; so do the lies that change nothing a
    # loader relies on (free metadata, a newer minor version). Every other lie is refused by
    # the loaders that build the model.
    harmless = {
        "valid.dcz",
        "version-minor-9.dcz",
        "header-metadata=null.dcz",
        'header-metadata={"model": "n...(26).dcz',
        'header-metadata={"model": "os:system"}.dcz',
        "header-metadata-deep-20.dcz",
    }
    for (file, reader), outcome in outcomes.items():
        if reader not in ("load_compressed", "load_runtime", "cli-predict", "cli-bench"):
            continue
        if file in harmless:
            assert outcome.startswith("ok"), (file, reader, outcome)
        else:
            assert outcome.startswith("error-"), (file, reader, outcome)


# Each coder, layout and form of the other tensors, on the paper's two networks: the fixture's
# file above is one of them (Huffman, CSR, float32).
VARIANTS = [
    ("lenet-300-100", "ans", "csr", "int8"),
    ("lenet-300-100", "fixed", "csc", "float16"),
    ("lenet-5", "ans", "dense", "lossless"),
    ("lenet-5", "huffman", "csc", "int8"),
]


@pytest.mark.parametrize("variant", VARIANTS, ids="-".join)
def test_truncations_and_bit_flips_of_every_coder_and_form_are_refused_or_load_right(variant, tmp_path):
    model_name, coder, layout, unshared = variant
    # Under ans, three quarters of the largest layer's rows empty: its row counts are rANS-coded,
    # and the next layer's gaps count the used columns.
    model = hostile.small_model(model_name, sparsity=0.9, bits=4, dead_rows=0.75 if coder == "ans" else 0.0)
    options = {"coder": coder, "layout": layout, "unshared": unshared}
    data = save_compressed(model, tmp_path / "valid.dcz", model_name=model_name, **options).read_bytes()
    if coder == "ans" and layout != "dense":
        records = hostile.split(data)[0]["tensors"]
        assert any("context" in record.get("streams", {}).get("counts", {}) for record in records)
        assert any("used" in record.get("streams", {}) for record in records)
    for end in range(0, len(data), max(1, len(data) // 400)):
        with pytest.raises(FormatError):
            hostile.decode_bytes(data[:end])
    outcomes = [
        hostile.load_or_refuse(case, tmp_path, model_name) for case in hostile.body_bit_flips(data, 60).values()
    ]
    assert set(outcomes) <= {"refused", "loaded"} and "loaded" in outcomes
    header_flips = hostile.header_bit_flips(data, limit=150).values()
    assert {hostile.load_or_refuse(case, tmp_path, model_name) for case in header_flips} <= {"refused", "loaded"}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=hostile.fuzz_strategy())
def test_fuzzed_fields_are_refused_or_loaded_right(valid, tmp_path, case):
    """The fuzz target for a bounded time (benchmarks/hostile_files.py runs it longer)."""
    assert hostile.fuzz_case(valid.read_bytes(), case, tmp_path) in ("refused", "loaded", "skipped")


def test_a_small_file_cannot_declare_a_huge_tensor(valid, tmp_path):
    """The issue's case: 1 x 2^31 declared in a few KB. Refused by the decoded-size limit
    before any allocation, and readable when the user raises the limit for a trusted file."""
    header, buffers = hostile.split(valid.read_bytes())
    path = tmp_path / "huge.dcz"
    path.write_bytes(hostile.frame(hostile.set_field(header, "fc1.weight", "shape", [1, 2**31]), buffers))
    with pytest.raises(FormatError, match="decode to more than"):
        read_state_dict(path)
    small = tmp_path / "small.dcz"
    small.write_bytes(valid.read_bytes())
    with pytest.raises(FormatError, match="max_decoded_bytes"):
        read_state_dict(small, max_decoded_bytes=1000)
    assert read_state_dict(small, max_decoded_bytes=10**9)[0].keys() == read_state_dict(valid)[0].keys()
