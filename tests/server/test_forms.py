import pytest

from difftune.config import load_config
from difftune.errors import ConfigError
from difftune.server.forms import check_train, normalize_keys, validate_datasets, validate_train
from tests.config.test_quickstarts import K5_IMAGE_BASE


def test_form_accepts_the_same_spellings_as_the_loader():
    raw = {
        "--model_family": "kandinsky5-image",
        "flux_schedule_shift": "2.5",
        "use_gradient_checkpointing": "false",
    }
    assert normalize_keys(raw) == {
        "model_family": "kandinsky5-image",
        "flow_schedule_shift": "2.5",
        "gradient_checkpointing": "false",
    }
    values, errors = validate_train(raw)
    assert errors == [] and values["flow_schedule_shift"] == 2.5 and values["gradient_checkpointing"] is False


def _loader_message(tmp_path, document: dict) -> str:
    import json

    (tmp_path / "config.json").write_text(json.dumps(document))
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "config.json")
    return str(caught.value).removeprefix(f"{tmp_path / 'config.json'}: ")


def test_a_quickstart_config_train_accepts_is_accepted_with_the_loaders_warnings():
    document = {
        **K5_IMAGE_BASE,
        "--lora_type": "standard",
        "--learning_rate": "1e-4",
        "disable_tf32": True,  # the original tool's, cannot change the weights: a warning
        "offset_noise": "true",  # the original tool's switch: noise_offset 0.1
    }
    config, errors, warnings = check_train(document)
    assert errors == []
    assert config["model_family"] == "kandinsky5-image" and config["learning_rate"] == 1e-4
    assert config["noise_offset"] == 0.1 and "lora_type" not in config
    assert any("'disable_tf32'" in w and "ignores" in w for w in warnings), warnings


def test_flow_shift_on_a_diffusion_model_is_refused_as_train_refuses_it(tmp_path):
    document = {"model_family": "sdxl", "flow_schedule_shift": "2.5"}
    _, errors = validate_train(document)
    assert [e["key"] for e in errors] == ["flow_schedule_shift"] and errors[0]["value"] == "2.5"
    assert errors[0]["message"] == _loader_message(tmp_path, document)


def test_a_refused_original_key_is_refused_with_the_loaders_message(tmp_path):
    document = {"model_family": "sdxl", "variant": "fp16"}
    _, errors = validate_train(document)
    assert [e["key"] for e in errors] == ["variant"] and errors[0]["value"] == "fp16"
    assert errors[0]["message"] == _loader_message(tmp_path, document)
    assert "remove it" in errors[0]["message"]


def test_datasets_take_the_loaders_key_path(tmp_path):
    import json

    from difftune.config.original_keys import DATASET_KEYS

    entry = {
        "id": "cats",
        "type": "local",
        "instance_data_dir": "data",
        "--disable": True,
        "resolution": "64",
    }
    entries, errors = validate_datasets([entry])
    assert errors == [] and entries[0]["disabled"] is True and entries[0]["resolution"] == 64

    refused = {"id": "cats", "type": "local", "instance_data_dir": "data", "max_num_samples": 5}
    _, errors = validate_datasets([refused])
    assert [e["key"] for e in errors] == ["0.max_num_samples"] and errors[0]["value"] == 5
    assert DATASET_KEYS["max_num_samples"].instead in errors[0]["message"]
    (tmp_path / "data.json").write_text(json.dumps([refused]))
    (tmp_path / "config.json").write_text(
        json.dumps({"model_family": "sdxl", "data_backend_config": str(tmp_path / "data.json")})
    )
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "config.json")
    assert str(caught.value).endswith(errors[0]["message"])  # the loader's own words


def test_a_bad_dataset_value_gets_the_loaders_message_and_its_key(tmp_path):
    import json

    bad = {"id": "clips", "instance_data_dir": "d", "dataset_type": "video", "video": {"num_frames": "x"}}
    _, errors = validate_datasets([bad])
    assert [e["key"] for e in errors] == ["0.video.num_frames"]
    (tmp_path / "data.json").write_text(json.dumps([bad]))
    (tmp_path / "config.json").write_text(
        json.dumps({"model_family": "kandinsky5-video", "data_backend_config": str(tmp_path / "data.json")})
    )
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "config.json")
    assert str(caught.value).endswith(errors[0]["message"])
