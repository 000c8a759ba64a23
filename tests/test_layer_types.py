"""Every weight deepshrink compresses beyond Linear and Conv2d: recurrent (LSTM, GRU, RNN, every
layer and direction, and their cells), attention (MultiheadAttention's input projection, the
Linear layers of a TransformerEncoder), transposed and 3-D convolutions, EmbeddingBag, and the
own `weight` matrix of modules of other types (GPT-2's Conv1D, Bilinear). Each is pruned, shared,
written to a .dcz and read back bit-exactly; the compressed model's outputs match the decoded
dense model's, from load_compressed and from load_runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import deepshrink
from deepshrink.compressed import open_compressed
from deepshrink.errors import ConfigError, UnsupportedLayerError
from deepshrink.layers import compressible_weights, plain_state_dict, select_weights
from deepshrink.prune.masks import sparsity_mask
from deepshrink.prune.module import apply_masks
from deepshrink.prune.statistics import layer_statistics
from deepshrink.quantize.shared import distinct_values, share_weights


class Recurrent(nn.Module):
    """A bidirectional 2-layer LSTM, a GRU and an RNN in a row, with a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 12, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(24, 10, batch_first=True)
        self.rnn = nn.RNN(10, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, inputs):
        outputs, _ = self.lstm(inputs)
        outputs, _ = self.gru(outputs)
        outputs, _ = self.rnn(outputs)
        return self.head(outputs[:, -1])


class Attention(nn.Module):
    """A two-layer TransformerEncoder, and a MultiheadAttention whose keys have their own width
    (so q/k/v projections instead of one in_proj_weight)."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.cross = nn.MultiheadAttention(16, 2, kdim=12, vdim=12, batch_first=True)
        self.memory = nn.Linear(16, 12)
        self.head = nn.Linear(16, 3)

    def forward(self, inputs):
        encoded = self.encoder(inputs)
        memory = self.memory(encoded)
        attended, _ = self.cross(encoded, memory, memory)
        return self.head(attended.mean(dim=1))


class Convolutions(nn.Module):
    """Transposed 1-D and 2-D convolutions, a 3-D convolution and an EmbeddingBag."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(20, 8, mode="mean")
        self.up1 = nn.ConvTranspose1d(1, 4, 3, stride=2)
        self.up2 = nn.ConvTranspose2d(4, 3, 3, stride=2)
        self.volume = nn.Conv3d(1, 2, 3)
        self.head = nn.Linear(8 + 3 + 2, 3)

    def forward(self, tokens):
        bag = self.bag(tokens)  # (batch, 8)
        up = self.up1(bag.unsqueeze(1))  # (batch, 4, 17)
        square = self.up2(up.unsqueeze(-1).expand(-1, -1, -1, 4))  # (batch, 3, 35, 9)
        volume = self.volume(square.unsqueeze(1))  # (batch, 2, 1, 33, 7)
        pooled = torch.cat([bag, square.mean(dim=(2, 3)), volume.mean(dim=(2, 3, 4))], dim=1)
        return self.head(pooled)


