"""Checks made before the model load: a dataset that cannot train is refused in seconds, not minutes."""

import pytest

from difftune.config.schema import DatasetConfig
from difftune.data.errors import DataError
from difftune.testing.images import make_image_dataset
from difftune.training.setup import check_dataset_folders


def _dataset(folder, **settings) -> DatasetConfig:
    return DatasetConfig(id="photos", instance_data_dir=str(folder), caption_strategy="textfile", **settings)


def test_a_folder_without_images_is_refused(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError) as error:
        check_dataset_folders([_dataset(tmp_path / "photos")])
    assert "dataset 'photos'" in str(error.value) and "holds no image files" in str(error.value)


def test_textfile_captions_with_no_txt_at_all_are_refused_with_the_alternatives(tmp_path):
    folder = tmp_path / "photos"
    make_image_dataset(folder, n=3)
    for caption in folder.glob("*.txt"):
        caption.unlink()
    with pytest.raises(DataError) as error:
        check_dataset_folders([_dataset(folder)])
    message = str(error.value)
    assert "none of the 3 files" in message and "caption_strategy to filename" in message

    (folder / sorted(folder.glob("*.png"))[0].with_suffix(".txt").name).write_text("a red square")
    check_dataset_folders([_dataset(folder)])  # one caption is enough; the rest fall back with a warning
    check_dataset_folders([_dataset(folder, disabled=True), _dataset(tmp_path / "nowhere", disabled=True)])


def _k5_folder(tmp_path, blocks: int):
    folder = tmp_path / "k5"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text(f'{{"num_visual_blocks": {blocks}}}')
    return folder


def test_block_indices_out_of_range_are_refused_before_the_model_load(tmp_path):
    from difftune.config.schema import TrainConfig
    from difftune.errors import ConfigError
    from difftune.families import get_family
    from difftune.training.setup import check_block_indices

    folder = _k5_folder(tmp_path, blocks=4)
    route = {"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": 6}
    config = TrainConfig(
        model_family="kandinsky5-image",
        pretrained_model_name_or_path=str(folder),
        tread_config={"routes": [route]},
    )
    with pytest.raises(ConfigError, match=r"end_layer_idx is 6, outside the model's 4 transformer blocks"):
        check_block_indices(get_family(config), config)

    config = TrainConfig(
        model_family="kandinsky5-video", pretrained_model_name_or_path=str(folder), crepa_enabled=True
    )
    with pytest.raises(ConfigError, match=r"'crepa_block_index' is 8, but .* has 4 transformer blocks"):
        check_block_indices(get_family(config), config)
    fitting = config.model_copy(update={"crepa_block_index": -4})
    check_block_indices(get_family(fitting), fitting)
