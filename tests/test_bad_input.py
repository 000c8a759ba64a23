"""Bad input to the CLI and the library: one line, a distinct exit code, nothing lost or left behind."""

from __future__ import annotations

import errno
import os

import hostile
import numpy as np
import pytest
import torch
from torch import nn

import deepshrink
from deepshrink import cli
from deepshrink.compressed import load_compressed, read_state_dict, save_compressed
from deepshrink.encode import container
from deepshrink.encode.codec import decode_state_dict, encode_model
from deepshrink.errors import ConfigError, FormatError, ModelError, OutputError
from deepshrink.files import atomic_output
from deepshrink.lowrank import apply_structure
from deepshrink.runtime.forms import CodebookWeight
from deepshrink.runtime.load import load_runtime
from deepshrink.runtime.modules import CompressedLinear


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return save_compressed(
        hostile.small_model(), tmp_path_factory.mktemp("bad-input") / "model.dcz", model_name=hostile.MODEL
    )


def run(capsys, *arguments: str) -> tuple[int, str]:
    """Exit code and stderr of the CLI run in this process (argparse's usage errors included)."""
    try:
        code = cli.main(["--quiet", *arguments])
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["bench", "{file}", "--batch", "0"], "should be at least 1"),
        (["bench", "{file}", "--repeats", "0"], "should be at least 1"),
        (["bench", "{file}", "--input-shape", "0", "28"], "should be at least 1"),
        (["predict", "{file}", "--device", "bogus"], "is not a device"),
        (["predict", "{file}", "--batch-size", "-3"], "should be at least 1"),
        (["inspect", "{file}", "--max-decoded-bytes", "x"], "is not an integer"),
        (["prune", "{file}", "--out", "x", "--seed", "-1"], "should be at least 0"),
    ],
)
def test_numeric_and_device_options_are_checked_by_the_parser(capsys, model_file, arguments, message):
    code, errors = run(capsys, *[argument.format(file=model_file) for argument in arguments])
    assert code == 2 and message in errors and "Traceback" not in errors


def test_an_input_shape_that_does_not_fit_is_one_line(capsys, model_file):
    code, errors = run(capsys, "bench", str(model_file), "--input-shape", "3", "3", "--repeats", "1")
    assert code == ConfigError.exit_code
    assert errors.count("\n") == 1 and "--input-shape 3 3 does not fit" in errors


def test_predict_refuses_a_device_it_cannot_use(capsys, model_file):
    code, errors = run(capsys, "predict", str(model_file), "--device", "cuda")
    assert code == ConfigError.exit_code and "on the CPU" in errors


@pytest.mark.parametrize("where", ["directory", "under-a-file"])
def test_write_errors_are_one_line_with_their_own_exit_code(capsys, model_file, tmp_path, where):
    out = tmp_path if where == "directory" else model_file / "inside" / "decoded.safetensors"
    code, errors = run(capsys, "decode", str(model_file), "--out", str(out))
    assert code == OutputError.exit_code == 9
    assert errors.startswith("deepshrink: error: cannot write") and errors.count("\n") == 1
    assert model_file.exists() and read_state_dict(model_file)  # the input is untouched


def test_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def no_space(descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OutputError, match="No space left"), atomic_output(target) as temporary:
        temporary.write_bytes(b"new")
    assert target.read_bytes() == b"old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.bin"]


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "figure.png"
    dead = tmp_path / ".figure.png.999999999.abc.partial"  # no such process
    alive = tmp_path / f".figure.png.{os.getpid()}.xyz.partial"  # a writer still at work
    dead.write_bytes(b"")
    alive.write_bytes(b"")
    with atomic_output(target) as temporary:
        temporary.write_bytes(b"png")
    assert not dead.exists() and alive.exists() and target.read_bytes() == b"png"


def test_debug_prints_the_traceback_and_internal_errors_say_so(capsys, monkeypatch, model_file):
    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "_command_inspect", broken)
    monkeypatch.setattr(cli, "_parser", lambda: _with_handler(cli.build_parser(), "inspect", broken))
    code, errors = run(capsys, "inspect", str(model_file))
    assert code == 70 and "internal error (KeyError" in errors and "--debug" in errors and "Traceback" not in errors
    code, errors = run(capsys, "--debug", "inspect", str(model_file))
    assert code == 70 and "Traceback" in errors


def _with_handler(parser, command, handler):
    parser._subparsers._group_actions[0].choices[command].set_defaults(handler=handler)
    return parser


