"""The tensors that are not weight-shared: byte planes under zstd, bit-exact, never larger than
raw, and with a file from a stranger never able to make a frame decode to more than its record."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch
import zstandard
from safetensors.torch import save as safetensors_bytes
from synthetic import tone_network, tone_signals, trained_tone_network
from torch import nn

import deepshrink
from deepshrink.encode import container, lossless
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


def test_version_2_0_files_still_read(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Linear(8, 4))
    loaded = container.read(deepshrink.save_compressed(model, tmp_path / "m.dcz", model_name="x"))
    header = {key: value for key, value in loaded.header.items() if key != "buffers"}
    buffers = list(loaded.buffers)
    for record in header["tensors"]:  # what a 2.0 writer wrote: every tensor raw
        record["encoding"] = "raw"
        buffers[record["data"]] = model.state_dict()[record["name"]].detach().numpy().tobytes()
    monkeypatch.setattr(container, "MINOR_VERSION", 0)
    # and its header deflated without the preset dictionary (which 2.3 added)
    monkeypatch.setattr(container, "encode_header", plain_deflated_header)
    old = tmp_path / "old.dcz"
    old.write_bytes(container.to_bytes(header, buffers))
    monkeypatch.undo()
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
