"""type huggingface: a datasets dataset saved to a local folder trains like a folder of files."""

from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict, Features, Image, Value

from difftune.config.schema import DatasetConfig, TrainConfig
from difftune.data.errors import DataError
from difftune.data.pipeline import prepare_training_data
from tests.data.fakes import FakeFamily, fake_components, save_image


def _saved(tmp_path: Path, rows: int = 4) -> Path:
    """A DatasetDict with a train split of PNG and JPEG images, captions in a nested column."""
    files = []
    for i in range(rows):
        files.append(
            str(
                save_image(tmp_path / "src" / f"pic{i}.{'png' if i % 2 else 'jpg'}", (48, 32), (40 * i, 0, 0))
            )
        )
    table = {
        "image": files,
        "meta": [{"caption": f"a picture number {i}" if i != 2 else ""} for i in range(rows)],
        "tags": [f"tag{i}" for i in range(rows)],
    }
    features = Features({"image": Image(), "meta": {"caption": Value("string")}, "tags": Value("string")})
    folder = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_dict(table, features=features)}).save_to_disk(str(folder))
    return folder


def _dataset(tmp_path: Path, folder: Path, **settings) -> DatasetConfig:
    return DatasetConfig(
        id="hub",
        type="huggingface",
        dataset_name=str(folder),
        caption_column="meta.caption",
        fallback_caption_column="tags",
        instance_data_dir=str(tmp_path / "rows"),
        resolution=32,
        resolution_type="pixel",
        cache_dir_vae=str(tmp_path / "vae"),
        **settings,
    )


def _prepare(tmp_path: Path, dataset: DatasetConfig):
    config = TrainConfig(model_family="fake", train_batch_size=2, seed=1)
    family = FakeFamily(config)
    data = prepare_training_data(
        config, [dataset], tmp_path / "text", family, fake_components(), "cpu", lambda kind, payload: None
    )
    return data, family


def test_rows_of_a_saved_dataset_train_with_their_captions(tmp_path):
    folder = _saved(tmp_path)
    data, family = _prepare(tmp_path, _dataset(tmp_path, folder))
    by_name = {Path(p.path).name: c for p, c in zip(data.plans, data.captions)}
    assert by_name == {
        "00000000.jpg": ["a picture number 0"],
        "00000001.png": ["a picture number 1"],
        "00000002.jpg": ["tag2"],  # empty caption: the fallback column
        "00000003.png": ["a picture number 3"],
    }
    batch = data.load_batch([0, 1])
    assert batch["latents"].shape[0] == 2 and set(batch["captions"]) <= {c[0] for c in by_name.values()}
    # a second run rewrites nothing, so no latent is encoded again
    _, again = _prepare(tmp_path, _dataset(tmp_path, folder))
    assert again.encoded_images == 0


def test_a_missing_column_or_split_names_the_fix(tmp_path):
    folder = _saved(tmp_path, rows=2)
    with pytest.raises(DataError, match="has no column 'picture' .* set image_column"):
        _prepare(tmp_path, _dataset(tmp_path, folder, image_column="picture"))
    with pytest.raises(DataError, match="has no split 'validation' \\(splits: train\\)"):
        _prepare(tmp_path, _dataset(tmp_path, folder, split="validation"))
    with pytest.raises(DataError, match="dataset_name '.*nowhere' could not be loaded"):
        _prepare(tmp_path, _dataset(tmp_path, tmp_path / "nowhere"))


def test_filters_and_composite_images_are_refused():
    with pytest.raises(ValueError, match="huggingface.composite_image_config is not built"):
        DatasetConfig(
            id="x",
            type="huggingface",
            dataset_name="a/b",
            huggingface={"composite_image_config": {"enabled": True}},
        )


def test_the_original_tools_example_entry_loads(tmp_path, monkeypatch):
    from difftune.config import load_config
    from tests.config.helpers import TEXT, write_config

    monkeypatch.chdir(tmp_path)
    entry = {
        "id": "my-hf-dataset",
        "type": "huggingface",
        "dataset_name": "username/dataset-name",
        "split": "train",
        "caption_strategy": "huggingface",
        "metadata_backend": "huggingface",
        "caption_column": "text",
        "image_column": "image",
        "huggingface": {"caption_column": "caption", "width_column": "width", "height_column": "height"},
    }
    loaded = load_config(write_config(tmp_path, {"model_family": "sdxl"}, [entry, TEXT]))
    dataset = loaded.datasets[0]
    assert (dataset.type, dataset.dataset_name, dataset.huggingface.caption_column) == (
        "huggingface",
        "username/dataset-name",
        "caption",
    )


def test_a_video_dataset_takes_its_clips_from_the_video_column(tmp_path):
    from datasets import Video

    from difftune.testing.videos import make_video
    from tests.data.video_fakes import FakeVideoFamily

    clips = [str(make_video(tmp_path / "src" / f"clip{i}.mp4", frames=9, seed=i)) for i in range(2)]
    table = {"clip": clips, "description": ["waves", "a road"]}
    features = Features({"clip": Video(decode=False), "description": Value("string")})
    Dataset.from_dict(table, features=features).save_to_disk(str(tmp_path / "saved"))
    dataset = DatasetConfig(
        id="clips",
        type="huggingface",
        dataset_type="video",
        dataset_name=str(tmp_path / "saved"),
        huggingface={"video_column": "clip", "caption_column": "description", "num_frames_column": "frames"},
        instance_data_dir=str(tmp_path / "rows"),
        resolution=32,
        resolution_type="pixel",
        cache_dir_vae=str(tmp_path / "vae"),
        video={"num_frames": 5},
    )
    config = TrainConfig(model_family="fake", train_batch_size=2, seed=1)
    data = prepare_training_data(
        config,
        [dataset],
        tmp_path / "text",
        FakeVideoFamily(config),
        fake_components(),
        "cpu",
        lambda k, p: None,
    )
    assert sorted(Path(p.path).name for p in data.plans) == ["00000000.mp4", "00000001.mp4"]
    assert sorted(c[0] for c in data.captions) == ["a road", "waves"]
    assert data.load_batch([0, 1])["latents"].ndim == 5