def test_bfloat16_tensors_round_trip_as_the_spec_says(tmp_path):
    model = nn.Linear(8, 4)
    model.register_buffer("scale", torch.randn(5).to(torch.bfloat16))
    header, buffers = encode_model(model)
    assert next(record for record in header["tensors"] if record["name"] == "scale")["dtype"] == "bfloat16"
    parsed = container.from_bytes(container.to_bytes(header, buffers))
    state = decode_state_dict(parsed.header, parsed.buffers)
    assert state["scale"].dtype == torch.bfloat16 and torch.equal(state["scale"], model.scale)


def test_a_low_rank_rank_above_the_matrix_is_refused_before_building():
    with pytest.raises(ConfigError, match="largest possible rank 784"):
        apply_structure(nn.Sequential(nn.Linear(784, 1000)), {"scheme": "zhang", "ranks": {"0": 600_000}})


def test_the_runtime_never_runs_a_kernel_on_a_shape_that_is_not_the_layers():
    weight = CodebookWeight(
        np.array([0, 1, 2]),
        np.array([0, 3], dtype=np.uint16),
        np.array([1, 1], dtype=np.uint8),
        np.array([0, 0.5], dtype=np.float32),
        (2, 4),
    )
    layer = CompressedLinear(weight, None)
    assert layer(torch.ones(1, 4)).tolist() == [[0.5, 0.5]]
    with pytest.raises(ConfigError, match="last dimension is 4"):
        layer(torch.ones(2, 8))  # reshapes to (4, 4) without the check: a silently wrong answer
    with pytest.raises(ConfigError, match="inputs of shape"):
        weight.product(np.ones((1, 5), dtype=np.float32))


@pytest.mark.parametrize(
    ("indptr", "columns", "codes", "problem"),
    [
        ([0, 1, 2], [0, 4], [1, 1], "column index outside"),
        ([0, 2, 1], [0, 1], [1, 1], "row pointers"),
        ([0, 1, 2], [0, 1], [1, 2], "code outside"),
        ([0, 1], [0], [1], "row pointers"),
    ],
)
def test_inconsistent_compressed_arrays_are_refused(indptr, columns, codes, problem):
    with pytest.raises(ConfigError, match=problem):
        CodebookWeight(
            np.array(indptr),
            np.array(columns, dtype=np.int32),
            np.array(codes, dtype=np.uint8),
            np.array([0, 0.5], dtype=np.float32),
            (2, 4),
        )


def test_a_sparse_convolution_declared_wider_than_the_layer_is_refused(tmp_path):
    """The issue's SIGSEGV: a conv weight whose declared im2col width exceeds the layer's, with
    consistent streams and checksums. It is a valid file of another model; not of this one."""
    path = save_compressed(hostile.small_model("lenet-5"), tmp_path / "model.dcz", model_name="lenet-5")
    header, buffers = hostile.split(path.read_bytes())
    wider = hostile.set_field(header, "conv2.weight", "shape", [50, 20, 5, 6])
    wider = hostile.set_field(wider, "conv2.weight", "matrix", [50, 600])
    lied = tmp_path / "wider.dcz"
    lied.write_bytes(hostile.frame(wider, buffers))
    assert read_state_dict(lied)[0]["conv2.weight"].shape == (50, 20, 5, 6)
    for load in (lambda: load_runtime(lied, mode="sparse"), lambda: load_compressed(lied)):
        with pytest.raises(FormatError, match=r"conv2.weight is \[50, 20, 5, 6\], the model's is \[50, 20, 5, 5\]"):
            load()


def test_a_file_of_an_unregistered_model_says_to_pass_the_module(tmp_path):
    """A model saved from Python under its own name: loading by that name alone cannot work,
    and the error says what can (issue 18's "unknown model")."""
    model = nn.Sequential(nn.Linear(4, 3))
    path = save_compressed(model, tmp_path / "mine.dcz", model_name="my-mlp")
    with pytest.raises(ModelError, match="made from model 'my-mlp', which is not registered here; pass the nn.Module"):
        load_compressed(path)
    loaded, _ = load_compressed(path, nn.Sequential(nn.Linear(4, 3)))
    assert torch.equal(loaded[0].weight, model[0].weight)


def _small_labelled_data(tmp_path):
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(300, 12)).astype(np.float32)
    np.savez(tmp_path / "small.npz", x=inputs, y=(inputs[:, 0] > 0).astype(np.int64))
    return deepshrink.load_arrays(tmp_path / "small.npz")


