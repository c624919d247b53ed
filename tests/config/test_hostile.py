"""Hostile and unlucky settings files: each ends in a ConfigError naming the file and key, or a warning.

Every value here once passed validation and then crashed, hung or trained on something else. A
case must end within its time limit in a clear message, never in another exception or a hang.
"""

import json

import pytest

from difftune.config import ConfigError, load_config
from tests.config.helpers import IMAGES, TEXT, write_config
from tests.timeout import run_within

SDXL = {"model_family": "sdxl", "model_type": "lora"}
NESTED = "[" * 100_000 + "]" * 100_000

# (case, settings added to config.json, what the message must say)
TRAIN_CASES = [
    ("seed-negative", {"seed": -1}, r"'seed' is -1, but it must be at least 0"),
    ("seed-too-big", {"seed": 2**32}, r"'seed' is 4294967296, but it must be at most 4294967295"),
    ("validation-seed-negative", {"validation_seed": "-5"}, r"'validation_seed' is '-5'"),
    ("beta1-five", {"adam_beta1": 5}, r"'adam_beta1' is 5, but it must be less than 1"),
    ("beta2-one", {"adam_beta2": "1.0"}, r"'adam_beta2' is '1.0', but it must be less than 1"),
    ("epsilon-negative", {"adam_epsilon": -1e-8}, r"'adam_epsilon' is -1e-08, but it must be at least 0"),
    (
        "weight-decay-negative",
        {"adam_weight_decay": -0.1},
        r"'adam_weight_decay' is -0.1, but it must be at least 0",
    ),
    (
        "learning-rate-infinity",
        {"learning_rate": float("inf")},
        r"'learning_rate' is inf, but it must be a finite number",
    ),
    (
        "learning-rate-infinity-text",
        {"learning_rate": "Infinity"},
        r"'learning_rate' is 'Infinity', but it must be a finite",
    ),
    (
        "learning-rate-nan",
        {"learning_rate": "NaN"},
        r"'learning_rate' is 'NaN', but it must be a finite number",
    ),
    (
        "guidance-nan",
        {"validation_guidance": float("nan")},
        r"'validation_guidance' is nan, but it must be a finite",
    ),
    (
        "resolution-negative",
        {"validation_resolution": "-64x64"},
        r"'validation_resolution'.*'-64x64' is not a usable size",
    ),
    (
        "resolution-zero",
        {"validation_resolution": "0x0"},
        r"'validation_resolution'.*'0x0' is not a usable size",
    ),
    (
        "resolution-huge",
        {"validation_resolution": "1024x1e9"},
        r"'validation_resolution'.*each side must be from 1 to 16384",
    ),
    ("resolution-boolean", {"validation_resolution": True}, r"'validation_resolution' is true"),
    ("lora-rank-huge", {"lora_rank": 1e9}, r"'lora_rank' is 1000000000.0, but it must be at most 4096"),
    ("lora-alpha-zero", {"lora_alpha": 0}, r"'lora_alpha' is 0, but it must be greater than 0"),
    (
        "max-steps-true",
        {"max_train_steps": True},
        r"'max_train_steps' is true, but it must be a number, not true or false",
    ),
    ("max-steps-false", {"max_train_steps": False}, r"'max_train_steps' is false, but it must be a number"),
    ("batch-size-true", {"train_batch_size": True}, r"'train_batch_size' is true, but it must be a number"),
    ("learning-rate-true", {"learning_rate": True}, r"'learning_rate' is true, but it must be a number"),
    ("noise-offset-huge", {"noise_offset": 1e9}, r"'noise_offset' is 1000000000.0, but it must be at most 1"),
    ("cycles-zero", {"lr_num_cycles": 0}, r"'lr_num_cycles' is 0, but it must be greater than 0"),
    ("steps-beyond-float", {"max_train_steps": 1e400}, r"'max_train_steps' is inf"),
    (
        "inference-steps-huge",
        {"validation_num_inference_steps": 10**9},
        r"'validation_num_inference_steps'.*at most 1000",
    ),
]


@pytest.mark.parametrize(
    ("settings", "expected"), [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES]
)
def test_a_hostile_setting_is_refused_naming_the_file_and_key(workdir, settings, expected):
    path = write_config(workdir, {**SDXL, **settings})
    with pytest.raises(ConfigError, match=expected) as error:
        run_within(30, load_config, path)
    assert str(path) in str(error.value)


DATASET_CASES = [
    (
        "resolution-huge",
        {"resolution": 1e9},
        r"'resolution' is 1e\+09, but with resolution_type pixel_area it must be at most 16384",
    ),
    ("resolution-negative", {"resolution": -64}, r"'resolution' is -64, but it must be greater than 0"),
    (
        "area-resolution-huge",
        {"resolution": 1e6, "resolution_type": "area"},
        r"'resolution' is 1e\+06, but with resolution_type area",
    ),
    (
        "crop-buckets-not-positive",
        {"crop_aspect_buckets": [-1, 0]},
        r"'crop_aspect_buckets' is -1, but it must be greater than 0",
    ),
    (
        "crop-buckets-boolean",
        {"crop_aspect_buckets": [True]},
        r"'crop_aspect_buckets' is \[true\], but it must be a number",
    ),
    ("repeats-huge", {"repeats": 10**9}, r"'repeats' is 1000000000, but it must be at most 10000"),
    ("repeats-true", {"repeats": True}, r"'repeats' is true, but it must be a number"),
    (
        "probability-infinite",
        {"probability": float("inf")},
        r"'probability' is inf, but it must be a finite number",
    ),
    (
        "frames-boolean",
        {"video": {"num_frames": True}},
        r"'video.num_frames' is true, but it must be a number",
    ),
]


