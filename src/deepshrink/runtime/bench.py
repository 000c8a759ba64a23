"""Latency of a compressed model against its dense decoding, measured in the same run."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from deepshrink.inputs import Inputs, call, count, take


def median_seconds(function: Callable[[], object], repeats: int = 50, warmup: int = 5) -> float:
    """The median wall time of `function` over `repeats` calls, after `warmup` calls.

    Args:
        function: what to time.
        repeats: timed calls.
        warmup: untimed calls first.

    Returns:
        Seconds.
    """
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def example_inputs(batch: int, shape: tuple[int, ...], dtype: str = "float32", generator=None) -> torch.Tensor:
    """Inputs for timing or probing a model: normal noise, or zeros for integer inputs (token
    ids: 0 is a valid index of every Embedding).

    Args:
        batch: examples.
        shape: one example's shape.
        dtype: the inputs' dtype name.
        generator: the random source.

    Returns:
        The tensor, (batch, *shape).
    """
    if dtype.startswith(("int", "uint")):
        return torch.zeros((batch, *shape), dtype=getattr(torch, dtype))
    return torch.randn(batch, *shape, generator=generator, dtype=getattr(torch, dtype))


def batch_of(examples: Inputs, batch: int) -> Inputs:
    """`batch` examples from real ones (a data set's first), repeating them where there are fewer.

    Args:
        examples: inputs of one or more examples (a tensor, or a tuple or dict of them).
        batch: how many to give.

    Returns:
        The batch, in the inputs' form.
    """
    return take(examples, torch.arange(batch) % count(examples))


def latency_table(
    dense: nn.Module,
    compressed: nn.Module,
    input_shape: tuple[int, ...] | None,
    batches=(1, 8, 64),
    repeats: int = 50,
    input_dtype: str = "float32",
    examples: Inputs | None = None,
) -> list[dict]:
    """Per batch size: median milliseconds dense and compressed, alternating so both see the same machine.

    Args:
        dense: the dense model.
        compressed: the runtime model.
        input_shape: one example's shape (unused with `examples`).
        batches: the batch sizes.
        repeats: timed calls per batch size.
        input_dtype: the inputs' dtype name.
        examples: real inputs to time on (`batch_of`), in place of made-up ones: what a model of
            several inputs needs.

    Returns:
        Rows {"batch", "dense_ms", "compressed_ms", "speedup"}.
    """
    rows = []
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for batch in batches:
            if examples is not None:
                inputs = batch_of(examples, batch)
            else:
                inputs = example_inputs(batch, input_shape, input_dtype, generator)
            dense_times, compressed_times = [], []
            for _ in range(5):  # interleave rounds: a noisy neighbour hurts both, not one
                for model, times in ((dense, dense_times), (compressed, compressed_times)):
                    times.append(median_seconds(functools.partial(call, model, inputs), max(repeats // 5, 1), warmup=2))
            dense_ms = 1000 * statistics.median(dense_times)
            compressed_ms = 1000 * statistics.median(compressed_times)
            rows.append(
                {
                    "batch": batch,
                    "dense_ms": dense_ms,
                    "compressed_ms": compressed_ms,
                    "speedup": dense_ms / compressed_ms,
                }
            )
    return rows


def layer_latency_table(
    dense: nn.Module,
    compressed: nn.Module,
    input_shape: tuple[int, ...] | None,
    batch: int = 1,
    repeats: int = 200,
    input_dtype: str = "float32",
    examples: Inputs | None = None,
) -> list[dict]:
    """Per layer that `compressed` runs from the compressed form: median microseconds of that
    layer alone, dense and compressed, on the input it sees in a forward pass of `dense`.

    Args:
        dense: the dense model.
        compressed: the runtime model.
        input_shape: one example's shape (unused with `examples`).
        batch: the batch size.
        repeats: timed calls per layer.
        input_dtype: the inputs' dtype name.
        examples: real inputs (see `latency_table`).

    Returns:
        Rows {"layer", "form", "dense_us", "compressed_us", "speedup"}.
    """
    from deepshrink.runtime.modules import CompressedConv2d, CompressedLinear

    dense_layers = dict(dense.named_modules())
    targets = {
        name: module
        for name, module in compressed.named_modules()
        if isinstance(module, CompressedLinear | CompressedConv2d)
    }
    seen: dict[str, torch.Tensor] = {}
    handles = [
        dense_layers[name].register_forward_hook(
            lambda module, inputs, output, name=name: seen.__setitem__(name, inputs[0].detach().clone())
        )
        for name in targets
    ]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if examples is not None:
            call(dense, batch_of(examples, batch))
        else:
            dense(example_inputs(batch, input_shape, input_dtype, generator))
    for handle in handles:
        handle.remove()
    rows = []
    with torch.no_grad():
        for name, module in targets.items():
            inputs = seen[name]
            dense_times, compressed_times = [], []
            for _ in range(5):
                for layer, times in ((dense_layers[name], dense_times), (module, compressed_times)):
                    times.append(median_seconds(functools.partial(layer, inputs), max(repeats // 5, 1), warmup=2))
            dense_us = 1e6 * statistics.median(dense_times)
            compressed_us = 1e6 * statistics.median(compressed_times)
            rows.append(
                {
                    "layer": name,
                    "form": module.weight_form.form,
                    "dense_us": dense_us,
                    "compressed_us": compressed_us,
                    "speedup": dense_us / compressed_us,
                }
            )
    return rows


def format_latency(rows: list[dict]) -> str:
    """latency_table's rows as a text table.

    Args:
        rows: from latency_table.

    Returns:
        The table.
    """
    from deepshrink.tables import render_table

    return render_table(
        ["batch", "dense (ms)", "compressed (ms)", "speedup"],
        [
            [str(row["batch"]), f"{row['dense_ms']:.3f}", f"{row['compressed_ms']:.3f}", f"{row['speedup']:.2f}x"]
            for row in rows
        ],
    )


def format_residency(dense: nn.Module, compressed: nn.Module) -> str:
    """Per weight layer: how `compressed` runs it, and the bytes it keeps against the dense weight's.

    Args:
        dense: the dense model.
        compressed: the runtime model.

    Returns:
        The table.
    """
    from deepshrink.layers import compressible_weights
    from deepshrink.runtime.load import resident_weight_bytes
    from deepshrink.tables import render_table

    dense_bytes, compressed_bytes = resident_weight_bytes(dense), resident_weight_bytes(compressed)
    layers = dict(compressed.named_modules())
    # A weight named module.parameter (an LSTM's weight_hh_l0, attention's in_proj_weight) is
    # held by its module, which runs it dense.
    layers |= {name: weight.module for name, weight in compressible_weights(compressed).items() if name not in layers}
    return render_table(
        ["layer", "runs as", "dense weight bytes", "resident bytes", "form"],
        [
            [
                name,
                type(layers[name]).__name__,
                f"{dense_bytes[name]:,}",
                f"{compressed_bytes[name]:,}",
                getattr(getattr(layers[name], "weight_form", None), "form", "dense"),
            ]
            for name in compressed_bytes
        ],
    )


def format_layer_latency(rows: list[dict]) -> str:
    """layer_latency_table's rows as a text table.

    Args:
        rows: from layer_latency_table.

    Returns:
        The table.
    """
    from deepshrink.tables import render_table

    return render_table(
        ["layer", "form", "dense (us)", "compressed (us)", "speedup"],
        [
            [
                row["layer"],
                row["form"],
                f"{row['dense_us']:.1f}",
                f"{row['compressed_us']:.1f}",
                f"{row['speedup']:.2f}x",
            ]
            for row in rows
        ],
    )


def machine_description() -> dict:
    """What a benchmark row must say about where it ran: the CPU model, its vector instruction
    sets, which kernels run (the AVX-512 tiled form, the AVX2 blocked form, or portable code),
    numba's target (model and features: the model alone keeps the host's features) and the load
    average.

    Returns:
        {"cpu", "cpu_flags", "kernels", "numba_cpu_name", "numba_cpu_features", "cores", "load"}.
    """
    import os

    from deepshrink.runtime import blocked_avx2, tiled

    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "cpu": model,
        "cpu_flags": " ".join(sorted(flag for flag in flags if flag.startswith(("avx", "fma")))),
        "kernels": (
            "AVX-512 tiled form"
            if tiled.available()
            else "AVX2 blocked form"
            if blocked_avx2.available()
            else "portable (per-entry and grouped forms)"
        ),
        "numba_cpu_name": os.environ.get("NUMBA_CPU_NAME", "host"),
        "numba_cpu_features": os.environ.get("NUMBA_CPU_FEATURES", "host"),
        "cores": os.cpu_count(),
        "load": os.getloadavg(),
    }