SMALL_RECIPE = {"prune": {"sparsity": {"*": 0.5}, "rounds": 1, "retrain_epochs": 1}, "quantize": {"bits": {"*": 4}}}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_model_that_is_not_float32_is_refused_with_the_fix(tmp_path, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 2))
    name = str(dtype).removeprefix("torch.")
    message = rf"0\.weight is {name} \(4 parameter\(s\) are not float32\).*model\.float\(\)"
    with pytest.raises(ModelError, match=message):
        deepshrink.run(model.to(dtype), SMALL_RECIPE, _small_labelled_data(tmp_path), run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()
    result = deepshrink.run(model.float(), SMALL_RECIPE, None, run_dir=tmp_path / "fixed", progress=False)
    assert result.path.exists()


def test_a_forward_that_needs_two_inputs_is_named_before_anything_runs(tmp_path):
    class TokensAndMask(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, tokens, mask):
            return self.head((self.embed(tokens) * mask.unsqueeze(-1)).mean(1))

    message = r"TokensAndMask.forward needs 2 arguments \(tokens, mask\), and the data gives one input tensor"
    with pytest.raises(ModelError, match=message):
        deepshrink.run(TokensAndMask(), SMALL_RECIPE, _small_labelled_data(tmp_path), run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()

    class OptionalMask(TokensAndMask):  # a second argument with a default is not needed
        def forward(self, tokens, mask=None):
            return self.head(self.embed(tokens).mean(1))

    result = deepshrink.run(OptionalMask(), SMALL_RECIPE, None, run_dir=tmp_path / "optional", progress=False)
    assert result.path.exists()


@pytest.mark.parametrize(
    ("inputs", "model", "message"),
    [
        (  # images without their channel axis
            np.zeros((20, 8, 8), dtype=np.float32),
            lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 2)),
            r"the first two examples \(inputs of shape \[2, 8, 8\], float32\), raised RuntimeError: .*channels",
        ),
        (  # token ids stored as floats
            np.ones((20, 5), dtype=np.float32),
            lambda: nn.Sequential(nn.Embedding(4, 3), nn.Flatten(), nn.Linear(15, 2)),
            r"the first two examples \(inputs of shape \[2, 5\], float32\), raised RuntimeError: .*indices.*integer "
            "token ids",
        ),
    ],
)
def test_data_the_model_cannot_run_on_is_named_with_its_shape(tmp_path, inputs, model, message):
    data = deepshrink.load_arrays({"x": inputs, "y": np.arange(20) % 2})
    with pytest.raises(ModelError, match=rf"the model cannot run on the data: its forward, given {message}"):
        deepshrink.run(model(), SMALL_RECIPE, data, run_dir=tmp_path / "r", progress=False)
    loaders = deepshrink.Loaders.from_splits(data)  # the user's own loaders are checked the same way
    with pytest.raises(ModelError, match="the model cannot run on the data"):
        deepshrink.run(model(), SMALL_RECIPE, loaders, run_dir=tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_evaluate_names_data_its_checkpoint_cannot_run_on(tmp_path, capsys):
    from deepshrink.checkpoint import save_checkpoint
    from deepshrink.models import build_model

    save_checkpoint(tmp_path / "lenet.safetensors", build_model("lenet-300-100"), model_name="lenet-300-100")
    np.savez(tmp_path / "wide.npz", x=np.zeros((20, 5), dtype=np.float32), y=np.arange(20) % 10)
    code, message = run(capsys, "evaluate", str(tmp_path / "lenet.safetensors"), "--data", str(tmp_path / "wide.npz"))
    assert code == ModelError.exit_code
    assert "its forward, given the first two examples (inputs of shape [2, 5]" in message
    assert "internal error" not in message


def test_a_weight_norm_parametrization_is_named_with_the_call_that_removes_it(tmp_path):
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), weight_norm(nn.Linear(16, 2)))
    inputs = torch.randn(5, 12)
    expected = model(inputs).detach()
    with pytest.raises(ModelError, match=r"2\.weight is computed by a parametrization \(_WeightNorm") as caught:
        deepshrink.run(model, SMALL_RECIPE, None, run_dir=tmp_path / "r", progress=False)
    fix = str(caught.value).split(" with ", 1)[1].split(", and load", 1)[0]
    exec(fix, {"torch": torch, "model": model})  # noqa: S102 - the message's code, not user input
    assert torch.allclose(model(inputs), expected, atol=1e-6)  # the same function, as a plain weight
    assert deepshrink.run(model, SMALL_RECIPE, None, run_dir=tmp_path / "plain", progress=False).path.exists()


