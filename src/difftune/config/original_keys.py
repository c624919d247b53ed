"""Every key of the original tool, classified once: built, refused, or cosmetic.

- BUILT: difftune honours the key (it is a field of the schema, or an alias of one).
- refused(...): the key can change the trained weights and difftune does not do what it asks; a
  config that sets it (to anything but its `neutral` values, which ask for what difftune does anyway)
  stops at load time with the message, which says what to use instead.
- cosmetic(...): the key cannot change the trained weights (tracker names, debugging output,
  speed-only or storage tuning, settings of model families difftune does not train); a config that
  sets it loads with a warning that it is ignored.

Building a feature flips its keys here from `refused(...)` to `BUILT`, one line per key, together with
the new schema fields (tests/config/test_original_keys.py checks that both agree).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Built:
    """difftune honours the key."""


@dataclass(frozen=True)
class Refused:
    """The key changes the weights and difftune does not do it; `instead` says what to use instead."""

    instead: str
    neutral: tuple[object, ...] = ()  # values that ask for what difftune does anyway


@dataclass(frozen=True)
class Cosmetic:
    """The key cannot change the weights; `why` says why it is safe to ignore."""

    why: str


BUILT = Built()
Status = Built | Refused | Cosmetic

# Values that switch a feature off, accepted for every refused key.
OFF_VALUES: tuple[object, ...] = (None, False, "", "none", "None", "false", "False", "null")


def refused(instead: str, *neutral: object) -> Refused:
    return Refused(instead, neutral)


def cosmetic(why: str) -> Cosmetic:
    return Cosmetic(why)


def is_neutral(status: Refused, value: object) -> bool:
    """True when `value` asks for what difftune does anyway (off, or one of the key's neutral values)."""
    candidates = OFF_VALUES + status.neutral
    if isinstance(value, str):
        text = value.strip()
        for candidate in candidates:
            if isinstance(candidate, str) and text.lower() == candidate.lower():
                return True
            if isinstance(candidate, (int, float)) and not isinstance(candidate, bool):
                try:
                    if float(text) == float(candidate):
                        return True
                except ValueError:
                    pass
        return False
    return any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in candidates)


# -- reasons shared by many keys -----------------------------------------------------------------
_OTHER_FAMILY = cosmetic("it applies only to model families difftune does not train")
_TRACKING = cosmetic("tracking, publishing or model-card output only")
_VALIDATION = cosmetic("it changes validation output only, never the training step")
_DEBUG = cosmetic("debugging output only")
_SKIPPED_ANYWAY = cosmetic(
    "difftune leaves unreadable and too-small files out of training and reports them, as the original "
    "does after deleting them; it never deletes files"
)
_SPEED = cosmetic("speed, memory or storage tuning with the same maths; difftune chooses its own")
_CHECKPOINTS = cosmetic("when and where checkpoints are written; use checkpointing_steps")

_TEXT_ENCODER = (
    "difftune trains the text encoders with train_text_encoder (LoRA, families whose text encoders train) "
    "for the whole run; remove it"
)
_REFINER = "difftune trains base models, never a refiner model; remove it"
_CONTROL = "difftune trains no ControlNet or control adapter; remove it"
_LORA_INIT = "difftune initialises adapters as peft does; remove it"
_DATA_FILTER = (
    "difftune trains on every file of a dataset and never deletes or filters files; "
    "remove it and clean the folder yourself"
)
_TIMESTEPS = "difftune draws timesteps without this; remove it (flow models: flow_schedule_shift)"
_NOT_YET = "difftune does not do this; remove it"

