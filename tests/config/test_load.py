import json
import sys

import pytest

from difftune.config import ConfigError, TrainConfig, load_config, write_resolved
from tests.config.helpers import IMAGES, TEXT, write_config

SDXL = {"model_family": "sdxl", "model_type": "lora"}


def test_typo_names_file_and_key_and_suggests_the_nearest(workdir):
    path = write_config(workdir, {**SDXL, "learning_rat": 1e-4})
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "config.json" in message
    assert "unknown key 'learning_rat'" in message
    assert "did you mean 'learning_rate'?" in message


def test_dashed_keys_and_string_values_are_converted(workdir):
    path = write_config(
        workdir,
        {
            "--model_family": "sdxl",
            "--learning_rate": "1e-4",
            "--train_batch_size": "20",
            "--use_dora": "True",
            "gradient_checkpointing": "no",
            "--seed": "none",
            "max_train_steps": "null",
            "lora_alpha": "8",
            "--noise_offset": "0.05",
            "validation_disable": "YES",
            "hub_model_id": "null",
        },
    )
    train = load_config(path).train
    assert train.learning_rate == pytest.approx(1e-4)
    assert train.train_batch_size == 20
    assert train.use_dora is True
    assert train.gradient_checkpointing is False
    assert train.seed is None and train.max_train_steps is None and train.hub_model_id is None
    assert train.lora_alpha == 8.0
    assert train.noise_offset == pytest.approx(0.05)
    assert train.validation_disable is True


def test_default_path_is_config_json_in_the_working_directory(workdir):
    write_config(workdir, {**SDXL, "seed": 3})
    loaded = load_config()
    assert loaded.source.as_posix() == "config/config.json"
    assert loaded.train.seed == 3


def test_toml_config_loads(workdir):
    path = write_config(
        workdir,
        'model_family = "sdxl"\nlearning_rate = "1e-4"\nuse_gradient_checkpointing = false\n',
        name="config.toml",
    )
    train = load_config(path).train
    assert train.learning_rate == pytest.approx(1e-4)
    assert train.gradient_checkpointing is False


def test_aliases_map_to_the_schema_names(workdir):
    datasets = [
        {
            "id": "clips",
            "type": "local",
            "dataset_type": "video",
            "instance_data_dir": "datasets/clips",
            "video": {"num_frames": 61, "fps": 12},
        },
        {"id": "old", "type": "local", "instance_data_dir": "datasets/old", "disable": True},
        {"id": "also-video", "dataset_type": "video", "instance_data_dir": "v", "video": {"framerate": 30}},
        dict(TEXT),
    ]
    path = write_config(
        workdir,
        {
            "model_family": "kandinsky5-video",
            "checkpoint_step_interval": 250,
            "validation_step_interval": "50",
            "use_gradient_checkpointing": False,
            "frame_rate": 16,
            "flux_schedule_shift": 2.5,
        },
        datasets,
    )
    loaded = load_config(path)
    train = loaded.train
    assert (train.checkpointing_steps, train.validation_steps) == (250, 50)
    assert train.gradient_checkpointing is False
    assert train.framerate == 16
    assert train.flow_schedule_shift == 2.5
    by_id = {d.id: d for d in loaded.all_datasets}
    assert by_id["clips"].video.frame_rate == 12
    assert by_id["also-video"].video.frame_rate == 30
    assert by_id["old"].disabled is True
    assert [d.id for d in loaded.datasets] == ["clips", "also-video", "text-embeds"]


def test_two_spellings_of_one_key_with_different_values_is_an_error(workdir):
    path = write_config(workdir, {**SDXL, "checkpointing_steps": 100, "checkpoint_step_interval": 200})
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "'checkpointing_steps'" in message and "'checkpoint_step_interval'" in message
    assert "100" in message and "200" in message


def test_two_spellings_with_the_same_value_are_accepted(workdir):
    path = write_config(
        workdir,
        {
            **SDXL,
            "--learning_rate": "1e-4",
            "learning_rate": 0.0001,
            "checkpointing_steps": 100,
            "checkpoint_step_interval": "100",
        },
    )
    train = load_config(path).train
    assert train.checkpointing_steps == 100 and train.learning_rate == pytest.approx(1e-4)


