"""The tensors that are not weight-shared: byte planes under zstd, bit-exact, never larger than
raw, and with a file from a stranger never able to make a frame decode to more than its record."""

from __future__ import annotations

import json
import zlib

import hostile
import numpy as np
import pytest
import torch
import zstandard
from safetensors.torch import save as safetensors_bytes
from synthetic import tone_network, tone_signals, trained_tone_network
from torch import nn

import deepshrink
from deepshrink.compressed import read_state_dict
from deepshrink.encode import container, lossless, schema
from deepshrink.errors import FormatError
from deepshrink.layers import plain_state_dict
from deepshrink.quantize.shared import share_weights
from deepshrink.recipe import parse_recipe


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int64, np.uint8, np.bool_])
def test_byte_planes_round_trip(dtype):
    values = (np.random.default_rng(0).normal(size=1001) * 50).astype(dtype)
    data = values.tobytes()
    assert lossless.from_planes(lossless.to_planes(data, values.itemsize), values.itemsize) == data
    packed = lossless.compress(data, values.itemsize)
    if packed is not None:
        assert len(packed) < len(data)
        assert lossless.decompress(packed, len(data), values.itemsize, "t") == data


def test_incompressible_bytes_stay_raw():
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert lossless.compress(noise, 1) is None


def test_a_frame_that_decodes_to_another_size_is_refused():
    data = np.zeros(1000, dtype=np.float32).tobytes()
    packed = lossless.compress(data, 4)
    with pytest.raises(FormatError, match="declares 4000 bytes; the record's shape needs 3999"):
        lossless.decompress(packed, 3999, 4, "bias")
    with pytest.raises(FormatError, match="declares 4000 bytes; the record's shape needs 4004"):
        lossless.decompress(packed, 4004, 4, "bias")
    # A frame claiming 16 GiB is refused from its header, before anything is allocated.
    huge = bytearray(zstandard.ZstdCompressor().compress(bytes(64)))
    with pytest.raises(FormatError, match="declares"):
        lossless.decompress(
            bytes(huge[:4]) + b"\xe4\x00" + (1 << 34).to_bytes(8, "little") + bytes(huge[6:]), 256, 4, "b"
        )
    with pytest.raises(FormatError, match="corrupt"):
        lossless.decompress(b"\x28\xb5\x2f\xfd" + bytes(20), 4000, 4, "bias")
    # A frame without a declared size that would inflate past the record stops at the record's size.
    stream = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1 << 20))
    with pytest.raises(FormatError):
        lossless.decompress(stream, 4000, 4, "bias")


def test_a_model_of_mostly_unshared_tensors_is_smaller_than_zstd_of_its_state_dict(tmp_path):
    signals, labels = tone_signals(1000, seed=0)
    model = trained_tone_network(signals, labels, epochs=2)
    share_weights(model, {"11": 5})  # only the last layer shared: most tensors are stored losslessly
    path = deepshrink.save_compressed(model, tmp_path / "m.dcz", model_name="tones")
    reference = deepshrink.remove_sharing(model)
    state = {name: tensor.contiguous() for name, tensor in reference.state_dict().items()}
    baseline = len(zstandard.ZstdCompressor(level=19).compress(safetensors_bytes(state)))
    assert path.stat().st_size < baseline
    encodings = {record["name"]: record["encoding"] for record in container.read_header(path)["tensors"]}
    assert encodings["3.weight"] == "zstd" and encodings["11.weight"] == "shared"
    decoded, _ = deepshrink.load_compressed(path, tone_network())
    for name, tensor in reference.state_dict().items():
        assert torch.equal(decoded.state_dict()[name], tensor), name


def plain_deflated_header(header: dict) -> bytes:
    """The stored header as format 2.0-2.2 wrote it: zlib without a preset dictionary."""
    encoded = zlib.compress(json.dumps(header, sort_keys=True, separators=(",", ":")).encode(), 9)
    return encoded + b"\0" * (-len(encoded) % container.ALIGNMENT)


def test_version_2_0_files_still_read(tmp_path):
    model = nn.Sequential(nn.Linear(8, 4))
    loaded = container.read(deepshrink.save_compressed(model, tmp_path / "m.dcz", model_name="x"))
    header = {key: value for key, value in loaded.header.items() if key != "buffers"}
    buffers = list(loaded.buffers)
    for record in header["tensors"]:  # what a 2.0 writer wrote: every tensor raw
        record["encoding"] = "raw"
        buffers[record["data"]] = model.state_dict()[record["name"]].detach().numpy().tobytes()
    # and its header deflated without the preset dictionary (which 2.3 added), its buffer table
    # of offsets and checksums (which 2.7 replaced)
    body = b"".join(buffer + b"\0" * (-len(buffer) % container.ALIGNMENT) for buffer in buffers)
    table = hostile.legacy_table([len(buffer) for buffer in buffers], body)
    old = tmp_path / "old.dcz"
    old.write_bytes(hostile.frame_json(json.dumps({**header, "buffers": table}).encode(), body, minor=0))
    assert old.read_bytes()[10:12] == b"\0\0" and not old.read_bytes()[container.PREAMBLE.size + 1] & 0x20
    decoded, _ = deepshrink.load_compressed(old, nn.Sequential(nn.Linear(8, 4)))
    assert torch.equal(decoded[0].weight, model[0].weight) and torch.equal(decoded[0].bias, model[0].bias)


