"""Tied weights (a language model's output layer reading its embedding's matrix): compressed as
one tensor, every holder computing with the same mask and codebook, stored once in the file (a
"same" record, format 2.5), and loaded back tied; the rewrites of one layer alone (dead units,
BatchNorm folding, low-rank factorization) leave tied layers as they are; a tie to a tensor we
do not compress is refused with a fix that works."""

from __future__ import annotations

import hostile
import numpy as np
import pytest
import torch
from torch import nn

import deepshrink
from deepshrink.compressed import open_compressed, read_state_dict
from deepshrink.data import make_loader
from deepshrink.encode import container
from deepshrink.errors import FormatError, UnsupportedLayerError
from deepshrink.layers import compressible_weights, plain_copy, select_weights, tied_modules, tied_weights
from deepshrink.train import TrainConfig, evaluate, fit

VOCABULARY = 30


class TiedLanguageModel(nn.Module):
    """Embedding -> Linear -> mean -> output layer that reads the embedding's matrix."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCABULARY, width)
        self.mix = nn.Linear(width, width)
        self.out = nn.Linear(width, VOCABULARY, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        return self.out(torch.relu(self.mix(self.embed(tokens).mean(1))))


def untied(model: TiedLanguageModel) -> TiedLanguageModel:
    """The same model with its output layer given its own copy of the embedding."""
    model.out.weight = nn.Parameter(model.embed.weight.detach().clone())
    return model


def token_data(examples: int, seed: int):
    """Sequences of 7 tokens in which one token appears three times; the target is that token.
    The mean of the embeddings points at it, and the tied output layer scores it by the same
    vectors: a task tying helps."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, VOCABULARY, examples)
    tokens = rng.integers(0, VOCABULARY, (examples, 7))
    tokens[:, :3] = targets[:, None]
    order = rng.permuted(np.tile(np.arange(7), (examples, 1)), axis=1)
    return np.take_along_axis(tokens, order, axis=1), targets


@pytest.fixture(scope="module")
def trained():
    inputs, targets = token_data(3000, 0)
    test_inputs, test_targets = token_data(1000, 1)
    data = deepshrink.load_arrays({"x": inputs, "y": targets, "x_test": test_inputs, "y_test": test_targets})
    torch.manual_seed(0)
    model = TiedLanguageModel()
    fit(model, make_loader(data.train, 64, True), TrainConfig(epochs=8, learning_rate=0.1), progress=False)
    return model, data


RECIPE = {"prune": {"sparsity": {"*": 0.6}, "rounds": 2, "retrain_epochs": 2}, "quantize": {"bits": {"*": 4}}}


def test_a_tied_weight_is_one_weight_answering_to_both_names():
    model = TiedLanguageModel()
    weights = compressible_weights(model)
    assert list(weights) == ["embed", "mix"]
    assert weights["embed"].alias_keys == ["out.weight"]
    assert list(select_weights(model, ["out"])) == ["embed"]  # the output layer's name selects the tensor
    assert tied_modules(model) == {"embed", "out"}
    assert tied_weights(model) == {"embed": ["embed.weight", "out.weight"]}
    from deepshrink.prune.statistics import layer_statistics

    rows = {row.name: row for row in layer_statistics(model, torch.zeros(4, 7, dtype=torch.long))}
    assert rows["embed"].multiply_accumulates == VOCABULARY * 16  # the output layer's product; lookups are free