def test_wrong_values_name_key_value_and_what_is_allowed_all_at_once(workdir):
    path = write_config(
        workdir,
        {
            **SDXL,
            "train_batch_size": "many",
            "optimizer": "adam",
            "learning_rate": -1,
            "use_dora": "maybe",
            "validation_resolution": "big",
        },
    )
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith("5 problems")
    assert "config.json: 'train_batch_size' is 'many', but it must be a whole number" in message
    assert "'optimizer' is 'adam', but it must be one of 'adamw_bf16', 'adamw'" in message
    assert "'learning_rate' is -1, but it must be greater than 0" in message
    assert "'use_dora' is 'maybe', but it must be true or false" in message
    assert "'validation_resolution' is 'big'" in message and "1024x1024" in message


def test_key_of_the_original_tool_that_cannot_change_the_weights_warns(workdir):
    path = write_config(workdir, {**SDXL, "flux_guidance_mode": "constant", "--t5_padding": "zero"})
    loaded = load_config(path)
    assert any(
        "'flux_guidance_mode' is a setting of the original tool that difftune ignores: "
        "it applies only to model families difftune does not train" in w
        for w in loaded.warnings
    )
    assert any("'t5_padding'" in w for w in loaded.warnings)


def test_key_of_the_original_tool_that_changes_the_weights_is_refused(workdir):
    path = write_config(workdir, {**SDXL, "--rescale_betas_zero_snr": "true"})
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "config.json: 'rescale_betas_zero_snr' is 'true'" in message
    assert "changes the trained weights" in message and "remove it" in message


