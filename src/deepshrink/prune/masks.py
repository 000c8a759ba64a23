"""Pure mask functions: a weight tensor (or scores) in, a boolean keep-mask out.

True means the weight is kept. Every function accepts the layer's current mask so that
iterative pruning only ever removes more weights: a pruned weight is never revived here
(Dynamic Network Surgery, which can splice weights back, lives in surgery.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from deepshrink.errors import ConfigError


def _check_sparsity(sparsity: float) -> None:
    if not (isinstance(sparsity, int | float) and 0 <= sparsity < 1 and math.isfinite(sparsity)):
        raise ConfigError(f"sparsity={sparsity!r} should be a fraction in [0, 1), e.g. 0.9 to prune 90%")


def _check_mask(scores: torch.Tensor, current_mask: torch.Tensor | None) -> torch.Tensor:
    if current_mask is None:
        return torch.ones_like(scores, dtype=torch.bool)
    if current_mask.shape != scores.shape or current_mask.dtype != torch.bool:
        raise ConfigError(
            f"current_mask must be a bool tensor of shape {tuple(scores.shape)}, "
            f"got {current_mask.dtype} {tuple(current_mask.shape)}"
        )
    return current_mask


def std_threshold_mask(weight: torch.Tensor, quality: float, current_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Han's rule from the original Caffe code: keep |w| > quality x std(w).

    The standard deviation is taken over the weights still kept (all of them on a first pass),
    so that each round of iterative pruning scales with what remains.

    Args:
        weight: the weight.
        quality: the threshold in standard deviations.
        current_mask: the keep-mask so far (None: all kept).

    Returns:
        The new keep-mask (bool), never keeping what `current_mask` pruned.

    Raises:
        ConfigError: `quality` is negative or not finite, or `current_mask` has another shape.
    """
    if not (isinstance(quality, int | float) and quality >= 0 and math.isfinite(quality)):
        raise ConfigError(f"quality={quality!r} should be a non-negative number, e.g. 1.0 (threshold = quality x std)")
    kept = _check_mask(weight, current_mask)
    remaining = weight.detach()[kept]
    if remaining.numel() < 2:
        return kept.clone()
    threshold = quality * remaining.float().std().item()
    return kept & (weight.detach().abs() > threshold)


def mask_from_scores(scores: torch.Tensor, sparsity: float, current_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Prune exactly round(sparsity x n) entries: those with the smallest scores.

    Entries already pruned by `current_mask` count first. Ties are broken by position (the
    earlier entry goes first), so the result is deterministic and the count is exact: the
    same mask a stable sort gives.

    By selection, not sorting: one k-th value among the kept scores, in their own precision,
    then the ties at it by position. A stable float64 argsort of VGG-16's 138M weights took
    55 s and 3.7 GB (issue 21); selection is linear in time and needs one copy of the kept
    scores.

    Args:
        scores: one score per entry; the lowest are pruned.
        sparsity: the fraction to prune, in [0, 1).
        current_mask: the keep-mask so far (None: all kept).

    Returns:
        The keep-mask (bool).

    Raises:
        ConfigError: `sparsity` out of range, or `current_mask` of another shape.
    """
    _check_sparsity(sparsity)
    total = scores.numel()
    pruning = round(sparsity * total)
    ranked = scores.detach().flatten()
    if ranked.dtype in (torch.float16, torch.bfloat16):
        ranked = ranked.float()  # exact, and kthvalue's CPU kernels want it
    if current_mask is not None:
        kept = _check_mask(scores, current_mask).flatten()
        if pruning <= total - int(kept.sum()):  # the mask already prunes as many
            return kept.clone().view_as(scores)
        ranked = ranked.masked_fill(~kept, -math.inf)  # what is pruned ranks first
    if pruning == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = _kth_smallest(ranked, pruning)
    mask = ranked >= threshold
    at = (ranked == threshold).nonzero().flatten()
    mask[at[: pruning - (total - int(torch.count_nonzero(mask)))]] = False
    return mask.view_as(scores)


def _kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest of `values` (1-based). On the CPU numpy's introselect, about twice as
    fast as torch.kthvalue at 30-138M values (benchmarks/mask_selection.py)."""
    if values.device.type == "cpu":
        return torch.tensor(np.partition(values.numpy(), k - 1)[k - 1], dtype=values.dtype)
    return torch.kthvalue(values, k).values


def sparsity_mask(weight: torch.Tensor, sparsity: float, current_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Magnitude pruning to a target sparsity: prune the round(sparsity x n) smallest |w|.

    Args:
        weight: the weight.
        sparsity: the fraction to prune, in [0, 1).
        current_mask: the keep-mask so far (None: all kept).

    Returns:
        The keep-mask (bool).

    Raises:
        ConfigError: `sparsity` out of range, or `current_mask` of another shape.
    """
    return mask_from_scores(weight.detach().abs(), sparsity, current_mask)


def global_sparsity_masks(
    weights: Mapping[str, torch.Tensor],
    sparsity: float,
    current_masks: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """One magnitude threshold across several layers, pruning round(sparsity x total) weights.

    Args:
        weights: {name: weight}.
        sparsity: the fraction of all of them to prune, in [0, 1).
        current_masks: {name: keep-mask so far}.

    Returns:
        {name: keep-mask}.

    Raises:
        ConfigError: no weights, `sparsity` out of range, or a mask of another shape.
    """
    _check_sparsity(sparsity)
    if not weights:
        raise ConfigError("global pruning needs at least one layer; the layer patterns matched none")
    current_masks = current_masks or {}
    names = list(weights)
    flat_scores = torch.cat([weights[name].detach().abs().flatten().cpu() for name in names])
    flat_masks = torch.cat([_check_mask(weights[name], current_masks.get(name)).flatten().cpu() for name in names])
    flat = mask_from_scores(flat_scores, sparsity, flat_masks)
    masks, offset = {}, 0
    for name in names:
        size = weights[name].numel()
        masks[name] = flat[offset : offset + size].view_as(weights[name]).to(weights[name].device)
        offset += size
    return masks
