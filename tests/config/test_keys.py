import pytest

from difftune.config import ConfigError, keys, load_config, parse_cli_overrides
from difftune.config.schema import TrainConfig


def test_aliases_point_at_schema_or_original_keys():
    fields = set(TrainConfig.model_fields)
    for alias, target in keys.TRAIN_ALIASES.items():
        assert alias not in fields
        assert target in fields or target in keys.ORIGINAL_TRAIN_KEYS


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
