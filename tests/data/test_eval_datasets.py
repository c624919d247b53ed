"""Held-out evaluation: eval datasets are scored by the eval loss and never sampled for training."""

from pathlib import Path

import pytest

from difftune.config import ConfigError, load_config
from difftune.config.schema import DatasetConfig, TrainConfig
from difftune.data.pipeline import prepare_training_data
from difftune.families.flow_matching import FlowMatchingObjective
from difftune.training.evaluation import Evaluator
from tests.config.helpers import IMAGES, TEXT, write_config
from tests.data.fakes import FakeFamily, fake_components, save_image


class FlowFake(FakeFamily):
    def objective(self, components):
        return FlowMatchingObjective()


def _folder(folder: Path, n: int, colour) -> None:
    for i in range(n):
        save_image(folder / f"{folder.name}_{i}.png", (64, 48), colour)
        (folder / f"{folder.name}_{i}.txt").write_text(f"{folder.name} {i}")


def _dataset(root: Path, name: str, **kwargs) -> DatasetConfig:
    return DatasetConfig(
        id=name,
        instance_data_dir=str(root / name),
        caption_strategy="textfile",
        resolution=32,
        resolution_type="pixel",
        cache_dir_vae=str(root / "vae" / name),
        **kwargs,
    )


def _prepare(root: Path, datasets, **train):
    config = TrainConfig(model_family="fake", **{"train_batch_size": 2, "seed": 5, **train})
    family = FlowFake(config)
    data = prepare_training_data(
        config, datasets, root / "text", family, fake_components(), "cpu", lambda kind, payload: None
    )
    return data, family, config


def _setup(root: Path) -> list[DatasetConfig]:
    _folder(root / "train", 6, (200, 10, 10))
    _folder(root / "held", 3, (10, 10, 200))
    _folder(root / "other", 3, (10, 200, 10))
    return [
        _dataset(root, "train"),
        _dataset(root, "held", dataset_type="eval"),
        _dataset(root, "other", dataset_type="eval"),
    ]


def test_the_eval_set_never_appears_in_a_training_batch_and_is_what_the_eval_loss_scores(tmp_path):
    data, family, config = _prepare(tmp_path, _setup(tmp_path), num_eval_images=10)
    trained = {
        str(data.plans[i].path)
        for epoch in range(4)
        for indices in data.sampler.epoch_batches(epoch)
        for i in indices
    }
    assert trained == {str(p) for p in (tmp_path / "train").glob("*.png")}
    held_out = {path for batch in data.held_out_batches for path in batch["paths"]}
    expected = {str(p) for name in ("held", "other") for p in (tmp_path / name).glob("*.png")}
    assert held_out == expected and not held_out & trained

    evaluator = Evaluator(family, fake_components(), data, config, "cpu")
    assert {p for batch in evaluator.eval_loss.batches for p in batch["paths"]} == expected


def test_eval_dataset_id_num_eval_images_and_eval_timesteps(tmp_path):
    data, family, config = _prepare(
        tmp_path, _setup(tmp_path), eval_dataset_id="other", num_eval_images=2, eval_timesteps=5
    )
    scored = [path for batch in data.held_out_batches for path in batch["paths"]]
    assert sorted(Path(p).name for p in scored) == ["other_0.png", "other_1.png"]
    assert sorted(c for batch in data.held_out_batches for c in batch["captions"]) == ["other 0", "other 1"]
    evaluator = Evaluator(family, fake_components(), data, config, "cpu")
    timesteps = evaluator.eval_loss.timesteps
    assert len(timesteps) == 5 and (timesteps[1:] > timesteps[:-1]).all()


def test_without_eval_datasets_the_eval_loss_scores_a_fixed_training_slice(tmp_path):
    data, family, config = _prepare(tmp_path, _setup(tmp_path)[:1], eval_batches=1)
    assert data.held_out_batches == []
    evaluator = Evaluator(family, fake_components(), data, config, "cpu")
    assert len(evaluator.eval_loss.batches) == 1


def test_eval_dataset_id_must_name_an_eval_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    held = {**IMAGES, "id": "held", "dataset_type": "eval"}
    path = write_config(tmp_path, {"model_family": "sdxl", "eval_dataset_id": "nope"}, [IMAGES, held, TEXT])
    with pytest.raises(
        ConfigError, match="eval_dataset_id 'nope' names no enabled dataset of dataset_type eval"
    ):
        load_config(path)
    path = write_config(tmp_path, {"model_family": "sdxl", "eval_dataset_id": "held"}, [IMAGES, held, TEXT])
    assert load_config(path).train.eval_dataset_id == "held"
