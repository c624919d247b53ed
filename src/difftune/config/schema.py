"""Typed schema of config.json (TrainConfig) and multidatabackend.json (DatasetConfig).

Attribute names are the original tool's key names (the quickstarts' spelling). Aliases (older or
newer names of the same key) are mapped in `difftune.config.load` before validation; values that
arrive as strings ("true", "1e-4", "20") are converted by pydantic's lax mode.
"""

from __future__ import annotations

import ast
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from difftune.config.dataset_blocks import ConditioningGenerator, HuggingfaceConfig, ParquetConfig
from difftune.config.strict import StrictModel as _Strict

SEED_MAX = 2**32 - 1  # torch and numpy seeds are unsigned 32-bit
MAX_SIDE_PIXELS = 16384  # larger images or videos than this are a typo, and would not fit in memory
MAX_LORA_RANK = 4096  # beyond the width of any layer of the supported models
MAX_REPEATS = 10_000  # a dataset repeated more than this is a typo (and the epoch would never end)


Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]


Precision = Literal[
    "no_change",
    "int8-quanto",
    "int4-quanto",
    "int2-quanto",
    "fp8-quanto",
    "fp8uz-quanto",
    "int8-torchao",
    "fp8-torchao",
    "nf4-bnb",
]


ResolutionType = Literal["pixel", "area", "pixel_area"]
CaptionStrategy = Literal["filename", "textfile", "instanceprompt", "jsonl", "csv", "parquet", "huggingface"]
CropAspect = Literal["square", "preserve", "closest", "random"]
CropStyle = Literal["center", "centre", "random", "corner"]


def refuse_face_crops(value: Any) -> Any:
    """crop_style face needs a face detector, which difftune does not have."""
    if isinstance(value, str) and value.strip().lower() == "face":
        raise ValueError(
            "crop_style face (crops around detected faces) is not built; use random, center or corner"
        )
    return value


def parse_resolutions(value: str | int | float) -> list[tuple[int, int]]:
    """'1024x1024,1280x768' or '1024' -> [(width, height), ...]."""
    sizes = []
    if isinstance(value, bool):
        raise ValueError("expected sizes like '1024x1024' or '1024x1024,1280x768', not true or false")
    for part in str(value).replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "x" in part.lower():
                w, h = part.lower().split("x", 1)
                sizes.append((int(float(w)), int(float(h))))
            else:
                side = int(float(part))
                sizes.append((side, side))
        except ValueError:
            raise ValueError(
                f"'{part}' is not a size; expected sizes like '1024x1024' or '1024x1024,1280x768'"
            ) from None
    if not sizes:
        raise ValueError("expected sizes like '1024x1024' or '1024x1024,1280x768'")
    for width, height in sizes:
        if not (1 <= width <= MAX_SIDE_PIXELS and 1 <= height <= MAX_SIDE_PIXELS):
            raise ValueError(
                f"'{width}x{height}' is not a usable size; each side must be from 1 to {MAX_SIDE_PIXELS} pixels"
            )
    return sizes


def parse_optimizer_config(text: str | None) -> dict[str, Any]:
    """'weight_decay=0.1,betas=(0.9,0.99)' -> {'weight_decay': 0.1, 'betas': (0.9, 0.99)}."""
    if not text:
        return {}
    options: dict[str, Any] = {}
    depth, current, parts = 0, "", []
    for char in text:
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    for part in filter(None, (p.strip() for p in parts)):
        if "=" not in part:
            raise ValueError(f"'{part}' is not key=value (write e.g. 'd_coef=0.5,weight_decay=0.01')")
        key, value = (s.strip() for s in part.split("=", 1))
        words = {"true": True, "false": False, "none": None}
        if value.lower() in words:
            options[key] = words[value.lower()]
            continue
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options