def test_lora_type_lycoris_means_a_lycoris_run(workdir):
    (workdir / "config").mkdir()
    (workdir / "config" / "lycoris_config.json").write_text(
        json.dumps({"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1})
    )
    path = write_config(workdir, {**SDXL, "lora_type": "lycoris"})
    assert load_config(path).train.model_type == "lycoris"


@pytest.mark.parametrize("spelling", ["kandinsky5_image", "kandinsky5-image", "Kandinsky5_Image"])
def test_family_spelling_is_stored_hyphenated_with_family_defaults(workdir, spelling):
    path = write_config(workdir, {"model_family": spelling, "flow_schedule_shift": 2.0})
    train = load_config(path).train
    assert train.model_family == "kandinsky5-image"
    assert train.validation_guidance == 5.0  # family default over the global 7.5
    assert train.flow_schedule_shift == 2.0  # the user's value over the family default 1.0


def test_video_family_defaults(workdir):
    datasets = [
        {"id": "clips", "dataset_type": "video", "instance_data_dir": "v", "video": {"num_frames": 61}}
    ]
    train = load_config(write_config(workdir, {"model_family": "kandinsky5-video"}, datasets)).train
    assert (train.validation_resolution, train.validation_num_video_frames, train.framerate) == (
        "512x768",
        61,
        24,
    )
    assert train.flow_schedule_shift == 1.0


def test_unknown_family_lists_the_valid_ones(workdir):
    with pytest.raises(ConfigError) as error:
        load_config(write_config(workdir, {"model_family": "sdxl-turbo"}))
    message = str(error.value)
    assert "'sdxl-turbo'" in message
    for family in ("sdxl", "kandinsky5-image", "kandinsky5-video"):
        assert family in message


def test_missing_family_is_reported_once(workdir):
    with pytest.raises(ConfigError) as error:
        load_config(write_config(workdir, {"learning_rate": 1e-4}))
    assert str(error.value).count("model_family") == 1
    assert "required" in str(error.value)


def test_unknown_flavour_suggests_the_nearest(workdir):
    path = write_config(
        workdir,
        {"model_family": "kandinsky5-video", "model_flavour": "t2v-lite-sft-5"},
        [{"id": "v", "dataset_type": "video", "instance_data_dir": "v", "video": {"num_frames": 61}}],
    )
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "model_flavour 't2v-lite-sft-5'" in message
    assert "did you mean 't2v-lite-sft-5s'?" in message


def test_group_offload_with_model_cpu_offload_is_an_error(workdir):
    path = write_config(workdir, {**SDXL, "enable_group_offload": "true", "enable_model_cpu_offload": True})
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "enable_group_offload" in message and "enable_model_cpu_offload" in message
    assert "conflict" in message and "Pick one" in message


def test_validation_frame_count_off_the_vae_grid_suggests_two_counts(workdir):
    datasets = [{"id": "v", "dataset_type": "video", "instance_data_dir": "v", "video": {"num_frames": 61}}]
    path = write_config(
        workdir, {"model_family": "kandinsky5-video", "validation_num_video_frames": 60}, datasets
    )
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "'validation_num_video_frames' is 60" in message
    assert "use 57 or 61" in message


@pytest.mark.parametrize("frames, usable", [(48, 45), (50, 49), (64, 61)])
def test_dataset_frame_count_off_the_vae_grid_is_lowered_with_a_warning(workdir, frames, usable):
    datasets = [
        {"id": "clips", "dataset_type": "video", "instance_data_dir": "v", "video": {"num_frames": frames}}
    ]
    loaded = load_config(write_config(workdir, {"model_family": "kandinsky5-video"}, datasets))
    assert loaded.datasets[0].video.num_frames == usable
    (warning,) = [w for w in loaded.warnings if "num_frames" in w]
    assert "multidatabackend.json, dataset 'clips' (index 0)" in warning
    assert f"'video.num_frames' is {frames}" in warning and f"training on {usable} frames instead" in warning


def test_overrides_apply_over_the_file_with_the_same_checks(workdir):
    path = write_config(workdir, {**SDXL, "learning_rate": 1e-4, "checkpointing_steps": 500})
    loaded = load_config(
        path,
        {
            "learning_rate": "3e-4",
            "--checkpoint_step_interval": "7",
            "use_dora": "true",
            "vae-enable-tiling": "true",
        },
    )
    train = loaded.train
    assert train.learning_rate == pytest.approx(3e-4)
    assert train.checkpointing_steps == 7
    assert train.use_dora is True and train.vae_enable_tiling is True
    with pytest.raises(ConfigError) as error:
        load_config(path, {"lora_rnk": "8"})
    assert "command line: unknown key 'lora_rnk'; did you mean 'lora_rank'?" in str(error.value)


def test_override_json_text_becomes_a_dict(workdir):
    path = write_config(workdir, {"model_family": "kandinsky5-image", "model_type": "lora"})
    routes = '{"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]}'
    train = load_config(path, {"tread_config": routes}).train
    assert train.tread_config["routes"][0]["selection_ratio"] == 0.5


def test_tread_on_a_family_that_cannot_route_tokens_is_refused_naming_the_family(workdir):
    route = {"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}
    path = write_config(workdir, {**SDXL, "tread_config": {"routes": [route]}})
    with pytest.raises(ConfigError, match="'tread_config' is .*sdxl's denoiser has no blocks that TREAD"):
        load_config(path)


def test_json_syntax_error_gives_line_and_column(workdir):
    path = write_config(workdir, '{\n  "model_family": "sdxl",\n}\n')
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "config.json, line 3, column 1: not valid JSON" in str(error.value)


def test_missing_config_file_is_a_clear_error(workdir):
    with pytest.raises(ConfigError) as error:
        load_config("config/nope.json")
    assert "config/nope.json: config file not found" in str(error.value)


def test_data_backend_config_that_is_not_a_list(workdir):
    path = write_config(workdir, SDXL, datasets={"id": "my-images"})
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "multidatabackend.json: must hold a JSON list of datasets" in str(error.value)


def test_duplicate_dataset_ids(workdir):
    path = write_config(workdir, SDXL, datasets=[dict(IMAGES), dict(IMAGES), dict(TEXT)])
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "dataset id 'my-images' is used 2 times (indexes 0, 1)" in str(error.value)


def test_unknown_dataset_key_names_the_dataset_and_index(workdir):
    path = write_config(workdir, SDXL, datasets=[dict(TEXT), {**IMAGES, "instance_data_dri": "x"}])
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "multidatabackend.json, dataset 'my-images' (index 1): unknown key 'instance_data_dri'" in message
    assert "did you mean 'instance_data_dir'?" in message


def test_wrong_dataset_values_name_the_dataset(workdir):
    path = write_config(
        workdir, SDXL, datasets=[{**IMAGES, "crop_style": "middle", "repeats": "-1"}, dict(TEXT)]
    )
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "dataset 'my-images' (index 0): 'crop_style' is 'middle', but it must be one of" in message
    assert "'repeats' is '-1', but it must be at least 0" in message


def test_original_dataset_keys_warn_or_stop(workdir):
    path = write_config(workdir, SDXL, datasets=[{**IMAGES, "hash_filenames": True}, dict(TEXT)])
    warnings = load_config(path).warnings
    assert any(
        "dataset 'my-images' (index 0): 'hash_filenames' is a setting of the original tool that difftune ignores"
        in w
        for w in warnings
    )
    path = write_config(workdir, SDXL, datasets=[{**IMAGES, "max_num_samples": 10}, dict(TEXT)])
    with pytest.raises(ConfigError, match="'max_num_samples' is 10, a setting of the original"):
        load_config(path)


def test_no_enabled_image_dataset(workdir):
    path = write_config(workdir, SDXL, datasets=[{**IMAGES, "disabled": True}, dict(TEXT)])
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "no enabled image or video dataset" in str(error.value)


def test_text_embeds_dataset_is_kept_or_none(workdir):
    loaded = load_config(write_config(workdir, SDXL))
    assert loaded.text_embeds_dataset.id == "text-embeds"
    loaded = load_config(write_config(workdir, SDXL, datasets=[dict(IMAGES)]))
    assert loaded.text_embeds_dataset is None


def test_several_text_embeds_datasets_use_the_default_one(workdir):
    other = {**TEXT, "id": "other-text", "default": False}
    loaded = load_config(write_config(workdir, SDXL, datasets=[dict(IMAGES), other, dict(TEXT)]))
    assert loaded.text_embeds_dataset.id == "text-embeds"
    assert any("'other-text'" in w and "not used" in w for w in loaded.warnings)
    with pytest.raises(ConfigError, match="mark exactly one as default"):
        load_config(write_config(workdir, SDXL, datasets=[dict(IMAGES), other, {**TEXT, "default": False}]))


def test_data_config_path_argument_wins(workdir):
    path = write_config(workdir, SDXL)
    elsewhere = workdir / "other.json"
    elsewhere.write_text(json.dumps([{**IMAGES, "id": "elsewhere"}]))
    loaded = load_config(path, data_config_path=elsewhere)
    assert [d.id for d in loaded.datasets] == ["elsewhere"]
    assert loaded.train.data_backend_config == str(elsewhere)


def test_resolved_file_holds_every_setting_and_loads_back(workdir):
    datasets = [dict(IMAGES), {**IMAGES, "id": "off", "disabled": True}, dict(TEXT)]
    loaded = load_config(
        write_config(workdir, {"model_family": "kandinsky5_image", "lora_rank": 8}, datasets)
    )
    resolved = write_resolved(loaded, workdir / "out")
    assert resolved == workdir / "out" / "config.resolved.json"
    document = json.loads(resolved.read_text())
    assert set(TrainConfig.model_fields) <= set(document)
    assert document["validation_guidance"] == 5.0 and document["lora_rank"] == 8
    assert [d["id"] for d in document["datasets"]] == ["my-images", "off", "text-embeds"]
    again = load_config(resolved)
    assert again.train == loaded.train
    assert again.all_datasets == loaded.all_datasets
    assert again.datasets == loaded.datasets
    assert again.warnings == []


@pytest.mark.parametrize(
    ("precision", "module", "package"),
    [("int8-quanto", "optimum.quanto", "optimum-quanto"), ("int8-torchao", "torchao", "torchao")],
)
def test_a_precision_whose_package_is_missing_is_refused_at_load(
    workdir, monkeypatch, precision, module, package
):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    path = write_config(workdir, {**SDXL, "base_model_precision": precision})
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert f"'base_model_precision' is '{precision}'" in message and f"pip install {package}" in message


def test_validation_settings_without_a_prompt_warn_that_no_samples_will_be_made(workdir):
    settings = {**SDXL, "validation_resolution": "1024x768", "validation_guidance": 4.2}
    warnings = load_config(write_config(workdir, settings)).warnings
    (warning,) = [w for w in warnings if "validation" in w]
    assert "validation_resolution, validation_guidance" in warning and "no samples will be made" in warning

    with_prompt = load_config(write_config(workdir, {**settings, "validation_prompt": "a cat"})).warnings
    assert not [w for w in with_prompt if "no samples" in w]
    defaults_only = load_config(write_config(workdir, SDXL)).warnings
    assert not [w for w in defaults_only if "no samples" in w]


def test_offset_noise_alone_means_the_original_tools_defaults(workdir):
    train = load_config(write_config(workdir, {**SDXL, "offset_noise": "true"})).train
    assert (train.effective_noise_offset, train.effective_noise_offset_probability) == (0.1, 0.25)
    train = load_config(write_config(workdir, {**SDXL, "noise_offset": 0.05})).train
    assert (train.effective_noise_offset, train.effective_noise_offset_probability) == (0.05, 1.0)
    train = load_config(write_config(workdir, {**SDXL, "noise_offset": 0.05, "offset_noise": False})).train
    assert train.effective_noise_offset == 0.0


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"use_soft_min_snr": True}, "'use_soft_min_snr' is true, but it softens min-SNR weighting"),
        ({"snr_gamma": 5, "diff2flow_enabled": True}, "Diff2Flow (diff2flow_enabled) trains without min-SNR"),
        (
            {"timestep_bias_strategy": "range", "timestep_bias_begin": 500, "timestep_bias_end": 200},
            "[500, 200), which is empty",
        ),
        ({"loss_type": "l1"}, "'loss_type' is 'l1', but it must be one of 'l2', 'huber' or 'smooth_l1'"),
        ({"lr_end": 1e-6}, "only lr_scheduler polynomial ends at a set rate"),
        (
            {"lr_scheduler": "polynomial", "lr_end": 1e-3, "learning_rate": 1e-4},
            "must end below learning_rate",
        ),
        ({"lr_scale_sqrt": True}, "set lr_scale true as well"),
        ({"prodigy_steps": 10}, "it applies to optimizer prodigy only"),
        (
            {"flow_use_beta_schedule": True},
            "sdxl is a diffusion (epsilon / v) model whose timesteps it does not",
        ),
        (
            {"flow_schedule_shift": 2.0, "diff2flow_enabled": True},
            "'flow_schedule_shift' is 2.0, but sdxl is",
        ),
        (
            {"optimizer": "adamw_schedulefree", "lr_scheduler": "cosine"},
            "replaces the learning-rate schedule",
        ),
        ({"optimizer_config": "d_coef"}, "'d_coef' is not key=value"),
    ],
)
def test_objective_settings_that_cannot_work_together_are_refused(workdir, settings, words):
    with pytest.raises(ConfigError) as error:
        load_config(write_config(workdir, {**SDXL, **settings}))
    assert words in str(error.value)