class GPT2Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D as written there: a Linear whose weight is stored transposed
    ([inputs, outputs]) and applied by addmm."""

    def __init__(self, outputs: int, inputs: int) -> None:
        super().__init__()
        self.outputs = outputs
        self.weight = nn.Parameter(torch.randn(inputs, outputs) * 0.3)
        self.bias = nn.Parameter(torch.zeros(outputs))

    def forward(self, values):
        shape = values.shape[:-1] + (self.outputs,)
        return torch.addmm(self.bias, values.reshape(-1, values.shape[-1]), self.weight).reshape(shape)


class CustomLayers(nn.Module):
    """Layers of types deepshrink does not know: a GPT-2 Conv1D, a Bilinear, an LSTMCell run
    for three steps, and a LayerNorm and a learned offset (one-dimensional: not compressed)."""

    def __init__(self) -> None:
        super().__init__()
        self.project = GPT2Conv1D(12, 6)
        self.norm = nn.LayerNorm(12)
        self.offset = nn.Parameter(torch.zeros(12))
        self.pair = nn.Bilinear(12, 6, 8)
        self.cell = nn.LSTMCell(8, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, inputs):
        projected = torch.relu(self.norm(self.project(inputs)) + self.offset)
        paired = torch.tanh(self.pair(projected, inputs))
        state = None
        for _ in range(3):
            state = self.cell(paired, state)
        return self.head(state[0])


def example(model: nn.Module, batch: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if isinstance(model, CustomLayers):
        return torch.randn(batch, 6, generator=generator)
    if isinstance(model, Recurrent):
        return torch.randn(batch, 7, 6, generator=generator)
    if isinstance(model, Attention):
        return torch.randn(batch, 9, 16, generator=generator)
    return torch.randint(0, 20, (batch, 4), generator=generator)


EXPECTED_WEIGHTS = {
    Recurrent: [
        *(
            f"lstm.weight_{kind}_l{layer}{direction}"
            for layer in (0, 1)
            for direction in ("", "_reverse")
            for kind in ("ih", "hh")
        ),
        "gru.weight_ih_l0",
        "gru.weight_hh_l0",
        "rnn.weight_ih_l0",
        "rnn.weight_hh_l0",
        "head",
    ],
    Attention: [
        "encoder.layers.0.self_attn.in_proj_weight",
        "encoder.layers.0.self_attn.out_proj",
        "encoder.layers.0.linear1",
        "encoder.layers.0.linear2",
        "encoder.layers.1.self_attn.in_proj_weight",
        "encoder.layers.1.self_attn.out_proj",
        "encoder.layers.1.linear1",
        "encoder.layers.1.linear2",
        "cross.q_proj_weight",
        "cross.k_proj_weight",
        "cross.v_proj_weight",
        "cross.out_proj",
        "memory",
        "head",
    ],
    Convolutions: ["bag", "up1", "up2", "volume", "head"],
    CustomLayers: ["project", "pair", "cell.weight_ih", "cell.weight_hh", "head"],
}


def compressed(model_type, sparsity=0.7, bits=4):
    torch.manual_seed(0)
    model = model_type().eval()
    weights = compressible_weights(model)
    apply_masks(model, {name: sparsity_mask(weight.value, sparsity) for name, weight in weights.items()})
    share_weights(model, {"*": bits})
    return model


@pytest.mark.parametrize("model_type", list(EXPECTED_WEIGHTS), ids=lambda kind: kind.__name__)
def test_every_weight_is_found_and_named(model_type):
    assert sorted(compressible_weights(model_type())) == sorted(EXPECTED_WEIGHTS[model_type])


@pytest.mark.parametrize("model_type", list(EXPECTED_WEIGHTS), ids=lambda kind: kind.__name__)
def test_pruned_and_shared_weights_keep_their_zeros_and_codebooks_through_training(model_type):
    model = compressed(model_type).train()
    masks = {name: weight.value.detach() != 0 for name, weight in compressible_weights(model).items()}
    assert all(0.2 < float(mask.float().mean()) < 0.4 for mask in masks.values())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    inputs = example(model)
    for _ in range(5):
        optimizer.zero_grad()
        model(inputs).square().mean().backward()
        optimizer.step()
    for name, weight in compressible_weights(model).items():
        assert distinct_values(weight) <= 2**4, name
        assert torch.all(weight.value.detach()[~masks[name]] == 0), name


@pytest.mark.parametrize("model_type", list(EXPECTED_WEIGHTS), ids=lambda kind: kind.__name__)
def test_round_trip_through_a_dcz_is_bit_exact_and_runs(model_type, tmp_path):
    model = compressed(model_type)
    inputs = example(model)
    with torch.no_grad():
        expected = model(inputs)
    plain = plain_state_dict(model)
    path = deepshrink.save_compressed(model, tmp_path / "model.dcz", model_name="test")
    loaded, _ = deepshrink.load_compressed(path, model_type())
    decoded = loaded.state_dict()
    assert decoded.keys() == plain.keys()
    for key, tensor in plain.items():
        assert torch.equal(decoded[key], tensor), key
    with torch.no_grad():
        assert torch.equal(loaded.eval()(inputs), expected)
    runtime = deepshrink.load_runtime(path, model_type(), mode="sparse")
    with torch.no_grad():
        torch.testing.assert_close(runtime(inputs), expected, rtol=1e-5, atol=1e-5)
    # Every weight is stored as codebook and codes, nothing else is.
    _, checked = open_compressed(path)
    shared = {record["name"] for record in checked.records if record["encoding"] == "shared"}
    assert shared == {weight.key for weight in compressible_weights(model).values()}


def test_runtime_runs_linears_compressed_except_where_torch_reads_them_as_tensors(tmp_path):
    model = compressed(Attention, sparsity=0.9)
    path = deepshrink.save_compressed(model, tmp_path / "model.dcz", model_name="test")
    runtime = deepshrink.load_runtime(path, Attention(), mode="sparse")
    kinds = {name: type(module).__name__ for name, module in runtime.named_modules()}
    assert kinds["memory"] == kinds["head"] == "CompressedLinear"
    assert kinds["encoder.layers.0.linear1"] == "Linear"  # TransformerEncoderLayer's fast path reads .weight
    assert kinds["cross.out_proj"] == "NonDynamicallyQuantizableLinear"


def test_selectors_name_modules_parameters_and_state_dict_keys():
    model = Recurrent()
    assert list(select_weights(model, ["lstm"])) == EXPECTED_WEIGHTS[Recurrent][:8]
    assert list(select_weights(model, ["lstm.weight_hh_l0"])) == ["lstm.weight_hh_l0"]
    assert list(select_weights(model, ["*_reverse"])) == [
        "lstm.weight_ih_l0_reverse",
        "lstm.weight_hh_l0_reverse",
        "lstm.weight_ih_l1_reverse",
        "lstm.weight_hh_l1_reverse",
    ]
    assert list(select_weights(model, ["head.weight", "gru"])) == ["gru.weight_ih_l0", "gru.weight_hh_l0", "head"]
    with pytest.raises(UnsupportedLayerError, match=r"lstm.bias_hh_l0 \(LSTM.bias_hh_l0\).*LSTM, GRU, RNN"):
        select_weights(model, ["lstm.bias_hh*"])
    with pytest.raises(ConfigError, match="'lstm2' matches no layer"):
        select_weights(model, ["lstm2"])


def test_a_layer_type_without_a_compressible_weight_is_named_as_unsupported():
    model = nn.Sequential(nn.LayerNorm(3), nn.Linear(3, 2), nn.PReLU(2))
    with pytest.raises(UnsupportedLayerError, match=r"0.weight \(LayerNorm.weight\)"):
        select_weights(model, ["0"])
    with pytest.raises(UnsupportedLayerError, match=r"PReLU.*any other module's own `weight`"):
        share_weights(model, {"2*": 4})
    assert list(compressible_weights(model)) == ["1"]


def test_statistics_count_each_matrix_once_per_step():
    model = Recurrent()
    inputs = example(model, batch=2)  # 7 steps
    rows = {row.name: row for row in layer_statistics(model, inputs)}
    assert rows["lstm.weight_ih_l0"].multiply_accumulates == 4 * 12 * 6 * 7
    assert rows["lstm.weight_hh_l1_reverse"].multiply_accumulates == 4 * 12 * 12 * 7
    assert rows["gru.weight_ih_l0"].kind == "GRU"
    assert rows["head"].multiply_accumulates == 8 * 3


def test_recurrent_model_compresses_through_the_pipeline_within_its_metric(tmp_path):
    """A GRU that sums a sequence (a regression a GRU learns well) keeps its error within 2x
    (targets spread over +-10) after 70% pruning and 5-bit sharing of every matrix, with
    retraining; its file is >= 8x smaller."""
    generator = torch.Generator().manual_seed(0)
    sequences = torch.randn(1200, 12, 3, generator=generator)
    targets = sequences.sum(dim=1)[:, :2] * torch.tensor([1.0, -0.5])

    class Summer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru = nn.GRU(3, 48, num_layers=2, batch_first=True)
            self.head = nn.Linear(48, 2)

        def forward(self, inputs):
            return self.head(self.gru(inputs)[0][:, -1])

    torch.manual_seed(0)
    model = Summer()
    dataset = torch.utils.data.TensorDataset(sequences, targets)
    train = torch.utils.data.Subset(dataset, range(1000))
    test = torch.utils.data.Subset(dataset, range(1000, 1200))
    deepshrink.fit(
        model,
        deepshrink.make_loader(train, 50, shuffle=True, seed=0),
        deepshrink.TrainConfig(epochs=30, learning_rate=0.01, optimizer="adam", seed=0),
        task="regression-l1",
        progress=False,
    )
    recipe = {
        "seed": 0,
        "prune": {"sparsity": {"gru": 0.7}, "rounds": 1, "retrain_epochs": 6, "learning_rate": 0.003},
        "quantize": {"bits": {"*": 5}, "finetune_epochs": 2, "learning_rate": 0.001},
        "encode": {},
    }
    loaders = deepshrink.Loaders.fixed(
        deepshrink.make_loader(train, 50, shuffle=True, seed=0),
        deepshrink.make_loader(test, 200, shuffle=False),
        deepshrink.make_loader(test, 200, shuffle=False),
    )
    result = deepshrink.run(model, recipe, loaders, task="regression-l1", run_dir=tmp_path, progress=False)
    # Measured: mean absolute error 0.037 before, 0.061 after; 0.28 without the retraining.
    assert result.compressed_metric <= 2 * result.reference_metric, (result.reference_metric, result.compressed_metric)
    assert result.ratio >= 8


def test_token_inputs_are_recorded_so_the_runtime_and_bench_feed_integers(tmp_path):
    """A model over token ids: the file records int64 inputs, load_runtime probes with them, and
    the bench times integer inputs (float ones would fail in the Embedding)."""
    from deepshrink.runtime.bench import latency_table

    generator = np.random.default_rng(0)
    np.savez(tmp_path / "tokens.npz", x=generator.integers(0, 30, (200, 5)), y=generator.integers(0, 2, 200))
    data = deepshrink.load_arrays(tmp_path / "tokens.npz")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(30, 8), nn.Flatten(), nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 2))
    recipe = {"quantize": {"bits": {"*": 4}, "finetune_epochs": 0}}
    result = deepshrink.run(model, recipe, data, run_dir=tmp_path / "run", progress=False)
    _, checked = open_compressed(result.path)
    assert checked.metadata["input_shape"] == [5] and checked.metadata["input_dtype"] == "int64"
    runtime = deepshrink.load_runtime(result.path, model, input_shape=(5,))
    decoded, _ = deepshrink.load_compressed(result.path, model)
    rows = latency_table(decoded, runtime, (5,), batches=(1, 4), repeats=5, input_dtype="int64")
    assert [row["batch"] for row in rows] == [1, 4]
    with pytest.raises(ConfigError, match="input_dtype='int8' should be"):
        deepshrink.load_runtime(result.path, model, input_shape=(5,), input_dtype="int8")


class SameLayerTwice(nn.Module):
    """One Linear registered under two names and applied twice: not a tie (one module)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.again = self.first
        self.head = nn.Linear(6, 2)

    def forward(self, inputs):
        return self.head(torch.relu(self.again(torch.relu(self.first(inputs)))))


