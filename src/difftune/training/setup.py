"""The pieces the recipe assembles before its first step: accelerator, event sinks, trainable denoiser."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from difftune.config import LoadedConfig
from difftune.config.schema import TrainConfig
from difftune.events import ConsoleReporter, EventBus, JsonlLog, TensorboardWriter, WandbWriter
from difftune.families.base import Family


@dataclass(frozen=True)
class Placement:
    """Where a run trains and with which mixed precision; `note` says why that differs from the config."""

    device: str  # "cuda", "mps" (Apple Silicon) or "cpu"
    mixed_precision: str  # "bf16", "fp16" or "no", as accelerate takes it
    note: str | None = None


def mps_supports_bf16() -> bool:
    """bf16 on Apple's MPS backend needs macOS 14 or newer (accelerate makes the same check)."""
    return torch.backends.mps.is_macos_or_newer(14, 0)


def choose_placement(mixed_precision: str) -> Placement:
    """CUDA when present, else Apple's MPS, else the CPU; fp16 only on CUDA, bf16 on MPS only where
    macOS supports it (else fp32)."""
    if torch.cuda.is_available():
        return Placement("cuda", mixed_precision)
    if torch.backends.mps.is_available():
        if mixed_precision == "no" or (mixed_precision == "bf16" and mps_supports_bf16()):
            return Placement("mps", mixed_precision)
        if mps_supports_bf16():
            return Placement("mps", "bf16", "mixed_precision fp16 is CUDA-only; training in bf16 on mps")
        return Placement(
            "mps", "no", f"mixed_precision {mixed_precision}: bf16 on mps needs macOS 14; training in fp32"
        )
    if mixed_precision == "fp16":
        return Placement(
            "cpu", "bf16", "mixed_precision fp16 needs a GPU; training in bf16 on the CPU instead"
        )
    return Placement("cpu", mixed_precision)


def build_accelerator(config: TrainConfig):
    """accelerate's Accelerator on the device choose_placement picks (CUDA, Apple's mps, or the CPU)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration

    placement = choose_placement(config.mixed_precision)
    # accelerate keeps one precision per process; a run is a fresh start even when an earlier run in
    # this process (a notebook, the tests) used another one. The process group itself is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(
        mixed_precision=placement.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        cpu=placement.device == "cpu",
        dataloader_config=DataLoaderConfiguration(),
    )


def weight_dtype_for(config: TrainConfig, device: torch.device) -> torch.dtype:
    """dtype of the frozen weights: the mixed-precision dtype (fp32 when mixed_precision is no, and on
    mps without bf16)."""
    if config.mixed_precision == "no" or config.base_model_default_dtype == "fp32":
        return torch.float32
    if config.mixed_precision == "fp16" and device.type == "cuda":
        return torch.float16
    if device.type == "mps" and not mps_supports_bf16():
        return torch.float32
    return torch.bfloat16


def default_bus(config: TrainConfig, output_dir: Path, is_main: bool) -> EventBus:
    """events.jsonl, the console progress bar and the configured tracker."""
    bus = EventBus()
    if not is_main:
        return bus
    bus.subscribe(JsonlLog(output_dir / "events.jsonl"))
    bus.subscribe(ConsoleReporter())
    if config.webhook_config:
        from difftune.webhooks import webhook_subscriber

        bus.subscribe(
            webhook_subscriber(config.webhook_config, config.webhook_reporting_interval, warn=bus.emit)
        )
    log_dir = output_dir / config.logging_dir
    if config.report_to in ("tensorboard", "all"):
        bus.subscribe(TensorboardWriter(log_dir))
    if config.report_to in ("wandb", "all"):
        try:
            bus.subscribe(
                WandbWriter(
                    config.tracker_project_name,
                    config.tracker_run_name,
                    config.model_dump(mode="json"),
                    log_dir,
                )
            )
        except ImportError:
            bus.emit(
                "warning",
                {
                    "message": "report_to wandb: wandb is not installed (pip install wandb); "
                    "not reporting to it"
                },
            )
    return bus


def text_cache_dir(loaded: LoadedConfig) -> Path:
    """The text_embeds dataset's cache_dir, else cache/text/<family>."""
    dataset = getattr(loaded, "text_embeds_dataset", None)
    if dataset is not None and dataset.cache_dir:
        return Path(dataset.cache_dir)
    return Path("cache") / "text" / loaded.train.model_family


def prepare_frozen(family: Family, components, config: TrainConfig, device: torch.device) -> list[str]:
    """Quantise the text encoders as asked, set the VAE's memory options, and keep the frozen parts
    off the accelerator while idle (offload_during_startup / enable_model_cpu_offload); returns notes."""
    from difftune.training.memory import configure_vae, offload_when_idle, quantize_module

    for index, encoder in enumerate(components.text_encoders, start=1):
        precision = getattr(config, f"text_encoder_{index}_precision", "no_change")
        if precision != "no_change":
            quantize_module(encoder, precision, device=device)
    notes = configure_vae(components.vae, config) if components.vae is not None else []
    if (config.offload_during_startup or config.enable_model_cpu_offload) and device.type != "cpu":
        # each frozen part is moved to the device only while it runs, so no two are resident together
        for module in [*components.text_encoders, components.vae]:
            if module is not None:
                offload_when_idle(module, device)
    return notes


