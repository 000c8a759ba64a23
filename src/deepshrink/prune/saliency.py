"""Second-order saliency: Optimal Brain Damage and Optimal Brain Surgeon.

OBD (LeCun, Denker & Solla 1990): removing weight k costs about s_k = h_kk * w_k^2 / 2, with
h_kk the diagonal of the Hessian of the loss.

How we get h_kk. For a softmax cross-entropy network the Hessian is the Gauss-Newton matrix
J^T (diag(p) - p p^T) J plus a term that vanishes as the model fits the data; the Gauss-Newton
part is positive semi-definite, which OBD's "remove the cheapest weight" argument needs (a
negative exact h_kk would call a weight free to remove when it is not). The Gauss-Newton matrix
of softmax cross-entropy equals the Fisher information E_{y ~ p(y|x)} [g g^T] with g the
gradient of log p(y|x), so its diagonal is estimated without bias by per-example squared
gradients with labels drawn from the model's own prediction (`fisher_diagonal`). It costs one
vectorized per-example backward pass over the examples used. For layers small enough to
hold the exact Hessian, `exact_hessian_diagonal` gives it directly (used by the tests).

OBS (Hassibi & Stork 1993): with the inverse Hessian, removing weight q costs
L_q = w_q^2 / (2 [H^-1]_qq), and the other weights compensate by
delta_w = -(w_q / [H^-1]_qq) H^-1 e_q. After each removal H^-1 is downdated for the constraint
w_q = 0, so successive removals stay optimal to second order. `softmax_layer_hessian` gives the
exact Hessian of the last (linear + softmax cross-entropy) layer, e.g. LeNet-300-100's fc3.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import grad, vmap
from torch.utils.data import DataLoader

from deepshrink import distributed
from deepshrink.errors import ConfigError
from deepshrink.inputs import apply, call, call_with, count, take, to_device
from deepshrink.layers import select_weights
from deepshrink.train import inputs_and_targets, one_tensor

EXACT_HESSIAN_LIMIT = 4096  # parameters; above this an exact Hessian is too big to be practical
PER_EXAMPLE_BYTES = 1 << 28  # fisher_diagonal: at most this many bytes of per-example gradients at once


def obd_saliency(weight: torch.Tensor, hessian_diagonal: torch.Tensor) -> torch.Tensor:
    """s_k = h_kk * w_k^2 / 2, elementwise.

    Args:
        weight: the weight.
        hessian_diagonal: the loss's second derivatives, the weight's shape.

    Returns:
        The saliencies.

    Raises:
        ConfigError: the shapes differ.
    """
    if weight.shape != hessian_diagonal.shape:
        raise ConfigError(
            f"hessian_diagonal shape {tuple(hessian_diagonal.shape)} should match weight shape {tuple(weight.shape)}"
        )
    return 0.5 * hessian_diagonal * weight.detach() ** 2


def exact_hessian_diagonal(loss: Callable[[torch.Tensor], torch.Tensor], point: torch.Tensor) -> torch.Tensor:
    """The exact diagonal of d^2 loss / d point^2, for small parameter tensors.

    Args:
        loss: a function of the parameters.
        point: where to take the derivatives.

    Returns:
        The diagonal, `point`'s shape.

    Raises:
        ConfigError: `point` has more than EXACT_HESSIAN_LIMIT entries.
    """
    if point.numel() > EXACT_HESSIAN_LIMIT:
        raise ConfigError(
            f"exact Hessian of {point.numel()} parameters is too large (limit {EXACT_HESSIAN_LIMIT}); "
            "use fisher_diagonal for whole layers"
        )
    hessian = torch.autograd.functional.hessian(loss, point.detach())
    return hessian.reshape(point.numel(), point.numel()).diagonal().reshape(point.shape)


def fisher_diagonal(
    model: nn.Module,
    loader: DataLoader,
    layer_names: list[str] | None = None,
    *,
    max_examples: int = 5000,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Unbiased estimate of the Gauss-Newton (= Fisher) diagonal for each chosen layer's weight.

    The model must be unparametrized: for a pruned model, load `layers.plain_state_dict(model)`
    into a fresh instance first.

    Args:
        model: an unparametrized model.
        loader: the batches to average over.
        layer_names: globs of the layers (default: all).
        max_examples: stop after this many examples.
        seed: the seed of the sampled labels.
        device: where to compute.

    Returns:
        {layer name: diagonal, the weight's shape}.

    Raises:
        ConfigError: a chosen weight is parametrized.
    """
    layers = select_weights(model, layer_names)
    model = model.to(device).eval()
    key_of = {name: layer.key for name, layer in layers.items()}
    names = list(key_of.values())
    parameters = dict(model.named_parameters())
    missing = [name for name in names if name not in parameters]
    if missing:
        raise ConfigError(f"{missing} are not plain parameters; load plain_state_dict(model) into a fresh model first")
    fixed = {name: value.detach() for name, value in parameters.items() if name not in names}
    buffers = dict(model.named_buffers())
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # Each example in a chunk holds a gradient of every chosen weight: 256 at once for a LeNet, one
    # at a time for a VGG-16 (138M weights, 0.55 GB a gradient), so that a large model's chunk
    # stays within PER_EXAMPLE_BYTES (or one example's gradient) instead of 256 x its size.
    weight_bytes = sum(parameters[name].numel() * parameters[name].element_size() for name in set(names))
    chunk_size = max(1, min(256, PER_EXAMPLE_BYTES // max(weight_bytes, 1)))

    def log_likelihood(selected, example, label):
        one = apply(example, lambda tensor: tensor.unsqueeze(0))
        output = one_tensor(call_with(model, {**fixed, **selected, **buffers}, one))
        return torch.log_softmax(output, dim=1)[0].gather(0, label.unsqueeze(0)).squeeze(0)

    per_example_gradient = vmap(grad(log_likelihood), in_dims=(None, 0, 0))
    sums = {name: torch.zeros_like(parameters[name]) for name in names}
    seen = 0
    for batch in loader:
        inputs = to_device(take(inputs_and_targets(batch)[0], slice(0, max_examples - seen)), device)
        with torch.no_grad():
            probabilities = torch.softmax(one_tensor(call(model, inputs)), dim=1).cpu()
        sampled = torch.multinomial(probabilities, 1, generator=generator).squeeze(1).to(device)
        selected = {name: parameters[name].detach() for name in names}
        examples = count(inputs)
        for chunk in range(0, examples, chunk_size):
            part = take(inputs, slice(chunk, chunk + chunk_size))
            gradients = per_example_gradient(selected, part, sampled[chunk : chunk + chunk_size])
            for name in names:
                sums[name] += (gradients[name] ** 2).sum(0)
        seen += examples
        if seen >= max_examples:
            break
    # Under a process group each rank read its shard of the loader: the estimate is over them all,
    # so every rank prunes by the same saliency.
    seen = int(distributed.sum_values_over_ranks([seen])[0])
    for name in names:
        distributed.sum_over_ranks(sums[name])
    if seen == 0:
        raise ConfigError("fisher_diagonal needs at least one example; the loader is empty")
    return {name: sums[key] / seen for name, key in key_of.items()}


def softmax_layer_hessian(inputs: torch.Tensor, probabilities: torch.Tensor, damping: float = 1e-4) -> torch.Tensor:
    """Exact Hessian of mean softmax cross-entropy w.r.t. a Linear layer's weight (out x in).

    With A_n = diag(p_n) - p_n p_n^T: H = (1/N) sum_n A_n (x) x_n x_n^T, indexed by the
    row-major flattening of the weight. `damping` x I is added: the softmax makes H singular
    (adding a constant to every logit changes nothing), and OBS needs an inverse.

    Args:
        inputs: the layer's inputs, (N, in).
        probabilities: the softmax outputs, (N, out).
        damping: added to the diagonal.

    Returns:
        The (out x in) x (out x in) Hessian, float64.
    """
    count, in_features = inputs.shape
    out_features = probabilities.shape[1]
    inputs, probabilities = inputs.double(), probabilities.double()
    curvature = torch.diag_embed(probabilities) - probabilities.unsqueeze(2) * probabilities.unsqueeze(1)
    hessian = torch.einsum("nik,nj,nl->ijkl", curvature, inputs, inputs) / count
    hessian = hessian.reshape(out_features * in_features, out_features * in_features)
    return hessian + damping * torch.eye(hessian.shape[0], dtype=hessian.dtype)


@dataclass
class SurgeonResult:
    weight: torch.Tensor  # the compensated weights, pruned entries exactly zero
    mask: torch.Tensor
    predicted_increase: float  # sum of the L_q of the removals, in loss units


def optimal_brain_surgeon(weight: torch.Tensor, inverse_hessian: torch.Tensor, prune_count: int) -> SurgeonResult:
    """Remove `prune_count` weights one at a time by OBS, compensating the others each time.

    Args:
        weight: the weight.
        inverse_hessian: the inverse of the loss's Hessian over the flattened weight.
        prune_count: how many to remove.

    Returns:
        The SurgeonResult: compensated weights, mask and predicted loss increase.

    Raises:
        ConfigError: the Hessian's shape does not fit, or `prune_count` is out of range.
    """
    flat = weight.detach().flatten().double().clone()
    size = flat.numel()
    if inverse_hessian.shape != (size, size):
        raise ConfigError(f"inverse_hessian should be {size} x {size} for a weight of {size} entries")
    if not 0 <= prune_count <= size:
        raise ConfigError(f"prune_count={prune_count} should be between 0 and {size}")
    inverse = inverse_hessian.double().clone()
    kept = torch.ones(size, dtype=torch.bool)
    predicted = 0.0
    for _ in range(prune_count):
        diagonal = inverse.diagonal().clamp_min(1e-30)
        saliency = flat**2 / (2 * diagonal)
        saliency[~kept] = float("inf")
        chosen = int(torch.argmin(saliency))
        predicted += float(saliency[chosen])
        column = inverse[:, chosen].clone()
        flat -= (flat[chosen] / inverse[chosen, chosen]) * column
        flat[chosen] = 0.0  # exact zero, not a rounding residue
        # Downdate: the inverse Hessian restricted to w_chosen = 0.
        inverse -= torch.outer(column, column) / column[chosen]
        kept[chosen] = False
        flat[~kept] = 0.0
    return SurgeonResult(flat.view_as(weight).to(weight.dtype), kept.view_as(weight), predicted)


def obd_scores(model: nn.Module, fisher: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OBD saliency of every weight of the layers in `fisher`.

    Args:
        model: the model.
        fisher: {layer name: Hessian diagonal}, from fisher_diagonal.

    Returns:
        {layer name: saliencies}.
    """
    layers = select_weights(model, list(fisher))
    return {name: obd_saliency(layer.value, fisher[name].to(layer.value.device)) for name, layer in layers.items()}