def test_one_layer_under_two_names_compresses_and_resumes_from_its_stages(tmp_path):
    from deepshrink.layers import tied_weights

    rng = np.random.default_rng(0)
    data = deepshrink.load_arrays({"x": rng.normal(size=(80, 6)).astype(np.float32), "y": np.arange(80) % 2})
    torch.manual_seed(0)
    model = SameLayerTwice()
    assert tied_weights(model) == {}
    recipe = {"prune": {"sparsity": {"*": 0.5}, "rounds": 1, "retrain_epochs": 1}, "quantize": {"bits": {"*": 3}}}
    first = deepshrink.run(model, recipe, data, run_dir=tmp_path / "r", progress=False)
    again = deepshrink.run(model, recipe, data, run_dir=tmp_path / "r", progress=False)  # every stage cached
    assert again.path.read_bytes() == first.path.read_bytes()
    _, checked = open_compressed(first.path)  # the second name's tensors are stored once
    assert [record["encoding"] for record in checked.records if record["name"].startswith("again.")] == ["same"] * 2
    decoded, _ = deepshrink.load_compressed(first.path, SameLayerTwice())
    assert decoded.first is decoded.again
    weight = decoded.first.weight
    assert len(torch.unique(weight)) <= 2**3 and int((weight == 0).sum()) >= 18  # half of 36 pruned, 3 bits