TRAIN_KEYS: dict[str, Status] = {
    # model
    "model_family": BUILT,
    "model_flavour": BUILT,
    "model_type": BUILT,
    "lora_type": BUILT,  # read by the loader: lora + lycoris means model_type lycoris
    "pretrained_model_name_or_path": BUILT,
    "pretrained_vae_model_name_or_path": BUILT,
    "revision": BUILT,
    "prediction_type": BUILT,
    "variant": refused("difftune loads the default weight files of the model; remove it"),
    "pretrained_transformer_model_name_or_path": refused(
        "point pretrained_model_name_or_path at a diffusers folder that holds the transformer you want"
    ),
    "pretrained_transformer_subfolder": refused(
        "point pretrained_model_name_or_path at a diffusers folder with the standard layout"
    ),
    "pretrained_unet_model_name_or_path": refused(
        "point pretrained_model_name_or_path at a diffusers folder that holds the UNet you want"
    ),
    "pretrained_unet_subfolder": refused(
        "point pretrained_model_name_or_path at a diffusers folder with the standard layout"
    ),
    "pretrained_t5_model_name_or_path": _OTHER_FAMILY,
    "refiner_training": refused(_REFINER),
    "refiner_training_invert_schedule": refused(_REFINER),
    "refiner_training_strength": refused(_REFINER),
    "sdxl_refiner_uses_full_range": refused(_REFINER),
    "data_aesthetic_score": refused(_REFINER),
    "controlnet": refused(_CONTROL),
    "control": refused(_CONTROL),
    "controlnet_custom_config": refused(_CONTROL),
    "controlnet_model_name_or_path": refused(_CONTROL),
    "distillation_method": refused("difftune has no distillation; remove it"),
    "distillation_config": refused("difftune has no distillation; remove it"),
    # files
    "output_dir": BUILT,
    "data_backend_config": BUILT,
    "user_prompt_library": BUILT,
    "lycoris_config": BUILT,
    "webhook_config": BUILT,
    "cache_dir": cosmetic("where the original tool keeps downloads; cache paths come from the datasets"),
    "cache_dir_text": BUILT,
    "cache_dir_vae": BUILT,
    "override_dataset_config": _SPEED,
    "preserve_data_backend_cache": _SPEED,
    "skip_file_discovery": refused("set skip_file_discovery on each dataset"),
    "ignore_missing_files": refused("difftune stops on a missing file; remove the file from the dataset"),
    # batch, epochs and learning rate
    "train_batch_size": BUILT,
    "gradient_accumulation_steps": BUILT,
    "max_train_steps": BUILT,
    "num_train_epochs": BUILT,
    "ignore_final_epochs": refused("set max_train_steps or num_train_epochs to the length you want"),
    "seed": BUILT,
    "seed_for_each_device": cosmetic(
        "each process's noise is its own rows of one global draw from seed, so processes never repeat it"
    ),
    "learning_rate": BUILT,
    "lr_scheduler": BUILT,
    "lr_warmup_steps": BUILT,
    "lr_num_cycles": BUILT,
    "lr_power": BUILT,
    "lr_end": BUILT,
    "lr_scale": BUILT,
    "lr_scale_sqrt": BUILT,
    "allow_dataset_oversubscription": BUILT,
    "data_backend_sampling": refused("set probability on each dataset", "uniform"),
    "conditioning_multidataset_sampling": refused(
        "link one conditioning dataset per image dataset with conditioning_data", "random"
    ),
    # optimizer
    "optimizer": BUILT,
    "optimizer_config": BUILT,
    "adam_beta1": BUILT,
    "adam_beta2": BUILT,
    "adam_weight_decay": BUILT,
    "adam_epsilon": BUILT,
    "optimizer_beta1": BUILT,
    "optimizer_beta2": BUILT,
    "prodigy_steps": BUILT,
    "max_grad_norm": BUILT,
    "grad_clip_method": BUILT,
    "gradient_precision": refused(
        "difftune keeps gradients in the precision of the trained weights; remove it", "unmodified"
    ),
    "optimizer_cpu_offload_method": _SPEED,
    "optimizer_offload_gradients": _SPEED,
    "optimizer_release_gradients": _SPEED,
    "fuse_optimizer": _SPEED,
    "offload_param_path": _SPEED,
    "set_grads_to_none": _SPEED,
    # precision and memory
    "mixed_precision": BUILT,
    "gradient_checkpointing": BUILT,
    "gradient_checkpointing_interval": BUILT,
    "attention_mechanism": BUILT,
    "sageattention_usage": refused(
        "difftune trains with exact attention; remove it or set 'inference'", "inference"
    ),
    "base_model_precision": BUILT,
    "base_model_default_dtype": BUILT,
    "text_encoder_1_precision": refused(
        "difftune loads the text encoders in the weight dtype; remove it", "no_change"
    ),
    "text_encoder_2_precision": refused(
        "difftune loads the text encoders in the weight dtype; remove it", "no_change"
    ),
    "text_encoder_3_precision": _OTHER_FAMILY,
    "text_encoder_4_precision": _OTHER_FAMILY,
    "quantize_activations": refused("difftune quantizes weights only (base_model_precision); remove it"),
    "quantize_via": _SPEED,
    "vae_dtype": refused("difftune runs the VAE in the weight dtype; remove it", "default"),
    "disable_tf32": cosmetic("float32 matmul rounding only (TF32 or IEEE); difftune leaves torch's default"),
    "enable_group_offload": BUILT,
    "group_offload_type": BUILT,
    "group_offload_blocks_per_group": BUILT,
    "group_offload_use_stream": BUILT,
    "group_offload_to_disk_path": BUILT,
    "enable_model_cpu_offload": BUILT,
    "offload_during_startup": BUILT,
    "offload_during_save": _SPEED,
    "ramtorch": _SPEED,
    "ramtorch_controlnet": _SPEED,
    "ramtorch_target_modules": _SPEED,
    "ramtorch_text_encoder": _SPEED,
    "ramtorch_vae": _SPEED,
    "unet_attention_slice": _SPEED,
    "fuse_qkv_projections": _SPEED,
    "keep_vae_loaded": _SPEED,
    "fully_unload_text_encoder": _SPEED,
    "accelerator_cache_clear_interval": _SPEED,
    "dynamo_backend": _SPEED,
    "dynamo_dynamic": _SPEED,
    "dynamo_fullgraph": _SPEED,
    "dynamo_mode": _SPEED,
    "dynamo_use_regional_compilation": _SPEED,
    "disable_benchmark": _SPEED,
    "torch_num_threads": _SPEED,
    "num_processes": cosmetic("the launcher (torchrun or accelerate launch) sets the process count"),
    "local_rank": cosmetic("the launcher sets each process's rank"),
    "i_know_what_i_am_doing": cosmetic("it unlocks safety limits of the original tool only"),
    # VAE and caches
    "vae_enable_patch_conv": BUILT,
    "vae_enable_tiling": BUILT,
    "vae_enable_slicing": BUILT,
    "vae_batch_size": BUILT,
    "vae_cache_ondemand": BUILT,
    "vae_cache_disable": BUILT,
    "vae_cache_scan_behaviour": _SPEED,
    "text_cache_disable": _SPEED,
    "compress_disk_cache": _SPEED,
    "text_encoder_batch_size": _SPEED,
    "image_processing_batch_size": _SPEED,
    "read_batch_size": _SPEED,
    "write_batch_size": _SPEED,
    "max_workers": _SPEED,
    "enable_multiprocessing": _SPEED,
    "aws_max_pool_connections": _SPEED,
    "dataloader_prefetch": _SPEED,
    "dataloader_prefetch_qlen": _SPEED,
    "aspect_bucket_worker_count": _SPEED,
    "aspect_bucket_disable_rebuild": _SPEED,
    "metadata_update_interval": _SPEED,
    "conditioning_image_embed_batch_size": _SPEED,
    # defaults of every dataset that does not set its own
    "resolution": BUILT,
    "resolution_type": BUILT,
    "minimum_image_size": BUILT,
    "maximum_image_size": BUILT,
    "target_downsample_size": BUILT,
    "max_upscale_threshold": refused("difftune does not filter buckets by upscaling; remove it"),
    "caption_strategy": BUILT,
    "instance_prompt": BUILT,
    "prepend_instance_prompt": BUILT,
    "only_instance_prompt": BUILT,
    "parquet_caption_column": BUILT,
    "parquet_filename_column": BUILT,
    "tokenizer_max_length": BUILT,
    "caption_dropout_probability": BUILT,
    "aspect_bucket_alignment": refused("difftune aligns sizes to the family's pixel multiple; remove it"),
    "aspect_bucket_rounding": refused(
        "difftune buckets each image at the size its aspect ratio gives on the family's pixel grid; remove it"
    ),
    "disable_bucket_pruning": BUILT,
    "delete_nsfw_images": refused(_DATA_FILTER),
    "delete_problematic_images": _SKIPPED_ANYWAY,
    "delete_unwanted_images": _SKIPPED_ANYWAY,
    "enable_nsfw_check": refused(_DATA_FILTER),
    "nsfw_check_backend_types": refused(_DATA_FILTER),
    "nsfw_check_min_votes": refused(_DATA_FILTER),
    "nsfw_check_models": refused(_DATA_FILTER),
    "nsfw_check_sample_types": refused(_DATA_FILTER),
    "nsfw_check_video_frame_count": refused(_DATA_FILTER),
    "nsfw_check_video_frame_selection": refused(_DATA_FILTER),
    "nsfw_check_video_min_flagged_frames": refused(_DATA_FILTER),
    "framerate": BUILT,
    # adapters
    "lora_rank": BUILT,
    "lora_alpha": BUILT,
    "lora_dropout": BUILT,
    "use_dora": BUILT,
    "lora_format": BUILT,
    "lora_init_type": refused(_LORA_INIT, "default"),
    "init_lora": refused(_LORA_INIT),
    "init_lokr_norm": refused(_LORA_INIT),
    "peft_lora_mode": refused(_LORA_INIT, "standard"),
    "singlora_ramp_up_steps": refused(_LORA_INIT, 0),
    "slider_lora_target": refused(_LORA_INIT),
    "layer_freeze_strategy": refused("difftune trains every adapter weight; remove it"),
    "train_text_encoder": BUILT,
    "text_encoder_lr": BUILT,
    "text_encoder_limit": refused(_TEXT_ENCODER),
    "freeze_encoder_after": refused(_TEXT_ENCODER),
    "freeze_encoder_before": refused(_TEXT_ENCODER),
    "freeze_encoder_strategy": refused(_TEXT_ENCODER),
    "save_text_encoder": refused(_TEXT_ENCODER, True, "true"),  # train_text_encoder always saves them
    # objective: noise, timesteps, loss
    "snr_gamma": BUILT,
    "snr_weight": refused("use snr_gamma; remove it", 1),
    "use_soft_min_snr": BUILT,
    "soft_min_snr_sigma_data": refused("use snr_gamma (min-SNR); remove it"),
    "noise_offset": BUILT,
    "offset_noise": BUILT,
    "noise_offset_probability": BUILT,
    "input_perturbation": BUILT,
    "input_perturbation_steps": BUILT,
    "loss_type": BUILT,
    "huber_c": BUILT,
    "huber_schedule": BUILT,
    "masked_loss_probability": BUILT,
    "timestep_bias_strategy": BUILT,
    "timestep_bias_begin": BUILT,
    "timestep_bias_end": BUILT,
    "timestep_bias_multiplier": BUILT,
    "timestep_bias_portion": BUILT,
    "disable_segmented_timestep_sampling": cosmetic(
        "difftune draws each sample's timestep independently from the same distribution"
    ),
    "training_scheduler_timestep_spacing": refused(_TIMESTEPS),
    "inference_scheduler_timestep_spacing": _VALIDATION,
    "rescale_betas_zero_snr": refused("difftune uses the model's noise schedule as published; remove it"),
    "flow_schedule_shift": BUILT,
    "flow_schedule_auto_shift": BUILT,
    "flow_use_uniform_schedule": BUILT,
    "flow_sigmoid_scale": BUILT,
    "flow_use_beta_schedule": BUILT,
    "flow_beta_schedule_alpha": BUILT,
    "flow_beta_schedule_beta": BUILT,
    "tread_config": BUILT,
    "diff2flow_enabled": BUILT,
    "diff2flow_loss": BUILT,
    "scheduled_sampling_max_step_offset": BUILT,
    "scheduled_sampling_probability": BUILT,
    "scheduled_sampling_ramp_steps": BUILT,
    "scheduled_sampling_sampler": BUILT,
    "scheduled_sampling_order": refused("difftune takes first-order rollout steps; remove it", 1),
    "scheduled_sampling_prob_start": refused("use scheduled_sampling_probability", 0),
    "scheduled_sampling_prob_end": refused("use scheduled_sampling_probability"),
    "scheduled_sampling_ramp_shape": refused("the ramp is linear; remove it", "linear"),
    "scheduled_sampling_start_step": refused("the ramp starts at step 0; remove it", 0),
    "scheduled_sampling_strategy": refused(
        "difftune draws the rollout offset uniformly; remove it", "uniform"
    ),
    "crepa_enabled": BUILT,
    "crepa_block_index": BUILT,
    "crepa_lambda": BUILT,
    "crepa_adjacent_distance": BUILT,
    "crepa_adjacent_tau": BUILT,
    "crepa_model": BUILT,
    "crepa_encoder_image_size": BUILT,
    "crepa_cumulative_neighbors": refused("use crepa_adjacent_distance; remove it"),
    "crepa_normalize_by_frames": refused(_NOT_YET),
    "crepa_spatial_align": refused(_NOT_YET),
    "sla_config": refused(_NOT_YET),
    # EMA
    "use_ema": BUILT,
    "ema_decay": BUILT,
    "ema_device": BUILT,
    "ema_cpu_only": refused("use ema_device: cpu"),
    "ema_update_interval": BUILT,
    "ema_foreach_disable": _SPEED,
    "ema_validation": BUILT,
    # checkpoints
    "checkpointing_steps": BUILT,
    "checkpoint_step_interval": BUILT,  # alias of checkpointing_steps
    "checkpoints_total_limit": BUILT,
    "resume_from_checkpoint": BUILT,
    "checkpoint_epoch_interval": _CHECKPOINTS,
    "checkpointing_rolling_steps": _CHECKPOINTS,
    "checkpointing_use_tempdir": _CHECKPOINTS,
    "checkpoints_rolling_total_limit": _CHECKPOINTS,
    "post_checkpoint_script": _CHECKPOINTS,
    # evaluation
    "eval_steps_interval": BUILT,
    "evaluation_type": BUILT,
    "pretrained_evaluation_model_name_or_path": BUILT,
    "eval_dataset_id": BUILT,
    "eval_dataset_pooling": cosmetic("how evaluation charts are grouped; difftune plots one eval loss"),
    "eval_epoch_interval": refused("use eval_steps_interval"),
    "eval_timesteps": BUILT,
    "num_eval_images": BUILT,
    # validation
    "validation_prompt": BUILT,
    "validation_negative_prompt": BUILT,
    "validation_resolution": BUILT,
    "validation_guidance": BUILT,
    "validation_guidance_rescale": BUILT,
    "validation_num_inference_steps": BUILT,
    "validation_steps": BUILT,
    "validation_step_interval": BUILT,  # alias of validation_steps
    "validation_seed": BUILT,
    "validation_disable": BUILT,
    "validation_num_video_frames": BUILT,
    "validation_preview": BUILT,
    "validation_preview_steps": BUILT,
    "num_validation_images": BUILT,
    "validation_adapter_config": _VALIDATION,
    "validation_adapter_mode": _VALIDATION,
    "validation_adapter_name": _VALIDATION,
    "validation_adapter_path": _VALIDATION,
    "validation_adapter_strength": _VALIDATION,
    "validation_disable_unconditional": _VALIDATION,
    "validation_epoch_interval": _VALIDATION,
    "validation_external_background": _VALIDATION,
    "validation_external_script": _VALIDATION,
    "validation_guidance_real": _VALIDATION,
    "validation_guidance_skip_layers": _VALIDATION,
    "validation_guidance_skip_layers_start": _VALIDATION,
    "validation_guidance_skip_layers_stop": _VALIDATION,
    "validation_guidance_skip_scale": _VALIDATION,
    "validation_lycoris_strength": BUILT,
    "validation_method": _VALIDATION,
    "validation_no_cfg_until_timestep": _VALIDATION,
    "validation_noise_scheduler": _VALIDATION,
    "validation_on_startup": _VALIDATION,
    "validation_prompt_library": _VALIDATION,
    "validation_randomize": _VALIDATION,
    "validation_seed_source": _VALIDATION,
    "validation_stitch_input_location": _VALIDATION,
    "validation_torch_compile": _VALIDATION,
    "validation_torch_compile_mode": _VALIDATION,
    "validation_using_datasets": _VALIDATION,
    "enable_watermark": _VALIDATION,
    # tracking and publishing
    "report_to": BUILT,
    "tracker_project_name": BUILT,
    "tracker_run_name": BUILT,
    "logging_dir": BUILT,
    "webhook_reporting_interval": BUILT,
    "push_to_hub": BUILT,
    "hub_model_id": BUILT,
    "tracker_image_layout": _TRACKING,
    "model_card_note": _TRACKING,
    "model_card_private": _TRACKING,
    "model_card_safe_for_work": _TRACKING,
    "push_checkpoints_to_hub": _TRACKING,
    "push_to_hub_background": _TRACKING,
    "publishing_config": _TRACKING,
    "post_upload_script": _TRACKING,
    "debug_aspect_buckets": _DEBUG,
    "debug_dataset_loader": _DEBUG,
    "print_filenames": _DEBUG,
    "print_sampler_statistics": _DEBUG,
    # model families difftune does not train
    "flux_attention_masked_training": _OTHER_FAMILY,
    "flux_fast_schedule": _OTHER_FAMILY,
    "flux_guidance_max": _OTHER_FAMILY,
    "flux_guidance_min": _OTHER_FAMILY,
    "flux_guidance_mode": _OTHER_FAMILY,
    "flux_guidance_value": _OTHER_FAMILY,
    "flux_lora_target": _OTHER_FAMILY,
    "hidream_load_balancing_loss_weight": _OTHER_FAMILY,
    "hidream_use_load_balancing_loss": _OTHER_FAMILY,
    "ltx_i2v_prob": _OTHER_FAMILY,
    "ltx_partial_noise_fraction": _OTHER_FAMILY,
    "ltx_protect_first_frame": _OTHER_FAMILY,
    "ltx_train_mode": _OTHER_FAMILY,
    "max_grounding_entities": _OTHER_FAMILY,
    "sana_complex_human_instruction": _OTHER_FAMILY,
    "sd3_clip_uncond_behaviour": _OTHER_FAMILY,
    "sd3_t5_uncond_behaviour": _OTHER_FAMILY,
    "t5_padding": _OTHER_FAMILY,
}