def test_layers_pruned_to_nothing_still_write_a_file_and_a_report(tmp_path):
    rng = np.random.default_rng(0)
    data = deepshrink.load_arrays({"x": rng.normal(size=(60, 3)).astype(np.float32), "y": np.arange(60) % 2})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))  # 12 and 8 weights: 1% of each is none
    recipe = {"prune": {"sparsity": {"*": 0.99}, "rounds": 1}, "quantize": {"bits": {"*": 2}}}
    result = deepshrink.run(model, recipe, data, run_dir=tmp_path / "r", progress=False)
    decoded, _ = load_compressed(result.path, nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    assert not decoded[0].weight.any() and not decoded[2].weight.any()
    assert (tmp_path / "r" / "report.md").exists() and not (tmp_path / "r" / "figure4-codebook.png").exists()


def test_a_run_directory_that_is_a_file_is_refused_before_retraining(tmp_path):
    taken = tmp_path / "data.npz"
    np.savez(taken, x=np.zeros((10, 3), dtype=np.float32))
    before = taken.read_bytes()
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ConfigError, match=r"run_dir '.*data\.npz' is a file; give a directory"):
        deepshrink.run(model, SMALL_RECIPE, deepshrink.load_arrays(taken), run_dir=taken, progress=False)
    assert taken.read_bytes() == before


def test_batches_of_dicts_are_named_with_their_keys(tmp_path):
    class Records(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, index):
            return {"features": torch.full((4,), float(index)), "label": index % 2}

    loader = torch.utils.data.DataLoader(Records(), batch_size=4)
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(
        ConfigError, match=r"a dict with keys 'features', 'label' and no 'labels': give the targets under 'labels'"
    ):
        deepshrink.run(model, SMALL_RECIPE, deepshrink.Loaders.fixed(loader, loader, loader), run_dir=tmp_path / "r")


def test_predict_names_data_the_file_cannot_run_on_without_blaming_a_flag(tmp_path, capsys):
    from deepshrink.models import build_model

    path = save_compressed(build_model("lenet-300-100"), tmp_path / "lenet.dcz", model_name="lenet-300-100")
    np.savez(tmp_path / "wide.npz", x=np.zeros((20, 5), dtype=np.float32), y=np.arange(20) % 10)
    code, message = run(capsys, "predict", str(path), "--data", str(tmp_path / "wide.npz"))
    assert code == ModelError.exit_code
    expected = "its forward, given the data's first example (inputs of shape [1, 5], float32)"
    assert expected in message
    assert "--input-shape" not in message


def _small_network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 2))


@pytest.mark.parametrize("wrapper", ["compile", "data_parallel"])
def test_a_wrapped_model_is_compressed_as_the_model_inside(tmp_path, wrapper):
    """torch.compile and DataParallel put `_orig_mod.` or `module.` in front of every key; the
    file holds the model's own keys, so it loads into the plain model, as the model inside does."""
    data = _small_labelled_data(tmp_path)
    plain = deepshrink.run(_small_network(), SMALL_RECIPE, data, run_dir=tmp_path / "plain", progress=False)
    wrapped = torch.compile(_small_network()) if wrapper == "compile" else nn.DataParallel(_small_network())
    result = deepshrink.run(wrapped, SMALL_RECIPE, data, run_dir=tmp_path / "wrapped", progress=False)
    assert result.path.read_bytes() == plain.path.read_bytes() and result.model_name == "sequential"
    decoded, _ = load_compressed(result.path, _small_network())
    assert torch.equal(decoded[0].weight, load_compressed(plain.path, _small_network())[0][0].weight)


