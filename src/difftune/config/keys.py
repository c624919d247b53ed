"""Config keys as data: aliases, family defaults and flavours, and the original tool's key names.

Kept free of heavy imports so that loading a config never pulls in torch or diffusers. The family
tables mirror the `config_defaults` / `flavours` class data of the modules in `difftune.families`
(a test checks that they agree).
"""

from __future__ import annotations

import difflib

# Older or newer spellings of a config.json key -> the schema's name. An alias may also point at a
# key of the original tool that difftune has not built; the loader then warns that it is ignored.
TRAIN_ALIASES: dict[str, str] = {
    "checkpoint_step_interval": "checkpointing_steps",
    "validation_step_interval": "validation_steps",
    "use_gradient_checkpointing": "gradient_checkpointing",
    "frame_rate": "framerate",
    # flow-matching settings were named after Flux before they applied to every flow model
    "flux_schedule_shift": "flow_schedule_shift",
    "flux_schedule_auto_shift": "flow_schedule_auto_shift",
    "flux_use_uniform_schedule": "flow_use_uniform_schedule",
    "flow_matching_sigmoid_scale": "flow_sigmoid_scale",
    "flux_use_beta_schedule": "flow_use_beta_schedule",
    "flux_beta_schedule_alpha": "flow_beta_schedule_alpha",
    "flux_beta_schedule_beta": "flow_beta_schedule_beta",
}

# multidatabackend.json entries
DATASET_ALIASES: dict[str, str] = {
    "disable": "disabled",
    "is_regularization_data": "is_regularisation_data",
}

# the `video` block of a dataset: the quickstarts write frame_rate, older files fps or framerate
VIDEO_ALIASES: dict[str, str] = {"fps": "frame_rate", "framerate": "frame_rate"}

# Values of caption_strategy spelled the way the original tool's command line spells them.
CAPTION_STRATEGY_ALIASES: dict[str, str] = {"instance_prompt": "instanceprompt"}

# Family defaults win over the schema's global defaults for keys the user did not set.
FAMILY_DEFAULTS: dict[str, dict[str, object]] = {
    "sdxl": {"validation_guidance": 7.5, "validation_resolution": "1024x1024"},
    "kandinsky5-image": {
        "validation_guidance": 5.0,
        "flow_schedule_shift": 1.0,
        "validation_resolution": "1024x1024",
        "lora_rank": 16,
    },
    "kandinsky5-video": {
        "validation_guidance": 5.0,
        "flow_schedule_shift": 1.0,
        "validation_resolution": "512x768",
        "validation_num_video_frames": 61,
        "framerate": 24,
    },
}

# model_family -> model_flavour -> Hugging Face Hub id
FLAVOURS: dict[str, dict[str, str]] = {
    "sdxl": {"base-1.0": "stabilityai/stable-diffusion-xl-base-1.0"},
    "kandinsky5-image": {
        "t2i-lite-sft": "kandinskylab/Kandinsky-5.0-T2I-Lite-sft-Diffusers",
        "t2i-lite-pretrain": "kandinskylab/Kandinsky-5.0-T2I-Lite-pretrain-Diffusers",
        "i2i-lite-sft": "kandinskylab/Kandinsky-5.0-I2I-Lite-sft-Diffusers",
        "i2i-lite-pretrain": "kandinskylab/Kandinsky-5.0-I2I-Lite-pretrain-Diffusers",
    },
    "kandinsky5-video": {
        "t2v-lite-sft-5s": "kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers",
        "t2v-lite-pretrain-5s": "kandinskylab/Kandinsky-5.0-T2V-Lite-pretrain-5s-Diffusers",
        "t2v-lite-sft-10s": "kandinskylab/Kandinsky-5.0-T2V-Lite-sft-10s-Diffusers",
        "t2v-lite-pretrain-10s": "kandinskylab/Kandinsky-5.0-T2V-Lite-pretrain-10s-Diffusers",
        "t2v-pro-sft-5s-hd": "kandinskylab/Kandinsky-5.0-T2V-Pro-sft-5s-Diffusers",
        "t2v-pro-sft-10s-hd": "kandinskylab/Kandinsky-5.0-T2V-Pro-sft-10s-Diffusers",
        "t2v-pro-pretrain-5s-hd": "kandinskylab/Kandinsky-5.0-T2V-Pro-pretrain-5s-Diffusers",
        "t2v-pro-pretrain-10s-hd": "kandinskylab/Kandinsky-5.0-T2V-Pro-pretrain-10s-Diffusers",
        "i2v-lite-5s": "kandinskylab/Kandinsky-5.0-I2V-Lite-5s-Diffusers",
        "i2v-pro-sft-5s": "kandinskylab/Kandinsky-5.0-I2V-Pro-sft-5s-Diffusers",
    },
}