class TrainConfig(_Strict):
    """Every setting of config.json that difftune honours."""

    # model
    model_family: str
    model_flavour: str | None = None
    model_type: Literal["lora", "full", "lycoris"] = "full"
    pretrained_model_name_or_path: str | None = None
    pretrained_vae_model_name_or_path: str | None = None
    revision: str | None = None
    prediction_type: Literal["epsilon", "v_prediction", "sample", "flow_matching"] | None = None

    # files
    output_dir: str = "output/models"
    data_backend_config: str = "config/multidatabackend.json"
    user_prompt_library: str | None = None
    lycoris_config: str = "config/lycoris_config.json"
    webhook_config: str | dict[str, Any] | list[dict[str, Any]] | None = None

    # batch and schedule
    train_batch_size: int = Field(4, ge=1)
    disable_bucket_pruning: bool = False  # honoured at train_batch_size 1, where no bucket is pruned
    allow_dataset_oversubscription: bool = False  # raise repeats of datasets too small for one step
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_train_steps: int | None = Field(None, ge=0)
    num_train_epochs: int = Field(1, ge=0)
    seed: Seed | None = None
    learning_rate: float = Field(4e-7, gt=0)
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    lr_num_cycles: float = Field(1.0, gt=0)
    lr_power: float = Field(1.0, gt=0)
    optimizer: Literal[
        "adamw_bf16",
        "adamw",
        "optimi-adamw",
        "optimi-lion",
        "prodigy",
        "adamw_schedulefree",
        "ao-adamw8bit",
        "bnb-adamw8bit",
        "bnb-adam8bit",
        "bnb-lion8bit",
    ] = "adamw_bf16"
    # prompt tokens the text encoders see, up to what the family's encoders take (its check refuses more,
    # or its encoding stops at their length). None: the family's own length.
    tokenizer_max_length: int | None = Field(None, ge=1)
    optimizer_config: str | None = None  # "key=value,key=value" passed to the optimizer
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    optimizer_beta1: float | None = Field(None, ge=0, lt=1)  # wins over adam_beta1
    optimizer_beta2: float | None = Field(None, ge=0, lt=1)  # wins over adam_beta2
    adam_weight_decay: float = Field(1e-2, ge=0)
    adam_epsilon: float = Field(1e-8, ge=0)
    max_grad_norm: float = Field(2.0, ge=0)
    grad_clip_method: Literal["value", "norm"] = "value"  # how max_grad_norm clips, as the original
    prodigy_steps: int = Field(0, ge=0)  # > 0: prodigy's step size stops adapting after these steps
    lr_end: float | None = Field(None, ge=0)  # where lr_scheduler polynomial ends (None: 1e-7)
    lr_scale: bool = False  # learning_rate x batch x accumulation x processes
    lr_scale_sqrt: bool = False  # with lr_scale: x the square root of that product

    # precision and memory
    mixed_precision: Literal["bf16", "fp16", "no"] = "bf16"
    gradient_checkpointing: bool = True
    gradient_checkpointing_interval: int | None = Field(None, ge=1)
    attention_mechanism: Literal["diffusers", "sdpa", "xformers", "flash", "sageattention"] = "sdpa"
    base_model_precision: Precision = "no_change"
    base_model_default_dtype: Literal["bf16", "fp32"] = "bf16"
    enable_group_offload: bool = False
    group_offload_type: Literal["block_level", "leaf_level"] = "block_level"
    group_offload_blocks_per_group: int = Field(1, ge=1)
    group_offload_use_stream: bool = False
    group_offload_to_disk_path: str | None = None
    enable_model_cpu_offload: bool = False
    offload_during_startup: bool = False
    vae_enable_patch_conv: bool = False
    vae_enable_tiling: bool = False
    vae_enable_slicing: bool = False
    vae_batch_size: int = Field(4, ge=1)
    vae_cache_ondemand: bool = False
    vae_cache_disable: bool = False
    compile_model: bool = False

    # adapters
    lora_rank: int = Field(16, ge=1, le=MAX_LORA_RANK)
    lora_alpha: float | None = Field(None, gt=0)  # defaults to lora_rank
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    use_dora: bool = False
    train_text_encoder: bool = False  # LoRA on the text encoders too (Family.text_encoder_lora_targets), see training/text_encoders.py
    text_encoder_lr: float | None = Field(None, gt=0)  # their learning rate (None: learning_rate)
    lora_format: Literal["diffusers", "comfyui"] = "diffusers"  # comfyui also writes the kohya layout

    # objective
    snr_gamma: float | None = Field(None, gt=0)
    noise_offset: float = Field(0.0, ge=0, le=1)
    caption_dropout_probability: float = Field(0.0, ge=0, le=1)
    flow_schedule_shift: float = Field(3.0, gt=0)
    flow_schedule_auto_shift: bool = False  # shift from each batch's latent size instead
    flow_use_uniform_schedule: bool = False
    flow_sigmoid_scale: float = Field(1.0, gt=0)
    flow_use_beta_schedule: bool = False
    flow_beta_schedule_alpha: float = Field(2.0, gt=0)
    flow_beta_schedule_beta: float = Field(2.0, gt=0)
    use_soft_min_snr: bool = False  # with snr_gamma: soft minimum SNR * gamma / (SNR + gamma)
    offset_noise: bool | None = None  # false: no offset noise; true: noise_offset (0.1 if unset)
    noise_offset_probability: float | None = Field(None, ge=0, le=1)  # None: 0.25 with offset_noise, else 1
    input_perturbation: float = Field(0.0, ge=0)
    input_perturbation_steps: int = Field(0, ge=0)  # > 0: decays linearly to 0 over these steps
    loss_type: Literal["l2", "huber", "smooth_l1"] = "l2"
    masked_loss_probability: float = Field(1.0, ge=0, le=1)  # share of batches a linked mask weights
    prior_loss_weight: float = Field(1.0, ge=0)  # loss weight of regularisation data (is_regularisation_data)
    huber_c: float = Field(0.1, gt=0)
    huber_schedule: Literal["snr", "exponential", "constant"] = "snr"
    timestep_bias_strategy: Literal["none", "earlier", "later", "range"] = "none"
    timestep_bias_multiplier: float = Field(1.0, gt=0)
    timestep_bias_begin: int = Field(0, ge=0, le=1000)
    timestep_bias_end: int = Field(1000, ge=0, le=1000)
    timestep_bias_portion: float = Field(0.25, gt=0, le=1)
    tread_config: dict[str, Any] | None = None
    # Diff2Flow (DDPM-style families): flow-matching time and inputs mapped onto the diffusion schedule
    diff2flow_enabled: bool = False
    diff2flow_loss: bool = False  # regress the velocity (noise - x0) instead of the native target

    # scheduled sampling (rollout), see difftune.training.scheduled_sampling
    scheduled_sampling_max_step_offset: int = Field(0, ge=0)  # 0 = off
    scheduled_sampling_probability: float = Field(0.0, ge=0, le=1)
    scheduled_sampling_ramp_steps: int = Field(0, ge=0)  # ramp the probability up from 0; 0 = no ramp
    scheduled_sampling_sampler: Literal["unipc", "euler"] = "unipc"  # both take first-order steps

    # multi-process: FSDP2 sharding of the denoiser, see difftune.training.distributed
    fsdp_enable: bool = False
    fsdp_version: int = Field(2, ge=2, le=2)  # FSDP2 only
    fsdp_reshard_after_forward: bool = True

    # CREPA temporal regulariser (video DiTs), see difftune.training.crepa
    crepa_enabled: bool = False
    crepa_block_index: int = 8
    crepa_lambda: float = Field(0.5, ge=0)
    crepa_adjacent_distance: int = Field(1, ge=0)
    crepa_adjacent_tau: float = Field(1.0, gt=0)
    crepa_model: str = "dinov2_vitg14"
    crepa_encoder_image_size: int = Field(518, ge=14, le=MAX_SIDE_PIXELS)
    crepa_drop_vae_encoder: bool = False

    # validation
    validation_prompt: str | None = None
    validation_negative_prompt: str = "blurry, cropped, ugly"
    validation_resolution: str = "1024x1024"
    validation_guidance: float = Field(7.5, ge=0)
    validation_guidance_rescale: float = Field(0.0, ge=0, le=1)
    validation_lycoris_strength: float = 1.0  # the LyCORIS multiplier while validating
    validation_num_inference_steps: int = Field(30, ge=1, le=1000)
    validation_steps: int = Field(100, ge=0)
    validation_seed: Seed | None = None
    validation_disable: bool = False
    validation_num_video_frames: int | None = Field(None, ge=1)
    validation_preview: bool = False
    validation_preview_steps: int = Field(1, ge=1)
    num_validation_images: int = Field(1, ge=1)
    framerate: int = Field(24, ge=1)

    # defaults of every dataset that does not set its own (the original tool's top-level keys)
    resolution: float | None = None
    resolution_type: ResolutionType | None = None
    minimum_image_size: float | None = None
    maximum_image_size: float | None = None
    target_downsample_size: float | None = None
    caption_strategy: CaptionStrategy | None = None
    instance_prompt: str | None = None
    prepend_instance_prompt: bool | None = None
    only_instance_prompt: bool | None = None
    crop: bool | None = None
    crop_aspect: CropAspect | None = None
    crop_aspect_buckets: list[float] | None = None
    crop_style: CropStyle | None = None
    cache_dir_vae: str | None = None  # may hold {id}, {model_family}, {output_dir}
    cache_dir_text: str | None = None  # the text_embeds dataset's cache_dir
    parquet_caption_column: str | None = None  # default caption column of parquet blocks
    parquet_filename_column: str | None = None  # default file-name column of parquet blocks

    # checkpoints
    checkpointing_steps: int = Field(500, ge=0)
    checkpoints_total_limit: int | None = Field(None, ge=1)
    resume_from_checkpoint: str | None = None
    allow_resume_outside_output_dir: bool = False  # a checkpoint from elsewhere is an explicit choice
    skip_checkpoint_on_disk_full: bool = False  # a full disk skips that checkpoint instead of stopping

    # tracking
    report_to: Literal["tensorboard", "wandb", "none", "all"] = "tensorboard"
    tracker_project_name: str = "difftune"
    tracker_run_name: str | None = None
    logging_dir: str = "logs"
    webhook_reporting_interval: int = Field(10, ge=1)

    # hub
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool | None = None

    # EMA of the trained weights
    use_ema: bool = False
    ema_decay: float = Field(0.995, gt=0, lt=1)
    ema_device: Literal["cpu", "accelerator"] = "cpu"
    ema_update_interval: int | None = Field(None, ge=1)  # optimizer steps between updates; None: every step
    # validation with the trained weights ("none"), the average ("ema_only") or both ("comparison")
    ema_validation: Literal["none", "ema_only", "comparison"] = "comparison"

    # evaluation: stable eval loss on a fixed slice at fixed timesteps and noise; CLIP score
    eval_steps_interval: int = Field(0, ge=0)  # 0: at every validation
    eval_batches: int = Field(2, ge=1)  # a fixed slice of the training batches
    eval_dataset_id: str | None = None  # the eval dataset scored (None: every enabled eval dataset)
    num_eval_images: int = Field(4, ge=1)  # samples of the eval datasets scored
    eval_timesteps: int | None = Field(None, ge=1, le=1000)  # fixed timesteps (None: 9 quantiles)
    evaluation_type: Literal["none", "clip"] = "none"
    pretrained_evaluation_model_name_or_path: str = "openai/clip-vit-large-patch14"

    @field_validator("crop_style", mode="before")
    @classmethod
    def _no_face_crops(cls, value: Any) -> Any:
        return refuse_face_crops(value)

    @field_validator("validation_resolution", mode="before")
    @classmethod
    def _check_resolution(cls, value: Any) -> str:
        parse_resolutions(value)
        return str(value)

    @field_validator("optimizer_config")
    @classmethod
    def _check_optimizer_config(cls, value: str | None) -> str | None:
        parse_optimizer_config(value)
        return value

    @field_validator("max_train_steps", mode="before")
    @classmethod
    def _zero_steps_means_epochs(cls, value: Any) -> Any:
        if isinstance(value, bool):  # false == 0: refused as a boolean, not read as "no limit"
            return value
        return None if value in (0, "0", "", None) else value

    @model_validator(mode="after")
    def _comfyui_dora_needs_whole_weights(self) -> TrainConfig:
        # ComfyUI's DoRA scale is computed from the base weights, which FSDP2 keeps sharded
        if self.fsdp_enable and self.use_dora and self.lora_format == "comfyui":
            raise ValueError(
                "lora_format comfyui with use_dora needs the whole base weights, which fsdp_enable shards; "
                "use lora_format diffusers (or train without fsdp_enable)"
            )
        return self

    @property
    def validation_sizes(self) -> list[tuple[int, int]]:
        """validation_resolution as [(width, height), ...]."""
        return parse_resolutions(self.validation_resolution)

    @property
    def effective_noise_offset(self) -> float:
        """noise_offset as applied: 0 with offset_noise false (the loader sets 0.1 for offset_noise alone)."""
        return 0.0 if self.offset_noise is False else self.noise_offset

    @property
    def effective_noise_offset_probability(self) -> float:
        """The share of batches that get offset noise: as set, else 0.25 with offset_noise (as the original), else 1."""
        if self.noise_offset_probability is not None:
            return self.noise_offset_probability
        return 0.25 if self.offset_noise else 1.0

    @property
    def optimizer_betas(self) -> tuple[float, float]:
        """(beta1, beta2): optimizer_beta1/2 where set, else adam_beta1/2."""
        first = self.optimizer_beta1 if self.optimizer_beta1 is not None else self.adam_beta1
        second = self.optimizer_beta2 if self.optimizer_beta2 is not None else self.adam_beta2
        return first, second

    @property
    def effective_lora_alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)