def test_unshared_tensors_as_float16_halve_their_bytes_and_load_as_their_rounded_values(tmp_path):
    """`unshared: float16`: the shared layer stays bit-exact, every other float tensor comes back
    as exactly its float16 rounding, in float32, and the file is smaller; values float16 cannot
    hold are refused by name."""
    torch.manual_seed(0)
    model = tone_network().eval()
    share_weights(model, {"11": 4})
    plain = plain_state_dict(model)
    exact = deepshrink.save_compressed(model, tmp_path / "exact.dcz", model_name="tones")
    half = deepshrink.save_compressed(model, tmp_path / "half.dcz", model_name="tones", unshared="float16")
    assert half.stat().st_size < 0.7 * exact.stat().st_size
    loaded, _ = deepshrink.load_compressed(half, tone_network())
    for key, value in loaded.state_dict().items():
        assert value.dtype == plain[key].dtype, key
        if key == "11.weight" or not value.is_floating_point():
            assert torch.equal(value, plain[key]), key
        else:
            assert torch.equal(value, plain[key].half().float()), key
    model[0].bias.data[0] = 1e6
    with pytest.raises(deepshrink.ConfigError, match=r"tensor '0.bias' holds 1e\+06, beyond float16's range"):
        deepshrink.save_compressed(model, tmp_path / "bad.dcz", model_name="tones", unshared="float16")
    parsed = parse_recipe("quantize: {}\nencode: {unshared: float16}\n")
    assert parsed.encode.unshared == "float16" and parsed.to_dict()["encode"]["unshared"] == "float16"
    assert "unshared" not in parse_recipe("quantize: {}\n").to_dict()["encode"]  # the default is not recorded


def _int8_reference(values: torch.Tensor) -> torch.Tensor:
    """int8 levels as docs/FORMAT.md defines them, in float64 then rounded: scale = largest / 127,
    each value its nearest level, the product in float32 (an all-zero tensor: scale 1)."""
    scale = np.float32(float(values.abs().max()) / 127 or 1.0)
    levels = np.clip(np.round(values.double().numpy() / float(scale)), -127, 127)
    return torch.from_numpy(levels.astype(np.float32) * scale)


def test_unshared_parameters_as_int8_within_half_a_level_and_zeros_exact(tmp_path):
    """`unshared: int8`: the shared layer bit-exact; each other float parameter within half a
    level of its value and equal to the format's formula, its zeros exactly zero; BatchNorm's
    running statistics float16 (one scale would round a small variance to zero); smaller than
    float16; written as 2.4 (2.3 without an int8 record); the runtime computes like the decoded
    model."""
    torch.manual_seed(0)
    model = tone_network().eval()
    with torch.no_grad():
        model[0].bias[:3] = 0.0  # as cleared dead units leave them
        model[1].running_var.uniform_(0.001, 10.0)
    share_weights(model, {"11": 4})
    plain = plain_state_dict(model)
    half = deepshrink.save_compressed(model, tmp_path / "half.dcz", model_name="tones", unshared="float16")
    eight = deepshrink.save_compressed(model, tmp_path / "int8.dcz", model_name="tones", unshared="int8")
    assert eight.stat().st_size < half.stat().st_size
    assert half.read_bytes()[10:12] == eight.read_bytes()[10:12] == b"\x07\x00"  # every file since 2.7
    loaded, _ = deepshrink.load_compressed(eight, tone_network())
    parameters = {name for name, _ in model.named_parameters()} | {"11.weight"}
    for key, value in loaded.state_dict().items():
        assert value.dtype == plain[key].dtype, key
        if key == "11.weight" or not value.is_floating_point():
            assert torch.equal(value, plain[key]), key
        elif key in parameters or key.replace(".weight", ".parametrizations.weight.original") in parameters:
            level = float(plain[key].abs().max()) / 127
            assert float((value - plain[key]).abs().max()) <= level / 2 * (1 + 1e-6), key
            assert torch.equal(value, _int8_reference(plain[key])), key
            assert torch.equal(value == 0, _int8_reference(plain[key]) == 0), key
        else:
            assert torch.equal(value, plain[key].half().float()), key
    assert torch.equal(loaded[0].bias[:3], torch.zeros(3))
    assert bool((loaded[1].running_var > 0).all())
    inputs = torch.from_numpy(tone_signals(8, seed=1)[0])
    running = deepshrink.load_runtime(eight, tone_network())
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(running(inputs), loaded(inputs), rtol=1e-5, atol=1e-5)
    model[0].bias.data[0] = float("nan")
    with pytest.raises(deepshrink.ConfigError, match=r"tensor '0.bias' holds an infinite or NaN value"):
        deepshrink.save_compressed(model, tmp_path / "bad.dcz", model_name="tones", unshared="int8")
    parsed = parse_recipe("quantize: {}\nencode: {unshared: int8}\n")
    assert parsed.encode.unshared == "int8" and parsed.to_dict()["encode"]["unshared"] == "int8"


