import importlib

import pytest

from difftune.config import ConfigError, flavour_hub_id, keys, load_config, parse_cli_overrides
from difftune.config.schema import TrainConfig
from difftune.families import REGISTRY


def test_every_family_has_defaults_and_flavours():
    assert set(keys.FAMILY_DEFAULTS) == set(REGISTRY) == set(keys.FLAVOURS) == set(keys.DEFAULT_FLAVOURS)
    for family, defaults in keys.FAMILY_DEFAULTS.items():
        assert set(defaults) <= set(TrainConfig.model_fields), family
        assert keys.DEFAULT_FLAVOURS[family] in keys.FLAVOURS[family]


@pytest.mark.parametrize("family", sorted(REGISTRY))
def test_tables_agree_with_the_family_classes(family):
    module_name, class_name = REGISTRY[family].split(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"{family} family not importable here: {exc}")
    assert cls.config_defaults == keys.FAMILY_DEFAULTS[family]
    assert cls.flavours == keys.FLAVOURS[family]
    assert cls.default_flavour == keys.DEFAULT_FLAVOURS[family]


def test_aliases_point_at_schema_or_original_keys():
    fields = set(TrainConfig.model_fields)
    for alias, target in keys.TRAIN_ALIASES.items():
        assert alias not in fields
        assert target in fields or target in keys.ORIGINAL_TRAIN_KEYS


def test_flavour_hub_ids():
    assert flavour_hub_id("sdxl") == "stabilityai/stable-diffusion-xl-base-1.0"
    assert flavour_hub_id("kandinsky5_image", "i2i-lite-pretrain") == (
        "kandinskylab/Kandinsky-5.0-I2I-Lite-pretrain-Diffusers"
    )
    assert flavour_hub_id("kandinsky5-video") == "kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers"
    assert flavour_hub_id("kandinsky5-video", "t2v-pro-pretrain-10s-hd") == (
        "kandinskylab/Kandinsky-5.0-T2V-Pro-pretrain-10s-Diffusers"
    )
    with pytest.raises(ConfigError, match="did you mean 't2i-lite-sft'"):
        flavour_hub_id("kandinsky5-image", "t2i-lite-stf")
    with pytest.raises(ConfigError, match="sdxl, kandinsky5-image, kandinsky5-video"):
        flavour_hub_id("flux")


def test_parse_cli_overrides_forms():
    argv = [
        "--learning_rate",
        "1e-4",
        "--model_family=kandinsky5-video",
        "--vae_enable_patch_conv=true",
        "--use_dora",
        "--noise_offset",
        "-0.1",
        "--seed",
        "1",
        "--seed",
        "2",
        "--validation_disable",
    ]
    assert parse_cli_overrides(argv) == {
        "learning_rate": "1e-4",
        "model_family": "kandinsky5-video",
        "vae_enable_patch_conv": "true",
        "use_dora": "true",
        "noise_offset": "-0.1",
        "seed": "2",
        "validation_disable": "true",
    }
    assert parse_cli_overrides([]) == {}
    with pytest.raises(ConfigError, match="unexpected argument 'train'"):
        parse_cli_overrides(["train"])


def test_cli_overrides_flow_into_load_config(workdir):
    from tests.config.helpers import write_config

    path = write_config(workdir, {"model_family": "sdxl"})
    loaded = load_config(
        path, parse_cli_overrides(["--report_to=wandb", "--push_to_hub", "--vae_cache_disable"])
    )
    assert loaded.train.report_to == "wandb"
    assert loaded.train.push_to_hub is True and loaded.train.vae_cache_disable is True
