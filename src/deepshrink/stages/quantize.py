"""Stage 2: trained quantization. Per-layer k-means weight sharing (the paper's 8 bits for
convolutions and 5 for fully connected layers unless `bits` says otherwise), or soft
weight-sharing (a Gaussian-mixture prior learned with the weights, Ullrich et al. 2017); then
the centroids fine-tuned with the task loss. The sharing records (Figure 4) travel in the
result's tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from deepshrink.errors import ConfigError
from deepshrink.settings import DistillSettings, between, check_fields, choices, layer_globs
from deepshrink.stages.base import Stage, StageContext, StageResult, register_stage
from deepshrink.stages.retraining import criterion, fine_tune
from deepshrink.train import evaluate

METHODS = ("kmeans", "soft")
BITS_FROM = ("settings", "posterior")
INITS = ("linear", "density", "forgy", "optimal", "grouped")
WEIGHTINGS = ("none", "fisher")
OPTIMIZERS = ("sgd", "adam")
RECORD_ARRAYS = ("initial_centroids", "centroids", "sample")


@dataclass(frozen=True)
class QuantizeSettings:
    """Per-layer k-means weight sharing, `bits` mapping layer globs to bits (default 8 conv / 5
    fc); or, with method soft, soft weight-sharing over `layers`, whose `components` set the
    codebook (17: zero and at most 16 values, 5 bits)."""

    method: str = field(
        default="kmeans",
        metadata=choices(
            *METHODS,
            help="kmeans: the paper's per-layer k-means; soft (experimental, see BENCHMARKS.md): retrain "
            "`soft_epochs` under a learned Gaussian-mixture prior, then share through its means (zero "
            "included: it prunes too)",
        )
        | {"recorded_when_set": True},
    )

    bits: dict[str, int] | None = field(
        default=None,
        metadata=layer_globs(
            between(1, 16), help="bits per weight for LAYER, 1 to 16 (default: 8 for conv, 5 for fc, as in the paper)"
        ),
    )
    bits_from: str = field(
        default="settings",
        metadata=choices(
            *BITS_FROM,
            help="settings: `bits` (or the paper's defaults); posterior: each layer's width from variational "
            "dropout's posterior in the same run, the widest codebook no finer than the kept weights' mean "
            "posterior standard deviation (Louizos et al. 2017)",
        )
        | {"recorded_when_set": True},
    )
    init: str = field(
        default="linear", metadata=choices(*INITS, help="centroid initialisation (linear: the paper's best)")
    )
    weighting: str = field(
        default="none",
        metadata=choices(
            *WEIGHTINGS,
            help="none: every weight counts alike in k-means (the paper's); fisher: each weight's squared "
            "error weighted by the loss's Fisher diagonal, estimated over `fisher_examples` training "
            "examples (Choi et al. 2017's Hessian-weighted k-means; classification only)",
        )
        | {"recorded_when_set": True},
    )
    fisher_examples: int = field(
        default=5000,
        metadata=between(1, help="weighting fisher: training examples the Fisher diagonal is averaged over")
        | {"recorded_when_set": True},
    )
    finetune_epochs: int = field(default=1, metadata=between(0, help="centroid fine-tuning epochs"))
    optimizer: str = field(default="adam", metadata=choices(*OPTIMIZERS, help="fine-tuning optimizer"))
    learning_rate: float = field(default=1e-4, metadata=between(1e-12, help="fine-tuning learning rate"))
    weight_decay: float = field(
        default=0.0, metadata=between(0.0, help="fine-tuning weight decay (decay would pull centroids to zero)")
    )
    batch_size: int = field(default=128, metadata=between(1, help="fine-tuning batch size"))
    distill: DistillSettings | None = None
    # Method soft. Written into a recipe's record only when set, so that the keys and files of
    # k-means sharing stay as they were.
    layers: list[str] | None = field(
        default=None,
        metadata=layer_globs(help="method soft: the layer globs under the mixture prior (default: all)")
        | {"recorded_when_set": True},
    )
    components: int = field(
        default=17,
        metadata=between(2, 65536, help="method soft: mixture components, the zero one included")
        | {"recorded_when_set": True},
    )
    tau: float = field(
        default=5e-3,
        metadata=between(1e-12, help="method soft: the prior's weight against the task's loss")
        | {"recorded_when_set": True},
    )
    soft_epochs: int = field(
        default=10,
        metadata=between(1, help="method soft: retraining epochs under the prior") | {"recorded_when_set": True},
    )
    soft_learning_rate: float = field(
        default=5e-4,
        metadata=between(1e-12, help="method soft: Adam's learning rate for the weights") | {"recorded_when_set": True},
    )
    prior_learning_rate: float = field(
        default=3e-4,
        metadata=between(1e-12, help="method soft: Adam's learning rate for the mixture") | {"recorded_when_set": True},
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.method == "soft" and self.bits is not None:
            raise ConfigError(
                "quantize method soft takes no bits: its mixture's `components` set the codebook "
                "(17: zero and 16 values, 5 bits); choose the weights with `layers`"
            )
        if self.bits_from == "posterior" and (self.method != "kmeans" or self.bits is not None):
            raise ConfigError(
                "bits_from: posterior chooses every layer's bits for k-means sharing: leave out `bits` "
                "(and use method kmeans), or drop bits_from"
            )
        if self.weighting != "none" and self.method != "kmeans":
            raise ConfigError("weighting weighs k-means' errors: use it with method kmeans, or drop it")
        if (
            self.fisher_examples != type(self).__dataclass_fields__["fisher_examples"].default
            and self.weighting != "fisher"
        ):
            raise ConfigError("fisher_examples goes with `weighting: fisher`: add that, or drop fisher_examples")
        if self.method == "kmeans" and self.layers is not None:
            raise ConfigError("layers goes with method soft; k-means sharing takes bits: {LAYER_GLOB: BITS}")


def quantize_stage(model: nn.Module, settings: QuantizeSettings, context: StageContext) -> StageResult:
    """Share `model`'s weights in place through k-means codebooks (or a learned mixture prior's
    means), then fine-tune the centroids.

    Args:
        model: the model whose weights are shared, in place.
        settings: the method, the bits per layer and the k-means initialisation (or the mixture),
            and the centroids' fine-tuning.
        context: the loaders (None: shared without fine-tuning), seed, device and task.

    Returns:
        The result: the per-layer bits and distinct values, the k-means records (as tensors) and
        the fine-tuning's history.
    """
    from deepshrink.quantize.report import sharing_rows
    from deepshrink.quantize.shared import share_weights

    log: dict = {}
    if settings.method == "soft":
        records = _soft_sharing(model, settings, context, log)
    else:
        bits = _posterior_bits(model, context, log) if settings.bits_from == "posterior" else settings.bits
        importance = _fisher_importance(model, bits, settings, context) if settings.weighting == "fisher" else None
        records = share_weights(model, bits, settings.init, seed=context.seed, importance=importance)
    log |= {
        "init": settings.init if settings.method == "kmeans" else "mixture",
        "weighting": settings.weighting,
        "bits": {name: record.bits for name, record in records.items()},
        "records": {
            name: {"bits": record.bits, "zero_code": record.zero_code, "inertia": float(record.inertia)}
            for name, record in records.items()
        },
        "layers": sharing_rows(model, records),
    }
    tensors = {
        f"{name}/{part}": torch.from_numpy(np.asarray(getattr(record, part), dtype=np.float64))
        for name, record in records.items()
        for part in RECORD_ARRAYS
    }
    if context.loaders is None:
        log["without_data"] = "shared without fine-tuning the centroids: no data was given"
        return StageResult("quantize", log, {}, tensors=tensors)
    loss = criterion(settings, context, model)
    metrics = {
        "validation_metric_after_sharing": evaluate(
            model, context.loaders.validation, context.device, context.task
        ).metric
    }
    epochs = fine_tune(
        model,
        settings,
        context,
        epochs=settings.finetune_epochs,
        description="fine-tune centroids",
        loss=loss,
        validate=True,
    )
    metrics["validation_metric"] = evaluate(model, context.loaders.validation, context.device, context.task).metric
    if epochs:
        log["epochs"] = [vars(record) for record in epochs]
    return StageResult("quantize", log, metrics, tensors=tensors)


def _fisher_importance(model: nn.Module, bits, settings: QuantizeSettings, context: StageContext) -> dict:
    """The Fisher diagonal of each weight about to be shared, over `fisher_examples` training
    examples, for `weighting: fisher`."""
    from deepshrink.layers import plain_copy
    from deepshrink.prune.saliency import fisher_diagonal

    if context.loaders is None:
        raise ConfigError("quantize weighting fisher estimates the loss's curvature: it needs data, or drop weighting")
    if context.task.name != "classification":
        raise ConfigError(
            f"quantize weighting fisher is for classification (its Fisher is the softmax's), and this task is "
            f"{context.task.name}: drop weighting"
        )
    # fisher_diagonal differentiates plain parameters: a copy with the pruning masks folded in.
    return fisher_diagonal(
        plain_copy(model),
        context.loaders.train(settings.batch_size, context.seed),
        None if bits is None else list(bits),
        max_examples=settings.fisher_examples,
        seed=context.seed,
        device=context.device,
    )


def _posterior_bits(model: nn.Module, context: StageContext, log: dict) -> dict[str, int]:
    """The bits `posterior_bits` chooses from the posterior the prune stage recorded in this run."""
    from deepshrink.layers import select_weights
    from deepshrink.quantize.shared import posterior_bits

    earlier = context.earlier.get("prune")
    posterior = None if earlier is None else earlier.log.get("posterior")
    if posterior is None:
        raise ConfigError(
            "quantize: bits_from: posterior needs variational dropout's posterior from the same run: add "
            "`prune: {method: variational}` before it (a prune stage cached before posteriors were recorded "
            "lacks it: delete its files under the run directory's stages/), or give `bits` instead"
        )
    log["posterior"] = dict(posterior)
    return posterior_bits(select_weights(model, None), posterior)


def _soft_sharing(model: nn.Module, settings: QuantizeSettings, context: StageContext, log: dict) -> dict:
    """Soft weight-sharing on the settings' layers; its history goes into `log`."""
    from deepshrink.quantize.soft import soft_weight_sharing
    from deepshrink.stages.retraining import training_config

    if context.loaders is None:
        raise ConfigError("quantize method soft retrains the weights under its prior: it needs data")
    result = soft_weight_sharing(
        model,
        context.loaders.train(settings.batch_size, context.seed),
        training_config(settings, context, settings.soft_epochs, settings.soft_learning_rate, optimizer="adam"),
        layers=settings.layers,
        components=settings.components,
        tau=settings.tau,
        prior_learning_rate=settings.prior_learning_rate,
        validation_loader=context.loaders.validation,
        device=context.device,
        task=context.task,
        criterion=criterion(settings, context, model),
        progress=context.progress,
    )
    log["mixture_means"] = {name: means.tolist() for name, means in result.means.items()}
    log["soft_epochs"] = [vars(record) for record in result.history.epochs]
    return result.records


