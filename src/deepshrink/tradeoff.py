"""The paper's Figure 6: the task's metric (accuracy, in the paper) against compression rate for
pruning only, quantization only, and pruning followed by quantization; and, where the recipe
asks, sparse variational dropout alone and followed by quantization (`variational_kl_weights`)
and soft weight-sharing (`soft_taus`).

Every point starts from the reference and retrains briefly, so the paper's methods and SVD are
compared at equal effort. Sizes of quantized models are the bytes of a real .dcz encoding. A model that
is pruned but not quantized has no codebook, so its size is counted as the encoder's own sparse
layout (relative indices with filler zeros) holding 32-bit values, plus the raw other tensors.
An SVD point factorizes every layer at POS ranks for a MAC budget; its size is its fp32
parameters. A variational point trains `variational_epochs` epochs and a soft-sharing point
`soft_epochs` (both methods learn their sparsity slowly), then retrains like the others.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from deepshrink.encode.sizes import encoded_bytes, parameter_bytes, sparse_fp32_bytes
from deepshrink.errors import ConfigError
from deepshrink.progress import progress_bar
from deepshrink.recipe import EncodeSettings, TradeoffSettings
from deepshrink.stages import LowrankSettings, PruneSettings, QuantizeSettings, StageContext, run_stage
from deepshrink.tasks import Task, resolve_task
from deepshrink.train import evaluate


def tradeoff_curves(
    reference: nn.Module,
    settings: TradeoffSettings,
    encode: EncodeSettings,
    loaders,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    task: Task | None = None,
    batchnorm: str = "freeze",
    progress: bool = True,
) -> dict:
    """Points {method, setting, bytes, ratio, metric} for the three methods and SVD, each with
    the task's metric on the test split (default classification's top-1 accuracy).

    Every point runs the stages themselves (`run_stage`) from a copy of the reference, with
    `settings.retrain_epochs` of retraining at `settings.learning_rate`.

    Args:
        reference: the trained model; it is copied, never changed.
        settings: the sparsities, bit widths and SVD budgets to try, and the retraining.
        encode: the encoding settings that size each point.
        loaders: the data loaders (training, validation, test).
        seed: the seed of every point's retraining.
        device: where to retrain and evaluate.
        task: the task (default classification).
        batchnorm: how BatchNorm layers retrain ("freeze" or "train").
        progress: show a progress bar.

    Returns:
        {"metric_name", "reference_metric", "parameter_bytes", "points", "skipped"}, the points
        as above; "skipped" lists {method, setting, reason} for the SVD budgets the model's
        factorable layers cannot meet (a transformer's arithmetic is mostly in attention, which
        low-rank leaves alone), where one such budget stopped the whole sweep.
    """
    task = resolve_task(task)
    original = parameter_bytes(reference)
    reference_metric = evaluate(reference, loaders.test, device, task).metric
    points, skipped = [], []
    context = StageContext(loaders, seed=seed, device=device, progress=False, task=task, batchnorm=batchnorm)

    def add(method: str, setting: str, model: nn.Module, size: int) -> None:
        metric = evaluate(model, loaders.test, device, task).metric
        points.append({"method": method, "setting": setting, "bytes": size, "ratio": original / size, "metric": metric})

    work = (
        [("prune", value) for value in settings.sparsities]
        + [("quantize", value) for value in settings.bits]
        + [("svd", value) for value in settings.svd_budgets]
        + [("variational", value) for value in settings.variational_kl_weights]
        + [("soft", value) for value in settings.soft_taus]
    )
    bar = progress_bar(work, desc="Figure 6 sweep", enabled=progress, leave=False)
    epochs, rate = settings.retrain_epochs, settings.learning_rate
    for kind, value in bar:
        model = copy.deepcopy(reference)
        if kind == "prune":
            prune = PruneSettings(global_sparsity=value, rounds=1, retrain_epochs=epochs, learning_rate=rate)
            run_stage(model, prune, context)
            add("pruning only", f"{100 * value:g}% pruned", model, sparse_fp32_bytes(model, encode))
            run_stage(model, QuantizeSettings(bits={"*": settings.combined_bits}, finetune_epochs=epochs), context)
            combined = f"{100 * value:g}% pruned, {settings.combined_bits} bits"
            add("pruning + quantization", combined, model, encoded_bytes(model, encode))
        elif kind == "quantize":
            run_stage(model, QuantizeSettings(bits={"*": value}, finetune_epochs=epochs), context)
            add("quantization only", f"{value} bits", model, encoded_bytes(model, encode))
        elif kind == "variational":
            # The shipped variational recipes' settings (Adam at 1e-3, log alpha > 3 pruned, the
            # masks then fixed for `retrain_epochs`), at this KL weight.
            prune = PruneSettings(
                method="variational",
                kl_weight=value,
                retrain_epochs=settings.variational_epochs,
                finetune_epochs=epochs,
                learning_rate=rate,
            )
            run_stage(model, prune, context)
            add("variational dropout only", f"KL weight {value:g}", model, sparse_fp32_bytes(model, encode))
            run_stage(model, QuantizeSettings(bits={"*": settings.combined_bits}, finetune_epochs=epochs), context)
            combined = f"KL weight {value:g}, {settings.combined_bits} bits"
            add("variational dropout + quantization", combined, model, encoded_bytes(model, encode))
        elif kind == "soft":
            # Retrained under the mixture prior, then shared through its means (zero included,
            # so it prunes too), then the centroids fine-tuned like every other point.
            soft = QuantizeSettings(method="soft", tau=value, soft_epochs=settings.soft_epochs, finetune_epochs=epochs)
            run_stage(model, soft, context)
            add("soft weight-sharing", f"tau {value:g}", model, encoded_bytes(model, encode))
        else:
            lowrank = LowrankSettings(budget=value, method="pos", finetune_epochs=epochs, learning_rate=rate)
            try:
                run_stage(model, lowrank, context)
            except ConfigError as error:  # this budget is out of reach; the others still count
                skipped.append({"method": "SVD", "setting": f"{100 * value:g}% of the MACs", "reason": str(error)})
                continue
            add("SVD", f"{100 * value:g}% of the MACs", model, parameter_bytes(model))
    return {
        "metric_name": task.metric.name,
        "reference_metric": reference_metric,
        "parameter_bytes": original,
        "points": points,
        "skipped": skipped,
    }