def test_a_bitsandbytes_optimizer_without_the_package_is_refused_at_load(workdir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(ConfigError, match="needs the bitsandbytes package.*pip install bitsandbytes"):
        load_config(write_config(workdir, {**SDXL, "optimizer": "bnb-adamw8bit"}))


def test_flow_schedule_keys_load_for_a_flow_matching_family(workdir):
    config = {
        "model_family": "kandinsky5-image",
        "flow_use_beta_schedule": True,
        "flow_beta_schedule_alpha": 3,
    }
    train = load_config(write_config(workdir, config)).train
    assert train.flow_use_beta_schedule and train.flow_beta_schedule_alpha == 3.0
    assert (
        load_config(write_config(workdir, {**SDXL, "flow_schedule_shift": 3.0})).train.model_family == "sdxl"
    )


def test_image_to_video_refuses_datasets_with_only_the_condition_frame(workdir):
    datasets = [
        {"id": "stills", "dataset_type": "image", "instance_data_dir": "i"},
        {"id": "short", "dataset_type": "video", "instance_data_dir": "v", "video": {"num_frames": 1}},
        {"id": "clips", "dataset_type": "video", "instance_data_dir": "v", "video": {"num_frames": 17}},
    ]
    i2v = {"model_family": "kandinsky5-video", "model_flavour": "i2v-lite-5s"}
    with pytest.raises(ConfigError) as error:
        load_config(write_config(workdir, i2v, datasets))
    message = str(error.value)
    assert (
        "dataset 'stills' is an image dataset, but model_flavour 'i2v-lite-5s' trains image-to-video"
        in message
    )
    assert "dataset 'short' is a video dataset of 1 frames" in message
    assert "'clips'" not in message and "at least 5 frames" in message
    # the same datasets train a text-to-video flavour, and the clips alone train image-to-video
    load_config(write_config(workdir, {**i2v, "model_flavour": "t2v-lite-sft-5s"}, datasets))
    assert load_config(write_config(workdir, i2v, datasets[2:])).train.model_flavour == "i2v-lite-5s"


def test_bucket_pruning_can_be_disabled_only_where_no_bucket_is_pruned(workdir):
    assert load_config(write_config(workdir, {**SDXL, "disable_bucket_pruning": True, "train_batch_size": 1}))
    with pytest.raises(ConfigError, match="a bucket smaller than train_batch_size \\(2\\) is left out"):
        load_config(write_config(workdir, {**SDXL, "disable_bucket_pruning": True, "train_batch_size": 2}))


def test_crepa_block_inside_a_tread_route_is_refused_at_load(workdir):
    datasets = [
        {"id": "clips", "dataset_type": "video", "instance_data_dir": "v", "video": {"num_frames": 17}}
    ]
    routes = [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]
    crepa = {
        "model_family": "kandinsky5-video",
        "crepa_enabled": True,
        "crepa_model": str(workdir),  # a local folder: no Hub check
        "tread_config": {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": 10}]},
    }
    with pytest.raises(ConfigError) as error:
        load_config(write_config(workdir, {**crepa, "crepa_block_index": 8}, datasets))
    message = str(error.value)
    assert "'crepa_block_index' is 8, inside tread_config.routes[0]" in message and "config.json" in message
    load_config(write_config(workdir, {**crepa, "crepa_block_index": 1}, datasets))  # before the route
    # different signs need the model's block count: left to the check after the model load
    load_config(
        write_config(workdir, {**crepa, "crepa_block_index": 8, "tread_config": {"routes": routes}}, datasets)
    )


def test_auto_shift_as_the_original_tool_reads_it_with_a_static_shift(workdir):
    k5 = {"model_family": "kandinsky5-image", "flow_schedule_auto_shift": True}
    assert load_config(write_config(workdir, {**k5, "flow_schedule_shift": 0})).train.flow_schedule_auto_shift
    assert load_config(write_config(workdir, k5)).train.flow_schedule_auto_shift
    with pytest.raises(ConfigError, match="the original tool uses the static shift then"):
        load_config(write_config(workdir, {**k5, "flow_schedule_shift": 2.0}))


def test_an_auto_shift_run_resolves_to_a_file_that_loads_back(workdir):
    config = {"model_family": "kandinsky5-image", "flow_schedule_auto_shift": True, "offset_noise": True}
    loaded = load_config(write_config(workdir, config))
    again = load_config(write_resolved(loaded, workdir / "out"))
    assert again.train == loaded.train and again.train.flow_schedule_auto_shift
    assert again.train.effective_noise_offset == 0.1


def test_a_validation_setting_the_pipeline_cannot_take_is_refused_at_load_time(workdir):
    k5 = {"model_family": "kandinsky5-image", "model_type": "lora"}
    path = write_config(workdir, {**k5, "validation_guidance_rescale": 0.7})
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert str(path) in message and "'validation_guidance_rescale' is 0.7" in message
    assert "set it to 0 or remove it" in message
    # the original tool's Kandinsky 5 examples write 0.0, which every pipeline honours
    assert load_config(write_config(workdir, {**k5, "validation_guidance_rescale": 0.0})).train


def test_an_image_to_image_flavour_without_a_conditioning_dataset_is_refused_at_load_time(workdir):
    config = {"model_family": "kandinsky5-image", "model_flavour": "i2i-lite-sft", "model_type": "lora"}
    with pytest.raises(ConfigError, match='needs a dataset with "dataset_type": "conditioning"'):
        load_config(write_config(workdir, config))


def test_a_folder_other_than_the_working_directory_holds_the_files_a_config_names(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    lycoris = {"algo": "lokr", "multiplier": 1, "linear_dim": 4, "linear_alpha": 1}
    write_config(project, {**SDXL, "model_type": "lycoris", "output_dir": "out"})
    (project / "config" / "lycoris_config.json").write_text(json.dumps(lycoris))
    monkeypatch.chdir(tmp_path)  # none of the files is here
    loaded = load_config("config/config.json", folder=project)
    assert [d.id for d in loaded.datasets] == ["my-images", "text-embeds"]
    assert loaded.train.model_type == "lycoris"

    (project / "config" / "lycoris_config.json").write_text('{"algo": "lokr",, }')
    with pytest.raises(ConfigError) as error:  # named as the config names it
        load_config("config/config.json", folder=project)
    assert str(error.value).startswith("config/lycoris_config.json, line 1, column 17: not valid JSON")