DEFAULT_FLAVOURS: dict[str, str] = {
    "sdxl": "base-1.0",
    "kandinsky5-image": "t2i-lite-sft",
    "kandinsky5-video": "t2v-lite-sft-5s",
}

# Video families: the VAE compresses time by this factor, so frame counts must be factor*k + 1.
TEMPORAL_COMPRESSION: dict[str, int] = {"kandinsky5-video": 4}


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Every config.json key of the original tool (its option list, 4.x documentation). A key here that
# the schema lacks is accepted with a warning that it is ignored.
ORIGINAL_TRAIN_KEYS: frozenset[str] = _names("""
    accelerator_cache_clear_interval adam_beta1 adam_beta2 adam_epsilon adam_weight_decay
    allow_dataset_oversubscription aspect_bucket_alignment aspect_bucket_disable_rebuild
    aspect_bucket_rounding aspect_bucket_worker_count attention_mechanism aws_max_pool_connections
    base_model_default_dtype base_model_precision cache_dir cache_dir_text cache_dir_vae caption_dropout_probability
    caption_strategy checkpoint_epoch_interval checkpoint_step_interval checkpointing_rolling_steps
    checkpointing_steps checkpointing_use_tempdir checkpoints_rolling_total_limit checkpoints_total_limit
    compress_disk_cache conditioning_image_embed_batch_size conditioning_multidataset_sampling control
    controlnet controlnet_custom_config controlnet_model_name_or_path crepa_adjacent_distance
    crepa_adjacent_tau crepa_block_index crepa_cumulative_neighbors crepa_enabled crepa_encoder_image_size
    crepa_lambda crepa_model crepa_normalize_by_frames crepa_spatial_align data_aesthetic_score
    data_backend_config data_backend_sampling dataloader_prefetch dataloader_prefetch_qlen debug_aspect_buckets
    debug_dataset_loader delete_nsfw_images delete_problematic_images delete_unwanted_images diff2flow_enabled
    diff2flow_loss disable_benchmark disable_bucket_pruning disable_segmented_timestep_sampling disable_tf32
    distillation_config distillation_method dynamo_backend dynamo_dynamic dynamo_fullgraph dynamo_mode
    dynamo_use_regional_compilation ema_cpu_only ema_decay ema_device ema_foreach_disable ema_update_interval
    ema_validation enable_group_offload enable_model_cpu_offload enable_multiprocessing enable_nsfw_check
    enable_watermark eval_dataset_id eval_dataset_pooling eval_epoch_interval eval_steps_interval eval_timesteps
    evaluation_type flow_beta_schedule_alpha flow_beta_schedule_beta flow_schedule_auto_shift flow_schedule_shift
    flow_sigmoid_scale flow_use_beta_schedule flow_use_uniform_schedule flux_attention_masked_training
    flux_fast_schedule flux_guidance_max flux_guidance_min flux_guidance_mode flux_guidance_value
    flux_lora_target framerate freeze_encoder_after freeze_encoder_before freeze_encoder_strategy
    fully_unload_text_encoder fuse_optimizer fuse_qkv_projections grad_clip_method gradient_accumulation_steps
    gradient_checkpointing gradient_checkpointing_interval gradient_precision group_offload_blocks_per_group
    group_offload_to_disk_path group_offload_type group_offload_use_stream hidream_load_balancing_loss_weight
    hidream_use_load_balancing_loss hub_model_id huber_c huber_schedule i_know_what_i_am_doing
    ignore_final_epochs ignore_missing_files image_processing_batch_size inference_scheduler_timestep_spacing
    init_lokr_norm init_lora input_perturbation input_perturbation_steps instance_prompt keep_vae_loaded
    layer_freeze_strategy learning_rate local_rank logging_dir lora_alpha lora_dropout lora_format
    lora_init_type lora_rank lora_type loss_type lr_end lr_num_cycles lr_power lr_scale lr_scale_sqrt
    lr_scheduler lr_warmup_steps ltx_i2v_prob ltx_partial_noise_fraction ltx_protect_first_frame ltx_train_mode
    lycoris_config masked_loss_probability max_grad_norm max_grounding_entities max_train_steps
    max_upscale_threshold max_workers maximum_image_size metadata_update_interval minimum_image_size
    mixed_precision model_card_note model_card_private model_card_safe_for_work model_family model_flavour
    model_type noise_offset noise_offset_probability nsfw_check_backend_types nsfw_check_min_votes
    nsfw_check_models nsfw_check_sample_types nsfw_check_video_frame_count nsfw_check_video_frame_selection
    nsfw_check_video_min_flagged_frames num_eval_images num_processes num_train_epochs num_validation_images
    offload_during_save offload_during_startup offload_param_path offset_noise only_instance_prompt optimizer
    optimizer_beta1 optimizer_beta2 optimizer_config optimizer_cpu_offload_method optimizer_offload_gradients
    optimizer_release_gradients output_dir override_dataset_config parquet_caption_column
    parquet_filename_column peft_lora_mode post_checkpoint_script post_upload_script prediction_type
    prepend_instance_prompt preserve_data_backend_cache pretrained_evaluation_model_name_or_path
    pretrained_model_name_or_path pretrained_t5_model_name_or_path pretrained_transformer_model_name_or_path
    pretrained_transformer_subfolder pretrained_unet_model_name_or_path pretrained_unet_subfolder
    pretrained_vae_model_name_or_path print_filenames print_sampler_statistics prodigy_steps publishing_config
    push_checkpoints_to_hub push_to_hub push_to_hub_background quantize_activations quantize_via ramtorch
    ramtorch_controlnet ramtorch_target_modules ramtorch_text_encoder ramtorch_vae read_batch_size
    refiner_training refiner_training_invert_schedule refiner_training_strength report_to
    rescale_betas_zero_snr resolution resolution_type resume_from_checkpoint revision sageattention_usage
    sana_complex_human_instruction save_text_encoder scheduled_sampling_max_step_offset scheduled_sampling_order
    scheduled_sampling_prob_end scheduled_sampling_prob_start scheduled_sampling_probability
    scheduled_sampling_ramp_shape scheduled_sampling_ramp_steps scheduled_sampling_sampler
    scheduled_sampling_start_step scheduled_sampling_strategy sd3_clip_uncond_behaviour sd3_t5_uncond_behaviour
    sdxl_refiner_uses_full_range seed seed_for_each_device set_grads_to_none singlora_ramp_up_steps
    skip_file_discovery sla_config slider_lora_target snr_gamma snr_weight soft_min_snr_sigma_data t5_padding
    target_downsample_size text_cache_disable text_encoder_1_precision text_encoder_2_precision
    text_encoder_3_precision text_encoder_4_precision text_encoder_batch_size text_encoder_limit text_encoder_lr
    timestep_bias_begin timestep_bias_end timestep_bias_multiplier timestep_bias_portion timestep_bias_strategy
    tokenizer_max_length torch_num_threads tracker_image_layout tracker_project_name tracker_run_name
    train_batch_size train_text_encoder training_scheduler_timestep_spacing tread_config unet_attention_slice
    use_dora use_ema use_soft_min_snr user_prompt_library vae_batch_size vae_cache_disable vae_cache_ondemand
    vae_cache_scan_behaviour vae_dtype vae_enable_patch_conv vae_enable_slicing vae_enable_tiling
    validation_adapter_config validation_adapter_mode validation_adapter_name validation_adapter_path
    validation_adapter_strength validation_disable validation_disable_unconditional validation_epoch_interval
    validation_external_background validation_external_script validation_guidance validation_guidance_real
    validation_guidance_rescale validation_guidance_skip_layers validation_guidance_skip_layers_start
    validation_guidance_skip_layers_stop validation_guidance_skip_scale validation_lycoris_strength
    validation_method validation_negative_prompt validation_no_cfg_until_timestep validation_noise_scheduler
    validation_num_inference_steps validation_num_video_frames validation_on_startup validation_preview
    validation_preview_steps validation_prompt validation_prompt_library validation_randomize
    validation_resolution validation_seed validation_seed_source validation_step_interval validation_steps
    validation_stitch_input_location validation_torch_compile validation_torch_compile_mode
    validation_using_datasets variant webhook_config webhook_reporting_interval write_batch_size
""")

