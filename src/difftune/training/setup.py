"""The pieces the recipe assembles before its first step: accelerator, event sinks, trainable denoiser."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from difftune.config import LoadedConfig
from difftune.config.schema import TrainConfig
from difftune.events import ConsoleReporter, EventBus, JsonlLog, TensorboardWriter, WandbWriter
from difftune.families.base import Family


def build_accelerator(config: TrainConfig):
    """accelerate's Accelerator for this config; CPU-only machines run with cpu=True."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    mixed = config.mixed_precision
    if mixed == "fp16" and not torch.cuda.is_available():
        warnings.warn("mixed_precision fp16 needs a GPU; training in bf16 on the CPU instead", stacklevel=2)
        mixed = "bf16"
    return Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        cpu=not torch.cuda.is_available(),
        dataloader_config=DataLoaderConfiguration(),
    )


def weight_dtype_for(config: TrainConfig, device: torch.device) -> torch.dtype:
    """dtype of the frozen weights: the mixed-precision dtype (fp32 when mixed_precision is no)."""
    if config.mixed_precision == "no" or config.base_model_default_dtype == "fp32":
        return torch.float32
    if config.mixed_precision == "fp16" and device.type == "cuda":
        return torch.float16
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

        bus.subscribe(webhook_subscriber(config.webhook_config, config.webhook_reporting_interval, warn=bus.emit))
    log_dir = output_dir / config.logging_dir
    if config.report_to in ("tensorboard", "all"):
        bus.subscribe(TensorboardWriter(log_dir))
    if config.report_to in ("wandb", "all"):
        try:
            bus.subscribe(WandbWriter(config.tracker_project_name, config.tracker_run_name,
                                      config.model_dump(mode="json"), log_dir))
        except ImportError:
            bus.emit("warning", {"message": "report_to wandb: wandb is not installed (pip install wandb); "
                                            "not reporting to it"})
    return bus


def text_cache_dir(loaded: LoadedConfig) -> Path:
    """The text_embeds dataset's cache_dir, else cache/text/<family>."""
    dataset = getattr(loaded, "text_embeds_dataset", None)
    if dataset is not None and dataset.cache_dir:
        return Path(dataset.cache_dir)
    return Path("cache") / "text" / loaded.train.model_family


def prepare_denoiser(family: Family, components, config: TrainConfig, weight_dtype: torch.dtype) -> torch.nn.Module:
    """Make the denoiser trainable: a LoRA on the frozen base, or every weight for full training."""
    denoiser = components.denoiser
    if config.model_type == "lora":
        from difftune.training.adapters import attach_lora

        denoiser.requires_grad_(False)
        denoiser.to(dtype=weight_dtype)
        attach_lora(denoiser, family, config)
    elif config.model_type == "full":
        denoiser.to(dtype=torch.float32)
        denoiser.requires_grad_(True)
    else:
        raise ValueError(f"model_type '{config.model_type}' is not built yet; use lora or full")
    if config.gradient_checkpointing and hasattr(denoiser, "enable_gradient_checkpointing"):
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    return denoiser


def save_final_weights(family: Family, model: torch.nn.Module, config: TrainConfig,
                       output_dir: Path) -> tuple[Path | None, Path | None]:
    """pytorch_lora_weights.safetensors for LoRA (plus the ComfyUI layout on request), else the model."""
    if config.model_type == "lora":
        from difftune.training.adapters import export_comfyui, lora_state_dict

        path = family.save_lora(output_dir, lora_state_dict(model))
        if config.lora_format == "comfyui":
            export_comfyui(path, output_dir / "pytorch_lora_weights_comfyui.safetensors",
                           prefix=f"lora_{family.adapter_prefix}")
        return path, None
    folder = output_dir / family.adapter_prefix
    model.save_pretrained(folder)
    return None, folder