def test_custom_layers_compress_through_the_pipeline(tmp_path):
    """A model of layer types deepshrink does not know, retrained on a task it can learn: every
    matrix pruned and shared, the report's table counting each, the decoded model as good."""
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(600, 6)).astype(np.float32)
    targets = (inputs[:, 0] > 0).astype(int) + (inputs[:, 1] + inputs[:, 2] > 0)
    data = deepshrink.load_arrays({"x": inputs, "y": targets, "validation": 100})
    torch.manual_seed(0)
    model = CustomLayers()
    recipe = {
        "prune": {"sparsity": {"*": 0.5}, "rounds": 2, "retrain_epochs": 3, "learning_rate": 0.05},
        "quantize": {"bits": {"*": 4}, "finetune_epochs": 1},
    }
    result = deepshrink.run(model, recipe, data, run_dir=tmp_path / "run", progress=False)
    decoded, _ = deepshrink.load_compressed(result.path, CustomLayers())
    for name, weight in compressible_weights(decoded).items():
        values = weight.value.detach()
        assert len(torch.unique(values)) <= 2**4, name
        assert int((values == 0).sum()) >= values.numel() // 2, name
    _, checked = open_compressed(result.path)  # the one-dimensional weights are stored as they are
    encodings = {record["name"]: record["encoding"] for record in checked.records}
    assert {encodings["offset"], encodings["norm.weight"]} <= {"raw", "zstd"}
    rows = {row["name"]: row for row in result.report["layers"]}
    assert rows["project.weight"]["weight_bits"] == 4 and rows["pair.weight"]["weight_bits"] == 4
    assert result.compressed_metric >= result.reference_metric - 0.1


