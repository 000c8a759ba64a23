"""Distillation against an ensemble of trained copies (teachers.py), through the recipe and run()."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

import deepshrink.references as references
from deepshrink.checkpoint import load_checkpoint, save_checkpoint
from deepshrink.data import make_loader
from deepshrink.errors import CheckpointError, ConfigError, ModelError
from deepshrink.models import build_model, get_model_spec
from deepshrink.pipeline import run
from deepshrink.recipe import parse_recipe, recipe_from_dict
from deepshrink.stages import Loaders
from deepshrink.teachers import Ensemble, TeacherSettings, build_teacher
from deepshrink.train import TrainConfig, evaluate, fit

# One round of pruning, retrained only against the teacher's soft targets (alpha 1), so that what
# the teacher says is all the retraining learns.
DISTILLED = {
    "model": "lenet-300-100",
    "data": {"test_subset": 2000},
    "prune": {"sparsity": {"fc*": 0.5}, "rounds": 1, "retrain_epochs": 1, "distill": {"alpha": 1.0}},
}


@pytest.fixture(scope="module")
def trained(small_data):
    """LeNet-300-100 after one epoch on 5,000 images (seed 0)."""
    torch.manual_seed(0)
    model = build_model("lenet-300-100")
    fit(model, make_loader(small_data.train, 128, shuffle=True, seed=0), TrainConfig(epochs=1), progress=False)
    return model


def test_ensemble_is_the_mean_of_its_members_in_float64():
    members = [nn.Linear(6, 4) for _ in range(3)]
    inputs = torch.randn(5, 6)
    expected = torch.stack([member.double()(inputs.double()) for member in members]).mean(0)
    for member in members:
        member.float()
    ensemble = Ensemble(members)
    assert torch.allclose(ensemble(inputs).double(), expected, atol=1e-6)
    assert not any(parameter.requires_grad for parameter in ensemble.parameters())


def test_ensemble_stays_in_eval_mode_so_its_dropout_never_draws():
    ensemble = Ensemble([nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 2)) for _ in range(2)])
    ensemble.train()
    inputs = torch.randn(8, 4)
    assert not ensemble.training and torch.equal(ensemble(inputs), ensemble(inputs))


def test_members_of_different_output_shapes_are_refused():
    with pytest.raises(ModelError, match=r"different shapes \(\(2, 3\), \(2, 4\)\)"):
        Ensemble([nn.Linear(5, 3), nn.Linear(5, 4)])(torch.randn(2, 5))


def test_a_teacher_section_that_changes_nothing_is_refused():
    with pytest.raises(ConfigError, match="the reference alone, the default"):
        TeacherSettings()


def test_a_teacher_without_a_stage_that_distills_names_its_line():
    text = "model: lenet-300-100\nprune: {sparsity: {fc*: 0.5}}\nteacher: {references: 3}\n"
    with pytest.raises(ConfigError, match=r"recipe.yaml:3: teacher: no stage distills"):
        parse_recipe(text, "recipe.yaml")


def test_the_recipe_records_its_teacher_and_reads_it_back():
    recipe = recipe_from_dict(DISTILLED | {"teacher": {"references": 3}})
    assert recipe.teacher == TeacherSettings(references=3)
    assert recipe.to_dict()["teacher"] == {"references": 3}  # what report.json and a file's header record
    assert recipe_from_dict(DISTILLED | {"teacher": recipe.to_dict()["teacher"]}).teacher == recipe.teacher
    assert "teacher" not in recipe_from_dict(DISTILLED).to_dict()  # earlier recipes' keys stay as they were


def test_another_seed_is_another_cached_reference(small_data, tmp_path):
    default = references.reference_path("lenet-300-100", small_data, tmp_path)
    own_seed = get_model_spec("lenet-300-100").reference_training.seed
    assert references.reference_path("lenet-300-100", small_data, tmp_path, seed=own_seed) == default
    assert references.reference_path("lenet-300-100", small_data, tmp_path, seed=own_seed + 1) != default


def test_a_missing_checkpoint_is_named_before_any_member_trains(trained, small_data, tmp_path, monkeypatch):
    def no_training(*arguments, **keywords):
        raise AssertionError("a member trained before the checkpoints were read")

    monkeypatch.setattr(references, "reference_model", no_training)
    settings = TeacherSettings(references=3, checkpoints=[str(tmp_path / "missing.safetensors")])
    with pytest.raises(CheckpointError, match=r"teacher: checkpoints: .*missing.safetensors: no such checkpoint file"):
        build_teacher(settings, trained, "lenet-300-100", small_data)


def test_trained_members_need_a_registered_model(trained, small_data):
    with pytest.raises(ConfigError, match="'my-mlp' is not one; list your other trained copies"):
        build_teacher(TeacherSettings(references=2), trained, "my-mlp", small_data)


def test_a_constant_teacher_given_to_run_is_what_retraining_learns(tmp_path, small_data, trained):
    """Distilled at alpha 1 against a teacher that always says class 3, the pruned network says
    class 3 too; against the reference (the default), it keeps the reference's accuracy. The
    teacher is part of the stage's cache key, so the second run does not reuse the first's."""

    class Constant(nn.Module):
        def forward(self, inputs):
            logits = torch.zeros(len(inputs), 10)
            logits[:, 3] = 10.0
            return logits

    own = run(trained, DISTILLED, small_data, run_dir=tmp_path / "run", progress=False)
    constant = run(trained, DISTILLED, small_data, run_dir=tmp_path / "run", progress=False, teacher=Constant())
    assert own.compressed_metric > 0.6
    assert not constant.stages[0].cached and constant.stages[0].key != own.stages[0].key
    assert constant.compressed_metric < 0.2  # about the share of class 3 in the test split
    assert own.teacher is None and constant.teacher["members"] is None
    assert "distillation retrained against the teacher given to run()" in (tmp_path / "run" / "report.md").read_text()
    without_distill = DISTILLED | {"prune": {"sparsity": {"fc*": 0.5}, "rounds": 1, "retrain_epochs": 1}}
    with pytest.raises(ConfigError, match="no stage of the recipe distills"):
        run(trained, without_distill, small_data, run_dir=tmp_path / "x", teacher=Constant())
    with pytest.raises(ConfigError, match="keep one"):
        run(trained, DISTILLED | {"teacher": {"references": 2}}, small_data, run_dir=tmp_path / "x", teacher=Constant())


def test_checkpoints_and_trained_references_make_the_recipe_teacher(tmp_path, small_data, trained, monkeypatch):
    """`teacher: {references: 2, checkpoints: [FILE]}`: the reference, one copy trained by the
    registered settings at seed 1 (cached), and the user's other checkpoint, averaged. The report
    gives the mean of three and the ensemble's own test accuracy."""
    quick = dataclasses.replace(get_model_spec("lenet-300-100"), reference_training=TrainConfig(epochs=1))
    monkeypatch.setattr(references, "get_model_spec", lambda name: quick)
    monkeypatch.setenv("DEEPSHRINK_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(5)
    other = build_model("lenet-300-100")
    fit(other, make_loader(small_data.train, 128, shuffle=True, seed=5), TrainConfig(epochs=1), progress=False)
    save_checkpoint(tmp_path / "other.safetensors", other, model_name="lenet-300-100")
    recipe = DISTILLED | {"teacher": {"references": 2, "checkpoints": [str(tmp_path / "other.safetensors")]}}

    result = run(trained, recipe, small_data, run_dir=tmp_path / "run", progress=False)

    seed_one = references.reference_model("lenet-300-100", small_data, seed=1, progress=False)
    assert seed_one.from_cache  # trained by the run, at seed 1, and cached
    test = Loaders.from_splits(small_data, 2000).test
    ensemble_metric = evaluate(Ensemble([trained, other, seed_one.model]), test).metric
    members_metrics = [evaluate(member, test).metric for member in (trained, seed_one.model, other)]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["teacher"] == {"members": 3, "metric": ensemble_metric} == result.teacher
    assert ensemble_metric > min(members_metrics)
    assert "the mean of 3 trained copies of the model" in (tmp_path / "run" / "report.md").read_text()


def test_a_single_stage_distils_from_the_teacher_it_is_given(tmp_path, small_data, trained):
    """`deepshrink prune --distill --teacher-checkpoints FILE` (run_stage_on_checkpoint's teacher):
    the stage retrains against the mean of the checkpoint and FILE. FILE here answers class 3 by
    a margin of 100 whatever the input, so the mean does too, and a stage retrained only against
    it (alpha 1) forgets the task, where the checkpoint alone as the teacher keeps it."""
    from deepshrink.pipeline import run_stage_on_checkpoint
    from deepshrink.settings import DistillSettings
    from deepshrink.stages.prune import PruneSettings

    checkpoint = save_checkpoint(tmp_path / "trained.safetensors", trained, model_name="lenet-300-100")
    constant = build_model("lenet-300-100")
    with torch.no_grad():
        constant.fc3.weight.zero_()
        constant.fc3.bias.copy_(100.0 * (torch.arange(10) == 3))
    save_checkpoint(tmp_path / "constant.safetensors", constant, model_name="lenet-300-100")
    settings = PruneSettings(sparsity={"fc*": 0.5}, rounds=1, retrain_epochs=1, distill=DistillSettings(alpha=1.0))

    def stage(teacher, name):
        return run_stage_on_checkpoint(
            checkpoint, settings, small_data, tmp_path / name, teacher=teacher, progress=False, device="cpu"
        )

    alone = stage(None, "alone.safetensors")
    misled = stage(TeacherSettings(checkpoints=[str(tmp_path / "constant.safetensors")]), "misled.safetensors")
    assert alone.metric > 0.6 and misled.metric < 0.2, (alone.metric, misled.metric)
    test = Loaders.from_splits(small_data).test
    metadata = load_checkpoint(misled.path).metadata
    assert metadata["teacher"] == {"members": 2, "metric": evaluate(Ensemble([trained, constant]), test).metric}
    assert "teacher" not in load_checkpoint(alone.path).metadata


def test_a_single_stage_teacher_needs_a_stage_that_distills_and_data(tmp_path, trained):
    from deepshrink.pipeline import run_stage_on_checkpoint
    from deepshrink.settings import DistillSettings
    from deepshrink.stages.prune import PruneSettings

    checkpoint = save_checkpoint(tmp_path / "trained.safetensors", trained, model_name="lenet-300-100")
    teacher = TeacherSettings(references=3)
    with pytest.raises(ConfigError, match="does not distill, so none would use it: add --distill"):
        run_stage_on_checkpoint(checkpoint, PruneSettings(), None, tmp_path / "a.safetensors", teacher=teacher)
    with pytest.raises(ConfigError, match="without data nothing retrains"):
        settings = PruneSettings(distill=DistillSettings())
        run_stage_on_checkpoint(checkpoint, settings, None, tmp_path / "b.safetensors", teacher=teacher)
