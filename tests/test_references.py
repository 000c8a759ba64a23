"""The reference cache: trained once, then loaded."""

from __future__ import annotations

import dataclasses

import deepshrink.references as references
from deepshrink.models import get_model_spec
from deepshrink.train import TrainConfig


def test_reference_is_trained_once_then_loaded(tmp_path, small_data, monkeypatch):
    quick = dataclasses.replace(get_model_spec("lenet-300-100"), reference_training=TrainConfig(epochs=1))
    monkeypatch.setattr(references, "get_model_spec", lambda name: quick)
    first = references.reference_model("lenet-300-100", small_data, cache_dir=tmp_path, device="cpu", progress=False)
    second = references.reference_model("lenet-300-100", small_data, cache_dir=tmp_path, device="cpu", progress=False)
    assert not first.from_cache and second.from_cache
    assert first.path == second.path and first.path.is_relative_to(tmp_path)
    assert second.test_metric == first.test_metric > 0.5


def test_cache_key_changes_with_the_training_config(small_data, monkeypatch, tmp_path):
    before = references.reference_path("lenet-300-100", small_data, tmp_path)
    changed = dataclasses.replace(get_model_spec("lenet-300-100"), reference_training=TrainConfig(epochs=2))
    monkeypatch.setattr(references, "get_model_spec", lambda name: changed)
    assert references.reference_path("lenet-300-100", small_data, tmp_path) != before


def test_cache_key_changes_with_the_model_revision(small_data, monkeypatch, tmp_path):
    spec = get_model_spec("lenet-300-100")
    assert spec.revision == 0  # an unrevised model keeps the key it always had
    before = references.reference_path("lenet-300-100", small_data, tmp_path)
    revised = dataclasses.replace(spec, revision=1)
    monkeypatch.setattr(references, "get_model_spec", lambda name: revised)
    assert references.reference_path("lenet-300-100", small_data, tmp_path) != before