def test_tied_weights_compress_as_one_tensor_stored_once_and_load_back_tied(trained, tmp_path):
    model, data = trained
    test = make_loader(data.test, 500, False)
    reference = evaluate(model, test).metric
    result = deepshrink.run(model, RECIPE, data, run_dir=tmp_path / "tied", progress=False)
    assert model.out.weight is model.embed.weight  # the caller's model is left as it was
    # The stage checkpoints restore tied (masks and codebooks onto both holders): a run that
    # encodes another way resumes from them, and its file decodes to the same weights.
    recoded = {**RECIPE, "encode": {"coder": "ans"}}
    again = deepshrink.run(model, recoded, data, run_dir=tmp_path / "tied", progress=False)
    assert [stage.cached for stage in again.stages] == [True, True, False]
    state, _ = read_state_dict(again.path)
    assert state["out.weight"] is state["embed.weight"]
    assert all(torch.equal(tensor, read_state_dict(result.path)[0][key]) for key, tensor in state.items())

    # The file holds the matrix once: the output layer's record says it is the embedding's.
    loaded, checked = open_compressed(result.path)
    records = {record["name"]: record for record in checked.records}
    assert records["out.weight"] == {
        "name": "out.weight",
        "shape": [VOCABULARY, 16],
        "dtype": "float32",
        "encoding": "same",
        "as": "embed.weight",
    }
    assert records["embed.weight"]["encoding"] == "shared"
    assert container.PREAMBLE.unpack_from(result.path.read_bytes())[2] == container.MINOR_VERSION

    # Loaded into the model it was made from, the two are one Parameter again: pruned 60%
    # exactly, at most 2^4 values (code 0 the exact zero), and as good as the reference to a bound.
    decoded, _ = deepshrink.load_compressed(result.path, TiedLanguageModel())
    assert decoded.out.weight is decoded.embed.weight
    weight = decoded.embed.weight
    assert int((weight == 0).sum()) == round(0.6 * weight.numel())
    assert len(torch.unique(weight)) <= 2**4
    assert result.compressed_metric == evaluate(decoded, test).metric
    assert result.compressed_metric >= reference - 0.05
    assert result.parameter_bytes == 4 * sum(parameter.numel() for parameter in TiedLanguageModel().parameters())

    # An untied copy of the model reads the same file: each copy gets the same values.
    into_untied, _ = deepshrink.load_compressed(result.path, untied(TiedLanguageModel()))
    assert into_untied.out.weight is not into_untied.embed.weight
    assert torch.equal(into_untied.out.weight, weight) and torch.equal(into_untied.embed.weight, weight)
    state, _ = read_state_dict(result.path)
    assert state["out.weight"] is state["embed.weight"]

    # The runtime computes what the decoded model does (the output layer from the compressed form).
    runtime = deepshrink.load_runtime(result.path, TiedLanguageModel(), mode="sparse", input_shape=(7,))
    inputs = data.test.tensors[0][:64]
    with torch.no_grad():
        torch.testing.assert_close(runtime(inputs), decoded.eval()(inputs), rtol=1e-5, atol=1e-5)


def test_the_tie_holds_while_every_stage_retrains(trained, tmp_path):
    """Masks and codebook are one instance on both holders; the Parameter trains once."""
    from deepshrink.prune.module import pruning_mask_of
    from deepshrink.quantize.shared import sharing_of
    from deepshrink.stages import PruneSettings, QuantizeSettings, StageContext, run_stage
    from deepshrink.stages.base import Loaders

    model, data = trained
    model = plain_copy(model)
    context = StageContext(loaders=Loaders.from_splits(data), progress=False)
    run_stage(model, PruneSettings(sparsity={"*": 0.6}, rounds=2, retrain_epochs=1), context)
    embed, out = model.embed.parametrizations.weight, model.out.parametrizations.weight
    assert embed.original is out.original and pruning_mask_of(compressible_weights(model)["embed"]) is out[0]
    assert torch.equal(model.out.weight, model.embed.weight) and int((model.embed.weight == 0).sum()) == 288
    copied = plain_copy(model)  # the copy without parametrizations is tied too
    assert copied.out.weight is copied.embed.weight and torch.equal(copied.out.weight, model.out.weight)
    run_stage(model, QuantizeSettings(bits={"*": 3}, finetune_epochs=1), context)
    sharing = sharing_of(compressible_weights(model)["embed"])
    assert sharing is model.out.parametrizations.weight[0]
    assert torch.equal(model.out.weight, model.embed.weight) and len(torch.unique(model.embed.weight)) <= 8