def test_bench_tells_where_each_weight_of_a_recurrent_model_lives(tmp_path):
    """The residency table names weights that are a module's parameter (an LSTM's
    weight_hh_l0) by the module that holds them, where it looked them up as modules."""
    from deepshrink.file_commands import bench_file

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(30, 8)
            self.lstm = nn.LSTM(8, 16, batch_first=True)
            self.out = nn.Linear(16, 3)

        def forward(self, tokens):
            return self.out(self.lstm(self.embed(tokens))[0][:, -1])

    generator = np.random.default_rng(0)
    data = deepshrink.load_arrays({"x": generator.integers(0, 30, (120, 6)), "y": generator.integers(0, 3, 120)})
    torch.manual_seed(0)
    model = Tagger()
    recipe = {"prune": {"sparsity": {"*": 0.5}, "rounds": 1, "retrain_epochs": 0}, "quantize": {"bits": {"*": 4}}}
    result = deepshrink.run(model, recipe, data, run_dir=tmp_path / "run", progress=False)
    done = bench_file(result.path, model, batches=(1,), repeats=2)
    rows = {line.split()[0]: line.split()[1] for line in done.residency.splitlines()[1:]}
    assert rows["lstm.weight_hh_l0"] == "LSTM" and rows["embed"] == "Embedding"


def test_statistics_count_layers_of_unknown_types_as_dense_maps():
    """GPT-2's Conv1D against torch's own FLOP counter (two FLOPs a multiply-accumulate); a
    Bilinear, every weight once per example; the LSTMCell once per step."""
    from torch.utils.flop_counter import FlopCounterMode

    model = CustomLayers()
    inputs = example(model, batch=2)
    rows = {row.name: row for row in layer_statistics(model, inputs)}
    with FlopCounterMode(display=False) as counter:
        model.project(inputs)
    assert rows["project"].multiply_accumulates == counter.get_total_flops() // 2 // 2 == 6 * 12
    assert rows["pair"].multiply_accumulates == 8 * 12 * 6
    assert rows["cell.weight_ih"].multiply_accumulates == 40 * 8 * 3

    class Odd(nn.Module):  # an output whose last axis is neither side of the weight: not guessed
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4, 5))

        def forward(self, values):
            return (values @ self.weight).sum(-1, keepdim=True)

    assert layer_statistics(Odd(), torch.ones(2, 4))[0].multiply_accumulates == 0


def test_statistics_count_the_weights_attention_reads_as_tensors():
    """MultiheadAttention's out_proj never runs its own forward, and in eval mode without
    gradients a Transformer layer's fast path runs none of its children: each weight is counted
    once per position all the same (batch 2, 9 positions of width 16)."""
    model = Attention()
    rows = {row.name: row.multiply_accumulates for row in layer_statistics(model, example(model, batch=2))}
    positions = 9
    for block in ("encoder.layers.0", "encoder.layers.1"):
        assert rows[f"{block}.self_attn.in_proj_weight"] == 3 * 16 * 16 * positions
        assert rows[f"{block}.self_attn.out_proj"] == 16 * 16 * positions
        assert rows[f"{block}.linear1"] == 16 * 32 * positions
        assert rows[f"{block}.linear2"] == 32 * 16 * positions
    assert rows["cross.out_proj"] == 16 * 16 * positions
    assert rows["cross.q_proj_weight"] == 16 * 16 * positions
    assert rows["head"] == 16 * 3
