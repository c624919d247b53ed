"""Top-level keys are the defaults of every dataset that does not set its own; placeholders expand."""

from difftune.config import load_config
from tests.config.helpers import IMAGES, TEXT, write_config

SDXL = {"model_family": "sdxl", "output_dir": "out/run"}


def test_top_level_keys_fill_the_datasets_that_do_not_set_them(workdir):
    config = {
        **SDXL,
        "resolution": 1.0,
        "resolution_type": "area",
        "minimum_image_size": 0.5,
        "maximum_image_size": 2.0,
        "target_downsample_size": 1.5,
        "caption_strategy": "instance_prompt",
        "instance_prompt": "sks dog",
        "crop": True,
        "crop_style": "center",
        "cache_dir_vae": "cache/vae/{model_family}/{id}",
        "cache_dir_text": "cache/text/{model_family}",
    }
    own = {"id": "own", "instance_data_dir": "b", "resolution": 512, "resolution_type": "pixel"}
    plain = {"id": "plain", "instance_data_dir": "a"}
    text = {"id": "text-embeds", "dataset_type": "text_embeds", "default": True}
    loaded = load_config(write_config(workdir, config, [plain, own, text]))
    plain_ds, own_ds, text_ds = loaded.all_datasets
    assert (plain_ds.resolution, plain_ds.resolution_type, plain_ds.minimum_image_size) == (1.0, "area", 0.5)
    assert (plain_ds.maximum_image_size, plain_ds.target_downsample_size) == (2.0, 1.5)
    assert (plain_ds.caption_strategy, plain_ds.instance_prompt) == ("instanceprompt", "sks dog")
    assert (plain_ds.crop, plain_ds.crop_style) == (True, "center")
    assert plain_ds.cache_dir_vae == "cache/vae/sdxl/plain"
    assert (own_ds.resolution, own_ds.resolution_type, own_ds.cache_dir_vae) == (
        512,
        "pixel",
        "cache/vae/sdxl/own",
    )
    assert text_ds.cache_dir == "cache/text/sdxl" and text_ds.resolution is None
    assert loaded.warnings == []


def test_without_top_level_keys_datasets_keep_their_own_defaults(workdir):
    loaded = load_config(write_config(workdir, SDXL))
    dataset = loaded.datasets[0]
    assert (dataset.resolution, dataset.resolution_type, dataset.caption_strategy) == (
        None,
        "pixel_area",
        "textfile",
    )
    assert dataset.cache_dir_vae is None and loaded.text_embeds_dataset.cache_dir == TEXT["cache_dir"]


def test_placeholders_of_the_original_examples_expand_in_dataset_paths(workdir, monkeypatch):
    monkeypatch.setenv("DIFFTUNE_TEST_ROOT", "/data")
    images = {
        **IMAGES,
        "instance_data_dir": "{env:DIFFTUNE_TEST_ROOT}/images",
        "cache_dir_vae": "{output_dir}/cache/vae/{model_family}/{id}",
    }
    text = {**TEXT, "cache_dir": "cache/text/{model_family}/{unknown}"}
    loaded = load_config(
        write_config(workdir, {"model_family": "kandinsky5_image", "output_dir": "o"}, [images, text])
    )
    dataset = loaded.datasets[0]
    assert dataset.instance_data_dir == "/data/images"
    assert dataset.cache_dir_vae == "o/cache/vae/kandinsky5-image/my-images"
    assert loaded.text_embeds_dataset.cache_dir == "cache/text/kandinsky5-image/{unknown}"


def test_caption_settings_load_per_dataset(workdir):
    import pytest

    from difftune.config import ConfigError

    config = {**SDXL, "only_instance_prompt": True, "instance_prompt": "sks"}
    images = {**IMAGES, "caption_shuffle": "true", "caption_dropout_probability": 0.2}
    dataset = load_config(write_config(workdir, config, [images, TEXT])).datasets[0]
    assert dataset.only_instance_prompt and dataset.instance_prompt == "sks"
    assert dataset.caption_shuffle.enable and dataset.caption_dropout_probability == 0.2
    with pytest.raises(ConfigError, match="only_instance_prompt needs instance_prompt"):
        load_config(write_config(workdir, SDXL, [{**IMAGES, "only_instance_prompt": True}, TEXT]))