# Every multidatabackend.json entry key of the original tool (its dataloader documentation).
ORIGINAL_DATASET_KEYS: frozenset[str] = _names("""
    audio aws_access_key_id aws_bucket_name aws_data_prefix aws_endpoint_url aws_region_name
    aws_secret_access_key cache_dir cache_dir_conditioning_image_embeds cache_dir_vae cache_file_suffix
    caption_filter_list caption_shuffle caption_strategy conditioning conditioning_data
    conditioning_image_embed_batch_size conditioning_image_embeds conditioning_type crop crop_aspect
    crop_aspect_buckets crop_style csv_cache_dir csv_caption_column csv_file csv_url_column dataset_type default
    delete_nsfw_images delete_problematic_images delete_unwanted_images disable_multiline_split
    disable_validation disabled end_epoch end_step grounding hash_filenames huggingface id ignore_epochs
    image_embeds instance_data_dir instance_prompt is_regularisation_data max_num_samples max_upscale_threshold
    maximum_aspect_ratio maximum_image_size memory_filesystem_path memory_filesystem_size memory_filesystem_sudo
    metadata_backend metadata_update_interval minimum_aspect_ratio minimum_image_size only_instance_prompt
    parquet prepend_instance_prompt preserve_data_backend_cache probability repeats resolution resolution_type
    scan_for_errors skip_file_discovery slider_strength source_dataset_id start_epoch start_step
    target_downsample_size text_cache_disable text_cache_ondemand text_embeds text_encoder_batch_size
    timestep_sampling_offset type vae_cache_clear_each_epoch vae_cache_disable vae_cache_ondemand video
    write_batch_size
""")

