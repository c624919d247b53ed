"""lycoris_config files in the original tool's format: read and checked when the config loads, no weights needed."""

import json

import pytest

from difftune.config import ConfigError, load_config
from tests.config.helpers import write_config

# The original tool's documented example, unchanged.
DOCUMENTED = {
    "algo": "lokr",
    "multiplier": 1.0,
    "linear_dim": 10000,
    "linear_alpha": 1,
    "factor": 10,
    "apply_preset": {
        "target_module": ["Attention", "FeedForward"],
        "module_algo_map": {"Attention": {"factor": 10}, "FeedForward": {"factor": 4}},
    },
}
RUN = {
    "model_family": "sdxl",
    "model_type": "lora",
    "lora_type": "lycoris",
    "lycoris_config": "config/lycoris.json",
}


def write_lycoris(workdir, settings, **config):
    path = write_config(workdir, {**RUN, **config})
    (workdir / "config" / "lycoris.json").write_text(
        json.dumps(settings) if isinstance(settings, dict) else settings
    )
    return path


def refused(path, **overrides) -> str:
    with pytest.raises(ConfigError) as error:
        load_config(path, overrides or None)
    return str(error.value)


def test_the_documented_example_loads_as_a_lycoris_run(workdir):
    loaded = load_config(write_lycoris(workdir, DOCUMENTED))
    assert loaded.train.model_type == "lycoris" and loaded.train.lycoris_config == "config/lycoris.json"


@pytest.mark.parametrize("algo", ["lokr", "loha", "locon", "lora", "full"])
def test_model_type_lycoris_is_accepted_for_every_algorithm(workdir, algo):
    path = write_lycoris(workdir, {**DOCUMENTED, "algo": algo}, model_type="lycoris")
    assert load_config(path).train.model_type == "lycoris"


def test_a_missing_file_names_the_key_and_the_path(workdir):
    path = write_config(workdir, RUN)
    message = refused(path)
    assert "config/lycoris.json" in message and "lycoris_config" in message


def test_a_required_key_missing_is_named(workdir):
    settings = {k: v for k, v in DOCUMENTED.items() if k != "linear_dim"}
    message = refused(write_lycoris(workdir, settings))
    assert "config/lycoris.json" in message and "'linear_dim' is required" in message


def test_an_algorithm_difftune_does_not_train_is_refused_with_the_ones_it_does(workdir):
    message = refused(write_lycoris(workdir, {**DOCUMENTED, "algo": "boft"}))
    assert "'algo' is 'boft'" in message and "lokr, loha, locon" in message


def test_a_misspelt_preset_key_gets_the_nearest_name(workdir):
    settings = {**DOCUMENTED, "apply_preset": {"target_modules": ["Attention"]}}
    message = refused(write_lycoris(workdir, settings))
    assert "'apply_preset.target_modules'" in message and "did you mean 'target_module'?" in message


def test_an_override_key_lycoris_would_ignore_is_refused_with_its_name(workdir):
    preset = {"target_module": ["Attention"], "module_algo_map": {"Attention": {"linear_dim": 8}}}
    message = refused(write_lycoris(workdir, {**DOCUMENTED, "apply_preset": preset}))
    assert "apply_preset.module_algo_map.Attention.linear_dim" in message and "'dim'" in message


def test_a_wrong_value_names_the_key(workdir):
    message = refused(write_lycoris(workdir, {**DOCUMENTED, "linear_dim": "many"}))
    assert "config/lycoris.json" in message and "'linear_dim' is 'many'" in message


def test_not_json_names_the_file_and_line(workdir):
    message = refused(write_lycoris(workdir, '{"algo": "lokr",\n}'))
    assert "config/lycoris.json, line 2" in message


def test_full_on_a_quantised_base_is_refused(workdir):
    message = refused(
        write_lycoris(workdir, {**DOCUMENTED, "algo": "full"}, base_model_precision="int8-quanto")
    )
    assert "'full'" in message and "base_model_precision" in message


def test_bypass_off_on_a_quantised_base_is_refused(workdir):
    path = write_lycoris(workdir, {**DOCUMENTED, "bypass_mode": False}, base_model_precision="int8-torchao")
    assert "bypass_mode" in refused(path)


def test_use_dora_points_to_dora_wd(workdir):
    assert "dora_wd" in refused(write_lycoris(workdir, DOCUMENTED, use_dora=True))


def test_comfyui_format_is_a_warning_because_the_file_already_is_in_lycoris_layout(workdir):
    loaded = load_config(write_lycoris(workdir, DOCUMENTED, lora_format="comfyui"))
    assert any("lora_format comfyui" in warning for warning in loaded.warnings)


def test_full_under_fsdp2_is_refused(workdir):
    message = refused(write_lycoris(workdir, {**DOCUMENTED, "algo": "full"}, fsdp_enable=True))
    assert "'full'" in message and "fsdp_enable" in message
