"""The paper's Figure 6: accuracy against compression rate for pruning only, quantization only,
and pruning followed by quantization.

Every point starts from the reference and retrains briefly, so the curves compare the methods
at equal effort. Sizes of quantized models are the bytes of a real .dcz encoding. A model that
is pruned but not quantized has no codebook, so its size is counted as the encoder's own sparse
layout (relative indices with filler zeros) holding 32-bit values, plus the raw other tensors.
An SVD point factorizes every layer at POS ranks for a MAC budget; its size is its fp32
parameters.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from deepshrink.encode import container
from deepshrink.encode.codec import encode_model, index_widths
from deepshrink.encode.sparse import to_sparse
from deepshrink.layers import compressible_layers, plain_state_dict
from deepshrink.recipe import EncodeSettings, QuantizeSettings, TradeoffSettings
from deepshrink.train import TrainConfig, evaluate, fit


def encoded_bytes(model: nn.Module, encode: EncodeSettings) -> int:
    """The size of `model` as a .dcz file, without writing one."""
    header, buffers = encode_model(model, index_bits=encode.index_bits, layout=encode.layout, coder=encode.coder)
    return len(container.to_bytes(header, buffers))


def sparse_fp32_bytes(model: nn.Module, encode: EncodeSettings) -> int:
    """Bytes of a pruned, unquantized model: 32-bit values in the encoder's relative-index layout."""
    layers = compressible_layers(model)
    widths = index_widths(layers, encode.index_bits)
    weights = {f"{name}.weight": name for name in layers}
    bits = 0
    for key, tensor in plain_state_dict(model).items():
        if key not in weights:
            bits += 32 * tensor.numel()
            continue
        occupied = (tensor.detach().cpu().numpy() != 0).astype(np.uint8)
        layout = encode.layout if encode.layout != "dense" else "csr"
        sparse = to_sparse(occupied, widths[weights[key]], layout)
        bits += len(sparse.gaps) * (32 + widths[weights[key]])
    return math.ceil(bits / 8)


def parameter_bytes(model: nn.Module) -> int:
    return 4 * sum(tensor.numel() for tensor in plain_state_dict(model).values() if tensor.is_floating_point())


def tradeoff_curves(
    reference: nn.Module,
    settings: TradeoffSettings,
    encode: EncodeSettings,
    loaders,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict:
    """Points {method, setting, bytes, ratio, accuracy} for the three methods, test accuracy."""
    from deepshrink.prune.schedule import global_sparsity_rule, iterative_pruning
    from deepshrink.stages import quantize

    original = parameter_bytes(reference)
    reference_accuracy = evaluate(reference, loaders.test, device).accuracy
    points = []
    quiet = {"device": device, "progress": False}

    def add(method: str, setting: str, model: nn.Module, size: int) -> None:
        accuracy = evaluate(model, loaders.test, device).accuracy
        points.append(
            {"method": method, "setting": setting, "bytes": size, "ratio": original / size, "accuracy": accuracy}
        )

    work = (
        [("prune", value) for value in settings.sparsities]
        + [("quantize", value) for value in settings.bits]
        + [("svd", value) for value in settings.svd_budgets]
    )
    bar = tqdm(work, desc="Figure 6 sweep", disable=not progress, leave=False)
    retrain = TrainConfig(epochs=settings.retrain_epochs, learning_rate=settings.learning_rate, seed=seed)
    finetune = QuantizeSettings(bits={"*": settings.combined_bits}, finetune_epochs=settings.retrain_epochs)
    for kind, value in bar:
        model = copy.deepcopy(reference)
        if kind == "prune":
            iterative_pruning(
                model,
                loaders.train(retrain.batch_size, seed),
                loaders.validation,
                global_sparsity_rule(value),
                rounds=1,
                retrain=retrain,
                **quiet,
            )
            add("pruning only", f"{100 * value:g}% pruned", model, sparse_fp32_bytes(model, encode))
            quantize(model, finetune, loaders, seed=seed, **quiet)
            combined = f"{100 * value:g}% pruned, {settings.combined_bits} bits"
            add("pruning + quantization", combined, model, encoded_bytes(model, encode))
        elif kind == "quantize":
            bits = QuantizeSettings(bits={"*": value}, finetune_epochs=settings.retrain_epochs)
            quantize(model, bits, loaders, seed=seed, **quiet)
            add("quantization only", f"{value} bits", model, encoded_bytes(model, encode))
        else:
            from deepshrink.lowrank import factorize, layer_spectra, select_pos

            example = next(iter(loaders.validation))[0][:1]
            spectra = layer_spectra(model, example.to(next(model.parameters()).device))
            factorize(model, spectra, select_pos(spectra, value).ranks)
            if retrain.epochs:
                fit(model, loaders.train(retrain.batch_size, seed), retrain, **quiet)
            add("SVD", f"{100 * value:g}% of the MACs", model, parameter_bytes(model))
    return {"reference_accuracy": reference_accuracy, "parameter_bytes": original, "points": points}


def plot_tradeoff(curves: dict, path) -> None:
    """Accuracy loss against compression ratio, one line per method (Han et al. 2016, Figure 6)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from deepshrink.tables import save_figure

    figure, axis = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    reference = curves["reference_accuracy"]
    methods = ["pruning + quantization", "pruning only", "quantization only", "SVD"]
    for method, marker in zip(methods, "osd^", strict=True):
        points = sorted((point for point in curves["points"] if point["method"] == method), key=lambda p: p["ratio"])
        if points:
            axis.plot(
                [point["ratio"] for point in points],
                [100 * (point["accuracy"] - reference) for point in points],
                marker=marker,
                label=method,
            )
    axis.axhline(0, color="grey", linewidth=0.8)
    axis.set_xscale("log")
    axis.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}x"))
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.set_xlabel("compression ratio (fp32 parameter bytes / compressed bytes)")
    axis.set_ylabel("test accuracy change (points)")
    axis.set_title("Accuracy against compression (Figure 6)")
    axis.legend()
    save_figure(figure, path)