# The `video` block of a dataset in the original tool.
ORIGINAL_VIDEO_KEYS: frozenset[str] = _names(
    "num_frames min_frames max_frames is_i2v bucket_strategy frame_interval"
)


def nearest(word: str, choices: object) -> str | None:
    """The choice closest in spelling to `word`, or None when nothing is close."""
    matches = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return matches[0] if matches else None


def flavour_hub_id(family: str, flavour: str | None = None) -> str:
    """Hub id of a family's flavour (its default flavour when `flavour` is None).

    Raises ConfigError naming the valid flavours (and the nearest one) for an unknown flavour.
    """
    from difftune.config import ConfigError
    from difftune.families import REGISTRY, canonical_family_name

    name = canonical_family_name(family)
    if name not in FLAVOURS:
        raise ConfigError(f"model_family '{family}' is not known; use one of {', '.join(REGISTRY)}")
    chosen = flavour if flavour is not None else DEFAULT_FLAVOURS[name]
    if chosen not in FLAVOURS[name]:
        raise ConfigError(unknown_flavour_message(name, chosen))
    return FLAVOURS[name][chosen]


def unknown_flavour_message(family: str, flavour: str) -> str:
    """ "model_flavour 'X' is not a flavour of F; did you mean 'Y'? Valid flavours: ..."."""
    flavours = FLAVOURS[family]
    hint = nearest(flavour, flavours)
    guess = f"; did you mean '{hint}'?" if hint else "."
    return (
        f"model_flavour '{flavour}' is not a flavour of {family}{guess} "
        f"Valid flavours: {', '.join(flavours)} (default {DEFAULT_FLAVOURS[family]})"
    )