class VideoConfig(_Strict):
    """The `video` block of a video dataset."""

    num_frames: int = Field(125, ge=1, le=100_000)
    min_frames: int | None = Field(None, ge=1)  # defaults to num_frames
    max_frames: int | None = Field(None, ge=1)
    frame_rate: float | None = Field(None, gt=0)  # resample to this rate; None keeps the source's
    bucket_strategy: Literal["aspect_ratio", "resolution_frames"] = "aspect_ratio"
    frame_interval: int | None = Field(None, ge=1)
    is_i2v: bool | None = None


class CaptionShuffle(_Strict):
    """A dataset's `caption_shuffle` block: shuffled variants of tag-style captions, as the original tool.

    Each caption is split on `split_on` (comma, space or period); the first `position_start` tags keep
    their place and the rest are shuffled, `count` times, deterministically from `seed` (the run's
    seed when unset). The variants (and the original, with include_original) are the sample's
    captions, one picked per epoch.
    """

    enable: bool = False
    count: int = Field(1, ge=1, le=100)
    seed: int | None = None
    split_on: Literal["comma", "space", "period"] = "comma"
    position_start: int = Field(0, ge=0)
    include_original: bool = True


class DatasetConfig(_Strict):
    """One entry of multidatabackend.json."""

    id: str
    type: Literal["local", "huggingface"] = "local"
    # type huggingface: a Hub dataset id or a folder written by datasets' save_to_disk
    dataset_name: str | None = None
    split: str = "train"
    revision: str | None = None
    image_column: str = "image"
    video_column: str = "video"  # dataset_type video
    caption_column: str | list[str] | None = None  # None: "caption", else "text"
    fallback_caption_column: str | None = None
    huggingface: HuggingfaceConfig | None = None
    dataset_type: Literal["image", "video", "text_embeds", "image_embeds", "conditioning", "eval"] = "image"
    instance_data_dir: str | None = None
    follow_symlinks_outside_root: bool = False  # symbolic links to files or folders outside instance_data_dir
    disabled: bool = False
    default: bool = False
    probability: float = Field(1.0, ge=0)
    repeats: int = Field(0, ge=0, le=MAX_REPEATS)

    caption_strategy: CaptionStrategy = "filename"
    instance_prompt: str | None = None
    prepend_instance_prompt: bool = False
    only_instance_prompt: bool = False  # every caption of the dataset is instance_prompt
    caption_shuffle: CaptionShuffle | None = None
    caption_dropout_probability: float | None = Field(None, ge=0, le=1)  # None: the top-level value
    metadata_file: str | None = None  # jsonl/csv captions: file with file_name + caption columns
    parquet: ParquetConfig | None = None  # caption_strategy parquet: the table's file and columns

    resolution: float | None = Field(None, gt=0)
    resolution_type: ResolutionType = "pixel_area"
    crop: bool = False
    crop_aspect: CropAspect = "square"
    crop_aspect_buckets: list[Annotated[float, Field(gt=0)]] | None = None
    crop_style: CropStyle = "random"
    # a new random crop each epoch (crop_style random); None: on with random crops, as the original
    vae_cache_clear_each_epoch: bool | None = None
    minimum_image_size: float | None = Field(None, ge=0)
    maximum_image_size: float | None = Field(None, gt=0)
    target_downsample_size: float | None = Field(None, gt=0)
    minimum_aspect_ratio: float | None = Field(None, gt=0)
    maximum_aspect_ratio: float | None = Field(None, gt=0)

    cache_dir_vae: str | None = None
    cache_dir: str | None = None
    # parquet / huggingface: the original reads sizes from columns; difftune reads them from the files
    metadata_backend: Literal["discovery", "json", "parquet", "huggingface"] = "discovery"
    write_batch_size: int = Field(128, ge=1)
    skip_file_discovery: str = ""  # words among: vae aspect text metadata

    video: VideoConfig | None = None
    is_regularisation_data: bool = False  # trains toward the base model's prediction (prior preservation)
    conditioning_data: str | list[str] | None = None  # id(s) of linked conditioning datasets
    # conditioning datasets generated from this dataset's images (canny edge maps)
    conditioning: list[ConditioningGenerator] | None = None  # one block or a list of them
    # a conditioning dataset's role: source images (i2i; reference_* say the same) or loss masks
    conditioning_type: Literal["mask", "reference_strict", "reference_loose"] | None = None

    @model_validator(mode="after")
    def _resolution_in_range(self) -> DatasetConfig:
        # pixel / pixel_area give a side in pixels, area gives megapixels
        limit = MAX_SIDE_PIXELS if self.resolution_type != "area" else MAX_SIDE_PIXELS**2 / 1e6
        for key in ("resolution", "maximum_image_size", "target_downsample_size"):
            value = getattr(self, key)
            if value is not None and value > limit:
                raise ValueError(
                    f"dataset '{self.id}': '{key}' is {value:g}, but with resolution_type "
                    f"{self.resolution_type} it must be at most {limit:g}"
                )
        return self

    @field_validator("crop_style", mode="before")
    @classmethod
    def _no_face_crops(cls, value: Any) -> Any:
        return refuse_face_crops(value)

    @field_validator("conditioning", mode="before")
    @classmethod
    def _one_generator_is_a_list_of_one(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    @field_validator("conditioning_type", mode="before")
    @classmethod
    def _no_control_conditioning(cls, value: Any) -> Any:
        if value == "controlnet":
            raise ValueError(
                "difftune trains no ControlNet; use conditioning_type mask (loss masks) or leave it unset "
                "(source images for image-to-image)"
            )
        return value

    @field_validator("caption_shuffle", mode="before")
    @classmethod
    def _shuffle_flag(cls, value: Any) -> Any:
        if isinstance(value, bool) or (isinstance(value, str) and value.strip().lower() in ("true", "false")):
            return {"enable": str(value).strip().lower() == "true"}
        return value

    @model_validator(mode="before")
    @classmethod
    def _huggingface_captions(cls, values: Any) -> Any:
        """A type huggingface dataset takes its captions from its rows unless it says otherwise."""
        if (
            isinstance(values, dict)
            and values.get("type") == "huggingface"
            and "caption_strategy" not in values
        ):
            return {**values, "caption_strategy": "huggingface"}
        return values

    @model_validator(mode="after")
    def _needs_a_folder(self) -> DatasetConfig:
        if self.type == "huggingface" or self.caption_strategy == "huggingface":
            if self.type != "huggingface" or not self.dataset_name:
                raise ValueError(
                    f"dataset '{self.id}': type huggingface and caption_strategy huggingface go together, "
                    "with dataset_name (a Hub dataset id or a folder written by save_to_disk)"
                )
            return self
        if self.dataset_type in ("image", "video", "conditioning", "eval") and not self.disabled:
            if not self.instance_data_dir:
                raise ValueError(f"dataset '{self.id}' ({self.dataset_type}) needs instance_data_dir")
        if self.only_instance_prompt and not self.instance_prompt and self.dataset_type in ("image", "video"):
            raise ValueError(f"dataset '{self.id}': only_instance_prompt needs instance_prompt")
        if self.caption_strategy == "instanceprompt" and not self.instance_prompt:
            if self.dataset_type in ("image", "video"):
                raise ValueError(
                    f"dataset '{self.id}': caption_strategy instanceprompt needs instance_prompt"
                )
        return self