def test_the_file_is_smaller_than_the_untied_models_by_about_the_matrix(trained, tmp_path):
    model, data = trained
    tied = deepshrink.run(model, RECIPE, data, run_dir=tmp_path / "tied", progress=False)
    apart = deepshrink.run(untied(plain_copy(model)), RECIPE, data, run_dir=tmp_path / "apart", progress=False)
    embed_bytes = {row["name"]: row["bytes"] for row in tied.report["layers"]}["embed.weight"]
    assert apart.file_bytes - tied.file_bytes >= 0.8 * embed_bytes


def test_layer_rewrites_leave_tied_layers_alone():
    from deepshrink.batchnorm import foldable_pairs
    from deepshrink.lowrank import layer_spectra
    from deepshrink.prune.dead_units import clear_dead_units
    from deepshrink.prune.masks import sparsity_mask
    from deepshrink.prune.module import apply_masks

    class TiedPair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(12, 12)
            self.second = nn.Linear(12, 12)
            self.second.weight = self.first.weight
            self.head = nn.Linear(12, 3)
            self.norm = nn.BatchNorm1d(3)

        def forward(self, inputs):
            return self.norm(self.head(torch.relu(self.second(torch.relu(self.first(inputs))))))

    torch.manual_seed(0)
    model = TiedPair().eval()
    # Rows and columns emptied: an untied pair would have units cleared and constants folded.
    mask = torch.ones(12, 12, dtype=torch.bool)
    mask[:4] = False
    mask[:, 8:] = False
    apply_masks(model, {"first": mask, "head": sparsity_mask(model.head.weight, 0.5)})
    inputs = torch.randn(20, 12)
    before = model(inputs)
    assert clear_dead_units(model) == []
    assert torch.equal(model(inputs), before)
    assert foldable_pairs(model) == [("head", "norm")]
    assert set(layer_spectra(model, inputs)) == {"head"}


def test_foldable_pairs_keep_untied_layers():
    from deepshrink.batchnorm import foldable_pairs

    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.BatchNorm1d(4))
    assert foldable_pairs(model) == [("0", "1"), ("2", "3")]
    model[2].weight = model[0].weight
    assert foldable_pairs(model) == []


def test_variational_dropout_draws_output_noise_on_every_holder():
    from deepshrink.prune.variational import finish_variational, start_variational

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    model[2].weight = model[0].weight
    state = start_variational(model)
    assert list(state.weights) == ["0"] and len(state.hooks) == 2
    model.train()
    torch.manual_seed(0)
    model(torch.randn(5, 8)).sum().backward()
    assert model[0].parametrizations.weight.original.grad.abs().sum() > 0
    masks = finish_variational(state)
    assert torch.equal(model[0].weight, model[2].weight)
    assert torch.equal(model[0].weight != 0, masks["0"] & (model[0].parametrizations.weight.original != 0))


class Scaled(nn.Module):
    """A custom layer that reads another layer's matrix under its own name (`matrix`, not a
    `weight`): a holder we do not compress."""

    def __init__(self, matrix: nn.Parameter) -> None:
        super().__init__()
        self.matrix = matrix

    def forward(self, inputs):
        return nn.functional.linear(inputs, self.matrix) * 0.5