def test_a_lazy_model_not_yet_called_is_refused_with_the_fix(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 2))
    data = _small_labelled_data(tmp_path)
    with pytest.raises(ModelError, match=r"0\.weight is not initialised yet \(LazyLinear.*model\(inputs\[:1\]\)"):
        deepshrink.run(model, SMALL_RECIPE, data, run_dir=tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()
    model(data.train.tensors[0][:1])  # the fix
    assert deepshrink.run(model, SMALL_RECIPE, data, run_dir=tmp_path / "fixed", progress=False).path.exists()


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_an_old_style_weight_norm_is_refused_with_the_call_that_removes_it(tmp_path, norm):
    model = _small_network()
    getattr(nn.utils, norm)(model[0])
    data = _small_labelled_data(tmp_path)
    with pytest.raises(ModelError, match=rf"0 computes its weight with torch\.nn\.utils\.{norm}") as caught:
        deepshrink.run(model, SMALL_RECIPE, data, run_dir=tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()
    fix = str(caught.value).split("value, with ", 1)[1].split(", and load", 1)[0]
    exec(fix, {"torch": torch, "model": model})  # noqa: S102 - the message's code, not user input
    assert deepshrink.run(model, SMALL_RECIPE, data, run_dir=tmp_path / "fixed", progress=False).path.exists()


def test_a_module_whose_own_load_hooks_refuse_the_file_is_one_line(tmp_path):
    """torch's remove_spectral_norm alone leaves a hook that asks for weight_orig: loading the
    file into such a module is a ModelError saying so, not a torch traceback."""
    path = deepshrink.run(_small_network(), SMALL_RECIPE, None, run_dir=tmp_path / "r", progress=False).path
    model = _small_network()
    nn.utils.spectral_norm(model[0])
    nn.utils.remove_spectral_norm(model[0])
    with pytest.raises(ModelError, match=r"Sequential\.load_state_dict refused the file's tensors.*weight_orig"):
        load_compressed(path, model)


def test_a_wrapped_model_saves_and_loads_as_the_model_inside(tmp_path):
    model = _small_network()
    plain = save_compressed(model, tmp_path / "plain.dcz", model_name="small")
    wrapped = save_compressed(torch.compile(model), tmp_path / "compiled.dcz", model_name="small")
    assert wrapped.read_bytes() == plain.read_bytes()
    target = nn.DataParallel(_small_network())
    with torch.no_grad():
        target.module[0].weight.zero_()
    loaded, _ = load_compressed(plain, target)
    assert loaded is target.module and torch.equal(target.module[0].weight, model[0].weight)


class _Pooled(nn.Module):
    def __init__(self, embedding: nn.Module) -> None:
        super().__init__()
        self.embed = embedding
        self.head = nn.Linear(16, 3)

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(1))


@pytest.mark.parametrize(
    ("options", "message"),
    [({"max_norm": 1.0}, r"renormalises the rows it looks up in place"), ({"sparse": True}, r"sparse gradients")],
)
def test_an_embedding_a_mask_cannot_sit_under_is_refused_with_an_exact_fix(tmp_path, options, message):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, (300, 8))
    data = deepshrink.load_arrays({"x": tokens, "y": tokens[:, 0] % 3})
    torch.manual_seed(0)
    model = _Pooled(nn.Embedding(50, 16, **options))
    with torch.no_grad():
        before = model(data.test.tensors[0])  # max_norm rewrites the rows this looks up
    with pytest.raises(ModelError, match=message) as caught:
        deepshrink.run(model, SMALL_RECIPE, data, run_dir=tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()
    fix = str(caught.value).split("would: " if "max_norm" in options else "ones: ", 1)[1]
    exec(fix, {"torch": torch, "model": model})  # noqa: S102 - the message's code, not user input
    with torch.no_grad():  # the fix changes nothing the model computes (max_norm itself moves rows by an ulp)
        torch.testing.assert_close(model(data.test.tensors[0]), before, rtol=1e-6, atol=1e-6)
    assert deepshrink.run(model, SMALL_RECIPE, data, run_dir=tmp_path / "fixed", progress=False).path.exists()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: torch.jit.script(_small_network()), r"TorchScript module \(RecursiveScriptModule"),
        (lambda: torch.jit.trace(_small_network(), torch.zeros(1, 12)), r"TorchScript module \(TopLevelTracedModule"),
        (lambda: _small_network().requires_grad_(False), r"every parameter of Sequential has requires_grad=False"),
        (
            lambda: torch.ao.quantization.quantize_dynamic(_small_network(), {nn.Linear}, dtype=torch.qint8),
            r"torch\.ao's quantized ones: pass the float model",
        ),
    ],
    ids=["scripted", "traced", "frozen", "quantized"],
)
def test_a_model_no_stage_can_retrain_is_named_with_what_to_pass(tmp_path, make, message):
    with pytest.raises(ModelError, match=message):
        deepshrink.run(make(), SMALL_RECIPE, _small_labelled_data(tmp_path), run_dir=tmp_path / "r", progress=False)