@pytest.mark.parametrize(
    ("settings", "expected"), [c[1:] for c in DATASET_CASES], ids=[c[0] for c in DATASET_CASES]
)
def test_a_hostile_dataset_setting_is_refused_naming_the_dataset_and_key(workdir, settings, expected):
    path = write_config(workdir, SDXL, [{**IMAGES, **settings}, TEXT])
    with pytest.raises(ConfigError, match=expected) as error:
        run_within(30, load_config, path)
    assert "multidatabackend.json, dataset 'my-images'" in str(error.value)


def _binary_webhook_file(workdir):
    (workdir / "hook.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    return {**SDXL, "webhook_config": "hook.json"}


# (case, writes the files and returns config.json's settings, which file, what the message must say)
FILE_CASES = [
    (
        "binary-webhook-config",
        _binary_webhook_file,
        "config.json",
        r"'?webhook_config'?: hook.json is not a JSON text file",
    ),
    (
        "deep-webhook-config",
        lambda w: {**SDXL, "webhook_config": NESTED},
        "config.json",
        r"nested too deeply",
    ),
]


@pytest.mark.parametrize(
    ("prepare", "where", "expected"), [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES]
)
def test_a_hostile_file_named_by_a_setting_is_refused_when_the_config_loads(
    workdir, prepare, where, expected
):
    path = write_config(workdir, prepare(workdir))
    with pytest.raises(ConfigError, match=expected) as error:
        run_within(30, load_config, path)
    assert where in str(error.value)


@pytest.mark.parametrize("which", ["config", "datasets"])
def test_json_nested_100000_deep_is_refused_quickly(workdir, which):
    config, datasets = (NESTED, None) if which == "config" else (SDXL, NESTED)
    path = write_config(workdir, config, datasets)
    with pytest.raises(ConfigError, match="nested too deeply") as error:
        run_within(30, load_config, path)
    assert ("config.json" if which == "config" else "multidatabackend.json") in str(error.value)


def test_json_nested_deeper_than_settings_need_is_refused(workdir):
    deep = {"x": 1}
    for _ in range(40):
        deep = {"x": deep}
    path = write_config(workdir, {**SDXL, "tread_config": deep})
    with pytest.raises(ConfigError, match=r"config.json: nested more than 32 levels deep"):
        load_config(path)


@pytest.mark.parametrize("which", ["config", "datasets"])
def test_a_binary_settings_file_is_refused_naming_it(workdir, which):
    path = write_config(workdir, SDXL)
    target = path if which == "config" else path.parent / "multidatabackend.json"
    target.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")
    with pytest.raises(ConfigError, match=rf"{target.name}: not a text file.*must be UTF-8 JSON"):
        load_config(path)


def test_duplicate_keys_warn_naming_the_key_and_the_file(workdir):
    text = '{"model_family": "sdxl", "learning_rate": 1e-3, "learning_rate": 1e-4}'
    datasets = json.dumps([IMAGES, TEXT])[:-2] + ', "cache_dir": "other"}]'
    path = write_config(workdir, text, datasets)
    loaded = load_config(path)
    assert loaded.train.learning_rate == pytest.approx(1e-4)
    assert loaded.datasets[-1].cache_dir == "other"
    messages = "\n".join(loaded.warnings)
    assert f"{path}: the key 'learning_rate' is given 2 times" in messages
    assert "multidatabackend.json: the key 'cache_dir' is given 2 times" in messages


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", r"user_prompt_library: .*library.json is not valid JSON"),
        (NESTED.encode(), r"user_prompt_library: .*library.json is nested too deeply"),
    ],
    ids=["binary", "nested-100000-deep"],
)
def test_a_hostile_prompt_library_is_refused_naming_it(tmp_path, content, expected):
    from difftune.validation.prompts import load_prompt_library

    (tmp_path / "library.json").write_bytes(content)
    with pytest.raises(ConfigError, match=expected):
        run_within(30, load_prompt_library, tmp_path / "library.json")


@pytest.mark.parametrize("config", [NESTED, json.dumps({**SDXL, "max_train_steps": True, "seed": 2**32})])
def test_the_command_ends_in_one_message_not_a_traceback(workdir, config):
    import subprocess
    import sys

    path = write_config(workdir, config)
    done = subprocess.run(
        [sys.executable, "-m", "difftune", "train", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("difftune: ") and str(path) in done.stderr
    assert "Traceback" not in done.stderr