def test_a_tie_to_a_tensor_we_do_not_compress_is_refused_with_a_fix_that_works(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU())
    model.append(Scaled(model[0].weight))
    recipe = {"prune": {"sparsity": {"*": 0.5}, "rounds": 1}, "quantize": {"bits": {"*": 4}}}
    with pytest.raises(UnsupportedLayerError, match=r"0\.weight is also 2\.matrix \(Scaled\.matrix\)") as caught:
        deepshrink.run(model, recipe, None, run_dir=tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists() and model[2].matrix is model[0].weight

    fix = str(caught.value).split("e.g. ", 1)[1].split(", or read", 1)[0]
    exec(fix, {"torch": torch, "model": model})  # noqa: S102 - the message's code, not user input
    assert model[2].matrix is not model[0].weight
    result = deepshrink.run(model, recipe, None, run_dir=tmp_path / "untied", progress=False)
    assert result.path.exists()


def test_same_records_that_lie_are_refused(trained, tmp_path):
    model, data = trained
    result = deepshrink.run(model, RECIPE, data, run_dir=tmp_path / "tied", progress=False)
    header, buffers = hostile.split(result.path.read_bytes())

    def lie(**changes):
        changed = {**header, "tensors": [dict(record) for record in header["tensors"]]}
        record = next(record for record in changed["tensors"] if record["name"] == "out.weight")
        for key, value in changes.items():
            if value is None:
                del record[key]
            else:
                record[key] = value
        path = tmp_path / "lie.dcz"
        path.write_bytes(hostile.frame(changed, buffers))
        return path

    cases = {
        "expected the name of an earlier record": [{"as": "nothing"}, {"as": "out.weight"}, {"as": None}, {"as": 3}],
        "differ from": [{"shape": [16, VOCABULARY]}, {"dtype": "float16"}],
    }
    for message, lies in cases.items():
        for changes in lies:
            path = lie(**changes)
            for reader in (read_state_dict, lambda path: deepshrink.load_compressed(path, TiedLanguageModel())):
                with pytest.raises(FormatError, match=message):
                    reader(path)
    # A record that names one after it is refused too: the reader fills tensors in order.
    reordered = {**header, "tensors": sorted(header["tensors"], key=lambda record: record["name"] != "out.weight")}
    path = tmp_path / "later.dcz"
    path.write_bytes(hostile.frame(reordered, buffers))
    with pytest.raises(FormatError, match="earlier record"):
        read_state_dict(path)


def test_a_tied_model_saves_as_a_checkpoint_and_loads_back_tied(tmp_path):
    from deepshrink.checkpoint import load_checkpoint, load_state_into, save_checkpoint

    model = TiedLanguageModel()
    save_checkpoint(tmp_path / "tied.safetensors", model, model_name="tied")
    loaded = load_state_into(TiedLanguageModel(), load_checkpoint(tmp_path / "tied.safetensors"), "tied")
    assert loaded.out.weight is loaded.embed.weight
    assert all(torch.equal(tensor, model.state_dict()[name]) for name, tensor in loaded.state_dict().items())


def test_the_runtime_keeps_a_tie_to_an_embedding_as_one_dense_tensor(tmp_path, monkeypatch):
    """In auto mode an output layer tied to an embedding runs on the embedding's dense tensor
    (the embedding needs it dense), not on a compressed copy beside it: it is not even timed."""
    from deepshrink.prune.masks import sparsity_mask
    from deepshrink.prune.module import apply_masks
    from deepshrink.quantize.shared import share_weights
    from deepshrink.runtime import load as runtime_load

    def wide():
        model = TiedLanguageModel(width=256)
        model.embed, model.out = nn.Embedding(2000, 256), nn.Linear(256, 2000, bias=False)
        model.out.weight = model.embed.weight
        return model

    torch.manual_seed(0)
    model = wide()
    apply_masks(model, {"embed": sparsity_mask(model.embed.weight, 0.9), "mix": sparsity_mask(model.mix.weight, 0.9)})
    share_weights(model, {"*": 4})
    path = deepshrink.save_compressed(model, tmp_path / "tied.dcz", model_name="tied")
    timed = []
    original = runtime_load.measure_linear
    monkeypatch.setattr(runtime_load, "measure_linear", lambda weight: timed.append(weight.shape) or original(weight))
    running = deepshrink.load_runtime(path, wide())
    assert (2000, 256) not in timed  # the tied output layer was not considered for its compressed form
    assert type(running.out) is nn.Linear and running.out.weight is running.embed.weight
    decoded, _ = deepshrink.load_compressed(path, wide())
    inputs = torch.randint(0, 2000, (4, 7))
    with torch.no_grad():
        torch.testing.assert_close(running(inputs), decoded.eval()(inputs), rtol=1e-5, atol=1e-5)
    forced = deepshrink.load_runtime(path, wide(), mode="sparse")  # asked for: compressed, for the memory
    assert type(forced.out).__name__ == "CompressedLinear"