def sharing_records(result: StageResult) -> dict:
    """The per-layer k-means records (SharingRecord) a quantize result carries, for Figure 4.

    Args:
        result: a quantize stage's result.

    Returns:
        {layer name: SharingRecord}.
    """
    from deepshrink.quantize.shared import SharingRecord

    records = {}
    for name, meta in result.log.get("records", {}).items():
        arrays = {part: result.tensors[f"{name}/{part}"].numpy() for part in RECORD_ARRAYS}
        records[name] = SharingRecord(
            meta["bits"],
            meta["zero_code"],
            arrays["initial_centroids"],
            arrays["centroids"],
            meta["inertia"],
            arrays["sample"],
        )
    return records


def summarize(model: nn.Module, result: StageResult) -> str:
    """The per-layer sharing table: bits, and distinct values against the 2^bits limit.

    Args:
        model: the model after the stage (the table comes from `result`).
        result: the quantize stage's result.

    Returns:
        The per-layer sharing table.
    """
    from deepshrink.quantize.report import format_sharing_table

    table = format_sharing_table(result.log["layers"])
    posterior = result.log.get("posterior")
    if not posterior:
        return table
    chosen = ", ".join(
        f"{name} {result.log['bits'][name]} (span / sigma {entry['span'] / entry['sigma']:.1f})"
        for name, entry in posterior.items()
        if name in result.log["bits"] and entry["sigma"] > 0
    )
    return (
        f"{table}\nbits from variational dropout's posterior (the kept weights' span over their mean sigma): {chosen}"
    )


STAGE = register_stage(
    Stage(
        "quantize",
        QuantizeSettings,
        quantize_stage,
        order=30,
        after_folding=True,
        planned_late=True,
        description="share weights through per-layer k-means codebooks, then fine-tune the centroids",
        summarize=summarize,
    )
)