def prepare_denoiser(
    family: Family,
    components,
    config: TrainConfig,
    weight_dtype: torch.dtype,
    device: torch.device | None = None,
    emit=None,
) -> torch.nn.Module:
    """Make the denoiser trainable: a LoRA or LyCORIS adapter on the frozen (optionally quantised) base,
    or every weight; then gradient checkpointing, the attention backend and group offload as the
    config says. `emit` receives the adapter's warnings. The modules the model keeps in fp32
    (`_keep_in_fp32_modules`) stay fp32 and run outside autocast; those the family names in
    `fp32_weight_modules` keep fp32 weights."""
    from difftune.training.memory import (
        apply_offload,
        enable_checkpointing,
        quantize_module,
        set_attention_backend,
    )
    from difftune.training.precision import keep_fp32_modules, keep_fp32_weights

    denoiser = components.denoiser
    if config.model_type in ("lora", "lycoris"):
        denoiser.requires_grad_(False)
        if next(denoiser.parameters()).dtype != weight_dtype:
            denoiser.to(dtype=weight_dtype)
        keep_fp32_modules(denoiser)
        keep_fp32_weights(denoiser, family.fp32_weight_modules())
        quantised = config.base_model_precision != "no_change"
        if quantised:
            quantize_module(denoiser, config.base_model_precision, device=device)
        if config.model_type == "lora":
            from difftune.training.adapters import attach_lora

            attach_lora(denoiser, family, config)
        else:
            from difftune.config.lycoris import read_lycoris_config
            from difftune.training.lycoris import attach_lycoris

            settings = read_lycoris_config(config.lycoris_config)
            for warning in attach_lycoris(denoiser, settings, config.lycoris_config, quantised):
                if emit is not None:
                    emit("warning", {"message": warning})
    elif config.model_type == "full":
        if config.base_model_precision != "no_change":
            raise ValueError(
                "base_model_precision quantises the frozen base of a LoRA; full training "
                "updates every weight, so use base_model_precision: no_change with model_type full"
            )
        denoiser.to(dtype=torch.float32)
        denoiser.requires_grad_(True)
        keep_fp32_modules(denoiser)  # fp32 already, but mixed-precision autocast would run them in bf16
    else:
        raise ValueError(f"model_type '{config.model_type}' is not built; use lora, lycoris or full")
    if config.gradient_checkpointing:
        enable_checkpointing(denoiser, config.gradient_checkpointing_interval)
    set_attention_backend(denoiser, config.attention_mechanism)
    if config.enable_group_offload:
        apply_offload(denoiser, config, device or torch.device("cpu"))
    if config.compile_model:
        denoiser.compile()  # in place: the module stays the pipeline's denoiser
    denoiser.train()
    return denoiser


def prepare_for_accelerator(
    accelerator, denoiser: torch.nn.Module, optimizer, config: TrainConfig, sharded: bool
):
    """accelerate's wrappers for the denoiser (DDP) and the optimizer -> (denoiser, optimizer).

    The LR schedule is left out on purpose: accelerate's scheduler wrapper steps it num_processes times
    per optimizer step (for data loaders that grow the batch with the process count), which would run a
    schedule counted in optimizer steps N times too fast; see `optim.step_lr_schedule`.
    """
    if sharded:  # fully_shard already distributes the denoiser; DDP must not wrap it
        return denoiser, accelerator.prepare(optimizer)
    # group offload places the denoiser's blocks itself
    placement = [not config.enable_group_offload, True]
    return accelerator.prepare(denoiser, optimizer, device_placement=placement)


def save_final_weights(
    family: Family,
    model: torch.nn.Module,
    config: TrainConfig,
    output_dir: Path,
    full_state: dict[str, torch.Tensor] | None = None,
    text_encoders=None,
) -> tuple[Path | None, Path | None]:
    """pytorch_lora_weights.safetensors for LoRA (plus the ComfyUI layout on request), else the model.

    `full_state`: the gathered trainable weights of a sharded (FSDP2) model, written instead of its shards.
    `text_encoders`: the trained text encoders' LoRA (TextEncoderTraining), written into the same file
    before the ComfyUI export reads it.
    """
    from difftune.training.distributed import lora_from_full_state, save_full_model

    if config.model_type == "lycoris":
        from difftune.training.lycoris import lycoris_from_full_state, lycoris_state_dict, save_lycoris

        state = (
            lycoris_state_dict(model) if full_state is None else lycoris_from_full_state(model, full_state)
        )
        return save_lycoris(output_dir, state, config.lycoris_config), None
    if config.model_type == "lora":
        from difftune.training.adapters import comfyui_dora_scales, export_comfyui, lora_state_dict

        lora = lora_state_dict(model) if full_state is None else lora_from_full_state(model, full_state)
        path = family.save_lora(output_dir, lora)
        if text_encoders is not None:
            text_encoders.save(path)
        if config.lora_format == "comfyui":
            export_comfyui(
                path,
                output_dir / "pytorch_lora_weights_comfyui.safetensors",
                family.adapter_prefix,
                text_encoders=family.kohya_text_encoders(),
                dora_scales=comfyui_dora_scales(model) if config.use_dora else None,
            )
        return path, None
    folder = output_dir / family.adapter_prefix
    if full_state is not None:
        return None, save_full_model(model, full_state, folder)
    model.save_pretrained(folder)
    return None, folder