def test_int8_scales_at_the_edges_of_float32(tmp_path):
    """A tensor whose largest magnitude is float32's largest keeps every level finite; one of
    subnormal magnitudes still decodes to its nearest level; an int8 tensor of the model's own is
    stored as integers, without a scale, and comes back exactly."""
    model = nn.Sequential(nn.Linear(4, 2))
    largest = float(np.finfo(np.float32).max)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[largest, -largest, 1.0, 0.0], [1e38, -3e37, 0.5, 2.0]]))
        model[0].bias.copy_(torch.tensor([1e-44, -3e-45]))
    model.register_buffer("levels", torch.tensor([-128, 0, 127], dtype=torch.int8))
    path = deepshrink.save_compressed(model, tmp_path / "edges.dcz", model_name="x", unshared="int8")
    records = {record["name"]: record for record in container.read(path).header["tensors"]}
    assert "scale" not in records["levels"] and records["levels"]["dtype"] == "int8"
    state, _ = read_state_dict(path)
    assert bool(torch.isfinite(state["0.weight"]).all()) and float(state["0.weight"].max()) > 0.99 * largest
    assert torch.equal(state["levels"], model.levels)
    assert float(state["0.bias"][0]) == pytest.approx(1e-44, rel=0.2) and float(state["0.bias"][1]) <= 0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("scale", 0, "expected a positive number"),
        ("scale", -0.5, "expected a positive number"),
        ("scale", 1e-50, "expected a positive number"),  # zero as a float32
        ("scale", True, "expected a positive number"),
        ("scale", "0.5", "expected a positive number"),
        ("scale", 1e39, "expected a positive number"),  # past float32
        ("scale", 3e36, "expected a positive number"),  # 127 x scale past float32
        ("scale", 2.665e36, "expected a positive number"),  # 127 x scale within float32, 128 x past it
        ("scale", 10**400, "expected a positive number"),
        ("dtype", "float32", "a scale belongs to a raw or zstd record of dtype int8"),
        ("encoding", "shared", "a scale belongs to a raw or zstd record of dtype int8"),
    ],
)
def test_int8_records_that_lie_are_refused(tmp_path, field, value, message):
    model = nn.Sequential(nn.Linear(300, 100))
    path = deepshrink.save_compressed(model, tmp_path / "m.dcz", model_name="x", unshared="int8")
    loaded = container.read(path)
    header = {key: value for key, value in loaded.header.items() if key != "buffers"}
    record = next(record for record in header["tensors"] if record["name"] == "0.weight")
    assert record["dtype"] == "int8" and record["scale"] > 0
    record[field] = value
    lie = tmp_path / "lie.dcz"
    lie.write_bytes(container.to_bytes(header, list(loaded.buffers)))
    with pytest.raises(FormatError, match=message):
        read_state_dict(lie)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_int8_scales_that_are_not_numbers_in_json_are_refused(tmp_path, value):
    """NaN and infinity are not JSON, but Python's parser reads them: a hostile writer's text."""
    model = nn.Sequential(nn.Linear(300, 100))
    data = deepshrink.save_compressed(model, tmp_path / "m.dcz", model_name="x", unshared="int8").read_bytes()
    parsed, body_start = container.parse_header(data)
    for record in parsed["tensors"]:
        record["scale"] = 0.125
    text = json.dumps(parsed, sort_keys=True).replace('"scale": 0.125', f'"scale": {value}', 1)
    lie = tmp_path / "lie.dcz"
    lie.write_bytes(hostile.frame_json(text.encode(), data[body_start:]))
    with pytest.raises(FormatError, match="expected a positive number"):
        read_state_dict(lie)


def test_a_reader_without_int8_refuses_such_a_file_by_its_dtype(tmp_path, monkeypatch):
    """What a 2.3 reader (whose dtypes lack int8) does with a 2.4 file: a FormatError naming the
    dtype, before anything is decoded; a file without int8 records is still 2.3 and reads."""
    model = nn.Sequential(nn.Linear(30, 10))
    eight = deepshrink.save_compressed(model, tmp_path / "int8.dcz", model_name="x", unshared="int8")
    half = deepshrink.save_compressed(model, tmp_path / "half.dcz", model_name="x", unshared="float16")
    monkeypatch.setattr(schema, "ITEM_SIZES", {k: v for k, v in schema.ITEM_SIZES.items() if k != "int8"})
    with pytest.raises(FormatError, match="unknown dtype 'int8'"):
        read_state_dict(eight)
    assert read_state_dict(half)[0].keys() == {"0.weight", "0.bias"}
