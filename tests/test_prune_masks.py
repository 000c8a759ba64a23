"""Pure mask functions: exact counts, Han's std rule, global thresholds, argument errors."""

from __future__ import annotations

import pytest
import torch

from deepshrink.errors import ConfigError
from deepshrink.prune.masks import global_sparsity_masks, mask_from_scores, sparsity_mask, std_threshold_mask


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.99, 0.333])
@pytest.mark.parametrize("shape", [(7,), (30, 40), (4, 3, 5, 5)])
def test_sparsity_mask_prunes_exactly_the_requested_count(sparsity, shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    mask = sparsity_mask(weight, sparsity)
    assert mask.dtype == torch.bool and mask.shape == weight.shape
    assert int((~mask).sum()) == round(sparsity * weight.numel())


def test_sparsity_mask_removes_the_smallest_magnitudes():
    weight = torch.tensor([0.5, -0.1, 3.0, -2.0, 0.2, -0.05])
    assert sparsity_mask(weight, 0.5).tolist() == [True, False, True, True, False, False]


def test_ties_are_broken_by_position_and_the_count_stays_exact():
    weight = torch.ones(10)
    mask = sparsity_mask(weight, 0.3)
    assert mask.tolist() == [False] * 3 + [True] * 7


def test_already_pruned_weights_count_first_and_are_never_revived():
    weight = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    current = torch.tensor([False, True, True, True, True])  # the largest is already pruned
    mask = sparsity_mask(weight, 0.4, current)
    assert mask.tolist() == [False, True, True, True, False]


def test_std_rule_on_a_hand_made_tensor():
    """threshold = quality x std: std of [-2,-1,0,1,2] is sqrt(2.5) = 1.581 (unbiased)."""
    weight = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])
    assert std_threshold_mask(weight, 1.0).tolist() == [True, False, False, False, True]
    assert std_threshold_mask(weight, 0.5).tolist() == [True, True, False, True, True]
    assert std_threshold_mask(weight, 0.0).tolist() == [True, True, False, True, True]


def test_std_rule_uses_the_remaining_weights_when_iterating():
    weight = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0, 10.0])
    current = torch.tensor([True, True, True, True, True, False])
    # std over the five kept values is 1.581, so 10.0 (already pruned) does not inflate it.
    assert std_threshold_mask(weight, 1.0, current).tolist() == [True, False, False, False, True, False]


def test_global_masks_share_one_threshold():
    weights = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([0.5, 10.0])}
    masks = global_sparsity_masks(weights, 0.5)
    assert masks["a"].tolist() == [False, False, True, True]
    assert masks["b"].tolist() == [False, True]


def test_scores_mask_keeps_the_highest_scores():
    assert mask_from_scores(torch.tensor([3.0, 1.0, 2.0]), 2 / 3).tolist() == [True, False, False]


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_sparsity_is_named(sparsity):
    with pytest.raises(ConfigError, match="sparsity="):
        sparsity_mask(torch.ones(4), sparsity)


def test_negative_quality_is_named():
    with pytest.raises(ConfigError, match="quality=-1"):
        std_threshold_mask(torch.ones(4), -1)


def test_mask_of_the_wrong_shape_is_refused():
    with pytest.raises(ConfigError, match="current_mask"):
        sparsity_mask(torch.ones(4), 0.5, torch.ones(3, dtype=torch.bool))


def _sorted_mask(scores, sparsity, current_mask=None):
    """The sort-based rule the selection replaced: a stable float64 argsort, pruned first."""
    kept = torch.ones_like(scores, dtype=torch.bool) if current_mask is None else current_mask
    ranked = scores.flatten().double().clone()
    ranked[~kept.flatten()] = -float("inf")
    order = torch.argsort(ranked, stable=True)
    mask = torch.ones(scores.numel(), dtype=torch.bool)
    mask[order[: round(sparsity * scores.numel())]] = False
    return (mask & kept.flatten()).view_as(scores)


@pytest.mark.parametrize("seed", range(8))
def test_selection_gives_the_sort_based_masks_ties_included(seed):
    generator = torch.Generator().manual_seed(seed)
    shape = (37, 53)
    for scores in (
        torch.randn(shape, generator=generator).abs(),
        torch.randint(0, 6, shape, generator=generator).float(),  # many ties
        torch.randint(0, 3, shape, generator=generator).to(torch.float16),
    ):
        current = torch.rand(shape, generator=generator) > 0.3
        for sparsity in (0.0, 0.2, 0.5, 0.69, 0.9, 0.99):
            for mask in (None, current):
                expected = _sorted_mask(scores, sparsity, mask)
                got = mask_from_scores(scores, sparsity, mask)
                assert torch.equal(got, expected), (sparsity, scores.dtype, mask is None)