def check_dataset_folders(datasets) -> None:
    """Before the model load: each enabled dataset's folder exists, a training dataset holds media
    files, and a textfile dataset has captions (a DataError naming the dataset and the fix otherwise)."""
    from difftune.data.discovery import list_media_files
    from difftune.data.errors import DataError

    for dataset in datasets:
        folder = dataset.instance_data_dir
        if not folder or dataset.disabled or dataset.type == "huggingface":  # written from its rows later
            continue
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise DataError(
                f"dataset '{dataset.id}': instance_data_dir {folder} is not a folder; create it and put the "
                "training files there, or fix the path in the data backend config"
            )
        if dataset.dataset_type not in ("image", "video"):
            continue
        files = list_media_files(
            root, video=dataset.dataset_type == "video", follow_outside=dataset.follow_symlinks_outside_root
        )
        if not files:
            raise DataError(
                f"dataset '{dataset.id}': {root} holds no {dataset.dataset_type} files "
                "(subfolders included) — put the training files there, or fix instance_data_dir"
            )
        if dataset.caption_strategy == "textfile" and not any(f.with_suffix(".txt").is_file() for f in files):
            raise DataError(
                f"dataset '{dataset.id}': caption_strategy is textfile, but none of the {len(files)} files "
                f"in {root} has a caption file beside it ({files[0].name} needs {files[0].stem}.txt) — add "
                "the .txt captions, or set caption_strategy to filename (captions from the file names) or "
                "instanceprompt (one instance_prompt for every file)"
            )


def check_fetchable_models(config: TrainConfig) -> None:
    """Before the model load: the extra models the run loads later (CREPA's encoder, the CLIP-score
    model) are local, cached or downloadable now; an OSError naming the setting otherwise."""
    from difftune.offline import check_fetchable

    if config.crepa_enabled:
        from difftune.training.crepa import ENCODER_HUB_IDS

        check_fetchable(ENCODER_HUB_IDS.get(config.crepa_model, config.crepa_model), "crepa_model")
    if config.evaluation_type == "clip":
        check_fetchable(
            config.pretrained_evaluation_model_name_or_path, "pretrained_evaluation_model_name_or_path"
        )


def check_block_indices(family: Family, config: TrainConfig) -> None:
    """Before the model load: TREAD routes and crepa_block_index fit the denoiser's blocks, when the
    model's config says how many there are (a ConfigError naming the key otherwise)."""
    from difftune.errors import ConfigError

    count = family.denoiser_block_count()
    if count is None:
        return
    if config.tread_config:
        from difftune.training.tread import parse_routes, resolve_routes

        resolve_routes(parse_routes(config.tread_config), count)
    index = config.crepa_block_index
    if config.crepa_enabled and not -count <= index < count:
        raise ConfigError(
            f"'crepa_block_index' is {index}, but {family.model_id()} has {count} transformer blocks "
            f"— use 0..{count - 1} (or -{count}..-1 from the end); an early block, about a quarter of "
            f"the depth ({count // 4}), works best"
        )


def check_adapter_targets(config: TrainConfig, denoiser: torch.nn.Module) -> None:
    """A LyCORIS file whose targets match nothing in the loaded denoiser stops the run before the
    caches are filled (ConfigError naming the file and the classes that exist)."""
    if config.model_type != "lycoris":
        return
    from difftune.config.lycoris import read_lycoris_config
    from difftune.training.lycoris import check_targets

    check_targets(denoiser, read_lycoris_config(config.lycoris_config), config.lycoris_config)


def load_components(family: Family, device: torch.device, weight_dtype: torch.dtype):
    """family.load, with a message that says what to check when the weights cannot be fetched or read."""
    try:
        return family.load(device, weight_dtype)
    except OSError as exc:
        raise OSError(
            f"could not load the {family.name} model from '{family.model_id()}': {exc}\n"
            "Check model_flavour / pretrained_model_name_or_path, that you are logged in "
            "(huggingface-cli login) for gated models, and that the Hub is reachable (HF_ENDPOINT for "
            "a mirror); a local folder must be in the diffusers layout (model_index.json + subfolders)."
        ) from exc