_S3 = cosmetic("cloud storage access; difftune reads local folders (type: local), so it never applies")

DATASET_KEYS: dict[str, Status] = {
    "id": BUILT,
    "type": BUILT,
    "dataset_type": BUILT,
    "instance_data_dir": BUILT,
    "disabled": BUILT,
    "default": BUILT,
    "probability": BUILT,
    "repeats": BUILT,
    "caption_strategy": BUILT,
    "instance_prompt": BUILT,
    "prepend_instance_prompt": BUILT,
    "only_instance_prompt": BUILT,
    "caption_shuffle": BUILT,
    "caption_filter_list": refused("edit the captions themselves; remove it"),
    "disable_multiline_split": refused(
        "difftune uses every line of a caption file as a caption; keep one line per file"
    ),
    "resolution": BUILT,
    "resolution_type": BUILT,
    "crop": BUILT,
    "crop_aspect": BUILT,
    "crop_aspect_buckets": BUILT,
    "crop_style": BUILT,
    "minimum_image_size": BUILT,
    "maximum_image_size": BUILT,
    "target_downsample_size": BUILT,
    "minimum_aspect_ratio": BUILT,
    "maximum_aspect_ratio": BUILT,
    "max_upscale_threshold": refused("difftune does not filter buckets by upscaling; remove it"),
    "cache_dir_vae": BUILT,
    "cache_dir": BUILT,
    "metadata_backend": BUILT,
    "write_batch_size": BUILT,
    "skip_file_discovery": BUILT,
    "video": BUILT,
    "conditioning_data": BUILT,
    "conditioning_type": BUILT,
    "conditioning": BUILT,
    "is_regularisation_data": BUILT,
    "source_dataset_id": refused("link conditioning datasets with conditioning_data on the image dataset"),
    "max_num_samples": refused("keep only the files you want in the folder"),
    "start_epoch": refused("difftune samples every dataset from the first epoch; remove it", 0, 1),
    "end_epoch": refused("difftune samples every dataset until the end; remove it"),
    "start_step": refused("difftune samples every dataset from the first step; remove it", 0),
    "end_step": refused("difftune samples every dataset until the end; remove it"),
    "ignore_epochs": refused("difftune samples every dataset in every epoch; remove it"),
    "timestep_sampling_offset": refused(_TIMESTEPS, 0),
    "slider_strength": refused(_LORA_INIT),
    "vae_cache_clear_each_epoch": BUILT,
    "hash_filenames": cosmetic("how cache files are named"),
    "cache_file_suffix": cosmetic("how cache files are named"),
    "cache_dir_conditioning_image_embeds": refused(_NOT_YET),
    "conditioning_image_embeds": refused(_NOT_YET),
    "conditioning_image_embed_batch_size": _SPEED,
    "image_embeds": refused(_NOT_YET),
    "text_embeds": cosmetic("difftune keeps one text cache, in the default text_embeds dataset"),
    "audio": refused("difftune trains on images and videos only; remove it"),
    "grounding": _OTHER_FAMILY,
    "huggingface": BUILT,
    "parquet": BUILT,
    "csv_file": refused("use caption_strategy csv with metadata_file"),
    "csv_caption_column": refused("use caption_strategy csv with metadata_file"),
    "csv_url_column": refused("download the images to a folder and use type: local"),
    "csv_cache_dir": refused("download the images to a folder and use type: local"),
    "aws_access_key_id": _S3,
    "aws_bucket_name": refused("copy the bucket to a folder and use type: local"),
    "aws_data_prefix": _S3,
    "aws_endpoint_url": _S3,
    "aws_region_name": _S3,
    "aws_secret_access_key": _S3,
    "memory_filesystem_path": _SPEED,
    "memory_filesystem_size": _SPEED,
    "memory_filesystem_sudo": _SPEED,
    "delete_nsfw_images": refused(_DATA_FILTER),
    "delete_problematic_images": _SKIPPED_ANYWAY,
    "delete_unwanted_images": _SKIPPED_ANYWAY,
    "scan_for_errors": _SKIPPED_ANYWAY,
    "disable_validation": _VALIDATION,
    "metadata_update_interval": _SPEED,
    "preserve_data_backend_cache": _SPEED,
    "text_cache_disable": _SPEED,
    "text_cache_ondemand": _SPEED,
    "text_encoder_batch_size": _SPEED,
    "vae_cache_disable": _SPEED,
    "vae_cache_ondemand": _SPEED,
}

VIDEO_KEYS: dict[str, Status] = {
    "num_frames": BUILT,
    "min_frames": BUILT,
    "max_frames": BUILT,
    "is_i2v": BUILT,
    "bucket_strategy": BUILT,
    "frame_interval": BUILT,
}


def counts(table: dict[str, Status]) -> dict[str, int]:
    """{'built': n, 'refused': n, 'cosmetic': n} for one table."""
    result = {"built": 0, "refused": 0, "cosmetic": 0}
    for status in table.values():
        result[type(status).__name__.lower()] += 1
    return result
