"""The table of the original tool's keys: every key that can change the weights is built or refused."""

import re
from pathlib import Path

import pytest

from difftune.config import ConfigError, keys, load_config
from difftune.config.original_keys import (
    DATASET_KEYS,
    TRAIN_KEYS,
    VIDEO_KEYS,
    Built,
    Cosmetic,
    Refused,
    counts,
    is_neutral,
)
from difftune.config.schema import DatasetConfig, TrainConfig, VideoConfig
from tests.config.helpers import IMAGES, TEXT, write_config

SDXL = {"model_family": "sdxl"}
# Keys read by the loader itself rather than stored in the schema.
READ_BY_THE_LOADER = {"lora_type"}

# Keys that the original tool's documentation describes as changing what is trained: none of them may
# ever be ignored with a warning.
CHANGE_THE_WEIGHTS = """
    loss_type huber_c huber_schedule snr_gamma use_soft_min_snr soft_min_snr_sigma_data noise_offset
    noise_offset_probability offset_noise input_perturbation input_perturbation_steps
    timestep_bias_strategy timestep_bias_multiplier timestep_bias_begin timestep_bias_end
    timestep_bias_portion flow_use_beta_schedule flow_beta_schedule_alpha flow_beta_schedule_beta
    flow_schedule_auto_shift flow_schedule_shift flow_use_uniform_schedule flow_sigmoid_scale
    optimizer optimizer_beta1 optimizer_beta2 optimizer_config adam_beta1 adam_beta2 adam_weight_decay
    adam_epsilon grad_clip_method max_grad_norm learning_rate lr_scheduler lr_end lr_scale lr_scale_sqrt
    lr_warmup_steps prodigy_steps text_encoder_lr train_text_encoder train_batch_size
    gradient_accumulation_steps masked_loss_probability caption_dropout_probability
    prepend_instance_prompt only_instance_prompt instance_prompt caption_strategy resolution
    resolution_type minimum_image_size maximum_image_size target_downsample_size cache_dir_vae
    tokenizer_max_length lora_rank lora_alpha lora_dropout use_dora lora_init_type init_lora
    base_model_precision text_encoder_1_precision text_encoder_2_precision gradient_precision
    mixed_precision use_ema ema_decay ema_update_interval rescale_betas_zero_snr prediction_type
    training_scheduler_timestep_spacing parquet_caption_column parquet_filename_column eval_dataset_id
    layer_freeze_strategy variant
""".split()
DATASET_CHANGE_THE_WEIGHTS = """
    caption_shuffle only_instance_prompt prepend_instance_prompt instance_prompt caption_strategy
    is_regularisation_data conditioning conditioning_type huggingface parquet crop crop_style
    crop_aspect resolution resolution_type repeats probability vae_cache_clear_each_epoch
    start_epoch end_epoch max_num_samples caption_filter_list
""".split()

TABLES = [
    ("config.json", TRAIN_KEYS, TrainConfig, keys.TRAIN_ALIASES),
    ("dataset", DATASET_KEYS, DatasetConfig, keys.DATASET_ALIASES),
    ("video", VIDEO_KEYS, VideoConfig, keys.VIDEO_ALIASES),
]


@pytest.mark.parametrize("name, table, model, aliases", TABLES, ids=[t[0] for t in TABLES])
def test_a_key_is_built_exactly_when_the_schema_holds_it(name, table, model, aliases):
    fields = set(model.model_fields)
    for key, status in table.items():
        in_schema = key in fields or aliases.get(key) in fields or key in READ_BY_THE_LOADER
        assert isinstance(status, Built) == in_schema, (
            f"{name}: '{key}' is {status} but in schema: {in_schema}"
        )


def test_every_key_that_changes_the_weights_is_built_or_refused():
    for table, names in ((TRAIN_KEYS, CHANGE_THE_WEIGHTS), (DATASET_KEYS, DATASET_CHANGE_THE_WEIGHTS)):
        for key in names:
            assert key in table, key
            assert isinstance(table[key], (Built, Refused)), f"'{key}' is {table[key]}"


def test_every_refusal_and_every_cosmetic_reason_says_something():
    for table in (TRAIN_KEYS, DATASET_KEYS, VIDEO_KEYS):
        for key, status in table.items():
            if isinstance(status, Refused):
                assert len(status.instead) > 10 and not is_neutral(status, 7), key
            elif isinstance(status, Cosmetic):
                assert len(status.why) > 10, key


def test_the_loader_refuses_every_refused_key_and_only_warns_for_cosmetic_ones(workdir):
    refused = sorted(k for k, s in TRAIN_KEYS.items() if isinstance(s, Refused))
    cosmetic = sorted(k for k, s in TRAIN_KEYS.items() if isinstance(s, Cosmetic))
    with pytest.raises(ConfigError) as error:
        load_config(write_config(workdir, {**SDXL, **{key: 7 for key in refused}}))
    message = str(error.value)
    assert message.startswith(f"{len(refused)} problems")
    for key in refused:
        assert f"'{key}' is 7, a setting of the original tool that changes the trained weights" in message

    loaded = load_config(write_config(workdir, {**SDXL, **{key: 7 for key in cosmetic}}))
    warned = [w for w in loaded.warnings if "difftune ignores" in w]
    assert len(warned) == len(cosmetic)
    weight_changing_warned = [k for k in TRAIN_KEYS if not isinstance(TRAIN_KEYS[k], Cosmetic)]
    assert not [k for k in weight_changing_warned if any(f"'{k}'" in w for w in loaded.warnings)]


def test_the_loader_refuses_refused_dataset_keys(workdir):
    refused = sorted(k for k, s in DATASET_KEYS.items() if isinstance(s, Refused))
    images = {**IMAGES, **{key: 7 for key in refused}}
    with pytest.raises(ConfigError) as error:
        load_config(write_config(workdir, SDXL, [images, TEXT]))
    for key in refused:
        assert f"'{key}' is 7, a setting of the original tool that changes the trained weights" in str(
            error.value
        )


def test_a_refused_key_set_to_what_difftune_does_anyway_loads(workdir):
    config = {**SDXL, "loss_type": "l2", "train_text_encoder": "false", "input_perturbation": 0.0}
    loaded = load_config(write_config(workdir, config))
    assert loaded.warnings == []


def test_readme_states_the_counts():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    for label, table in (
        ("config.json", TRAIN_KEYS),
        ("multidatabackend.json", DATASET_KEYS),
        ("a dataset's `video` block", VIDEO_KEYS),
    ):
        numbers = counts(table)
        expected = (
            f"| {label} | {len(table)} | {numbers['built']} | {numbers['refused']} | {numbers['cosmetic']} |"
        )
        assert expected in readme, f"README.md should hold the row: {expected}"
    assert re.search(r"Weight-changing keys ignored with only a warning: \*\*0\*\*", readme)
