"""Checkpoints: safetensors round trips, atomic writes, and no unpickling of user files."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn

from deepshrink.checkpoint import load_checkpoint, load_model, load_state_into, save_checkpoint
from deepshrink.errors import CheckpointError, ConfigError
from deepshrink.loading import parameters_left_uninitialised
from deepshrink.models import build_model


def test_round_trip_keeps_tensors_name_and_metadata(tmp_path):
    model = build_model("lenet-5")
    path = save_checkpoint(tmp_path / "m.safetensors", model, model_name="lenet-5", metadata={"accuracy": 0.9})
    checkpoint = load_checkpoint(path)
    assert checkpoint.model_name == "lenet-5" and checkpoint.metadata == {"accuracy": 0.9}
    restored = load_state_into(build_model("lenet-5"), checkpoint, path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, restored.state_dict()[name]), name


def test_same_model_gives_the_same_bytes(tmp_path):
    model = build_model("lenet-300-100")
    first = save_checkpoint(tmp_path / "a.safetensors", model, model_name="lenet-300-100")
    second = save_checkpoint(tmp_path / "b.safetensors", model, model_name="lenet-300-100")
    assert first.read_bytes() == second.read_bytes()


def test_write_leaves_no_temporary_files(tmp_path):
    save_checkpoint(tmp_path / "m.safetensors", build_model("lenet-300-100"), model_name="lenet-300-100")
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", build_model("lenet-300-100"), model_name="lenet-300-100")
    before = path.read_bytes()
    with pytest.raises(TypeError):
        save_checkpoint(path, build_model("lenet-300-100"), model_name="x", metadata={"bad": object()})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_refuses_to_overwrite_an_input(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", build_model("lenet-300-100"), model_name="lenet-300-100")
    with pytest.raises(ConfigError, match="also an input"):
        save_checkpoint(path, build_model("lenet-300-100"), model_name="lenet-300-100", protect=(path,))


def test_plain_torch_state_dict_is_accepted(tmp_path):
    model = build_model("lenet-300-100")
    torch.save(model.state_dict(), tmp_path / "m.pt")
    checkpoint = load_checkpoint(tmp_path / "m.pt")
    assert torch.equal(checkpoint.state_dict["fc1.weight"], model.fc1.weight)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_objects_are_refused_not_executed(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as handle:
        pickle.dump({"weight": Payload()}, handle)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(tmp_path / "evil.pt")


def test_garbage_file_is_a_checkpoint_error(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_checkpoint(tmp_path / "junk.safetensors")


def test_mismatched_model_is_explained(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", build_model("lenet-300-100"), model_name="lenet-300-100")
    with pytest.raises(CheckpointError, match="does not fit model LeNet5"):
        load_state_into(build_model("lenet-5"), load_checkpoint(path), path)


def test_models_built_to_receive_a_file_skip_only_their_parameters_initialisation(tmp_path):
    """Parameters are loaded from the file next, so their initialisation is skipped; a buffer
    filled by nn.init (which a file may not hold) is still initialised, and the functions come
    back after the block, even when it raises."""
    originals = nn.init.normal_, nn.init.kaiming_uniform_
    parameter, buffer = nn.Parameter(torch.full((4, 4), 7.0)), torch.full((4, 4), 7.0)
    with parameters_left_uninitialised():
        nn.init.kaiming_uniform_(parameter)
        nn.init.normal_(buffer)
    assert torch.all(parameter == 7) and not torch.all(buffer == 7)
    with pytest.raises(KeyError), parameters_left_uninitialised():
        raise KeyError("inside")
    assert (nn.init.normal_, nn.init.kaiming_uniform_) == originals
    nn.init.kaiming_uniform_(parameter)
    assert not torch.all(parameter == 7)
    # And a checkpoint's model built that way holds exactly the saved tensors.
    model = build_model("lenet-300-100")
    path = save_checkpoint(tmp_path / "model.safetensors", model, model_name="lenet-300-100")
    loaded, _ = load_model(path)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in loaded.state_dict().items())
