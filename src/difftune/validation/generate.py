"""Validation generation: every prompt at every validation size through the family's own pipeline."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from difftune.config.schema import TrainConfig
from difftune.families.base import Components, Family, GenerationRequest
from difftune.validation.prompts import validation_prompts


def file_stem(name: str) -> str:
    """A prompt name as a safe file name ("my prompt/1" -> "my_prompt_1")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "prompt"


def _module_states(
    components: Components, denoiser: torch.nn.Module
) -> list[tuple[torch.nn.Module, bool, Any]]:
    """(module, training flag, device) of the denoiser, VAE and text encoders, to restore later."""
    modules = [denoiser, components.vae, *components.text_encoders]
    states = []
    for module in modules:
        if module is None:
            continue
        parameter = next(module.parameters(), None)
        states.append((module, module.training, parameter.device if parameter is not None else None))
    return states


def _previews(family, components, pipeline, config, events, folder: Path, step: int, stem: str):
    """The preview callback of one sample: its files are named after the sample's own file."""
    from difftune.validation.previews import preview_callback

    return preview_callback(
        pipeline,
        lambda latents: family.decode_pipeline_latents(components, latents),
        config.validation_preview_steps,
        events,
        out_dir=folder / "previews",
        step=step,
        name=stem,
    )


def run_validation(
    family: Family,
    components: Components,
    denoiser: torch.nn.Module,
    config: TrainConfig,
    step: int,
    output_dir: Path,
    events: Callable[[str, dict[str, Any]], None],
    conditioning_image=None,
    suffix: str = "",
    write: bool = True,
) -> list[Path]:
    """Write output_dir/validation/<step>/<name>-<W>x<H><suffix>.png for every prompt and validation size.

    conditioning_image (a PIL image) is passed as `image=` to image-conditioned pipelines (i2i, i2v).
    `suffix` tells passes of one step apart (the EMA weights' files end in "-ema"). `write` False
    generates without writing files or previews (and returns no paths): the other processes of a
    sharded (FSDP2) denoiser run every forward pass with the main one, which writes.

    Uses validation_guidance, validation_num_inference_steps, validation_negative_prompt and
    validation_seed (else seed, else 0; the same for every image, so steps compare). With
    num_validation_images > 1 the files end in -<i> and image i uses seed + i. The denoiser's
    weights, train/eval mode and device, and torch's global RNG are as they were afterwards.
    Emits events("validation_start", {"step", "prompts", "message"}) first (the web UI shows that it
    is validating) and events("validation", {"step", "paths"}) at the end; returns the paths.
    """
    prompts = validation_prompts(config)
    events(
        "validation_start", {"step": step, "prompts": len(prompts), "message": f"validating at step {step}"}
    )
    folder = Path(output_dir) / "validation" / str(step)
    folder.mkdir(parents=True, exist_ok=True)
    seed = config.validation_seed if config.validation_seed is not None else (config.seed or 0)
    states = _module_states(components, denoiser)
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    paths: list[Path] = []
    try:
        with torch.random.fork_rng(devices=cuda_devices), torch.no_grad():
            for module, _, _ in states:
                module.eval()
            pipeline = family.pipeline(components, denoiser)
            pipeline.set_progress_bar_config(disable=True)  # the run's own progress bar is the one shown
            for name, prompt in prompts:
                for width, height in config.validation_sizes:
                    for index in range(config.num_validation_images):
                        stem = f"{file_stem(name)}-{width}x{height}"
                        if config.num_validation_images > 1:
                            stem += f"-{index}"
                        stem += suffix
                        on_step_end = None
                        if config.validation_preview and write:  # previews/<stem>_<inference step>.png
                            on_step_end = _previews(
                                family, components, pipeline, config, events, folder, step, stem
                            )
                        request = GenerationRequest(
                            prompt=prompt,
                            negative_prompt=config.validation_negative_prompt,
                            width=width,
                            height=height,
                            num_inference_steps=config.validation_num_inference_steps,
                            guidance_scale=config.validation_guidance,
                            guidance_rescale=config.validation_guidance_rescale,
                            generator=torch.Generator().manual_seed(seed + index),
                            num_frames=config.validation_num_video_frames,
                            image=conditioning_image,
                            on_step_end=on_step_end,
                        )
                        sample = family.generate(pipeline, request)
                        if write:
                            paths.append(family.save_sample(sample, folder / stem))
    finally:
        for module, training, device in states:
            module.train(training)
            if device is not None:
                module.to(device)
    events("validation", {"step": step, "paths": [str(p) for p in paths]})
    return paths


def validation_conditioning_image(datasets) -> Any:
    """The first image of the first enabled conditioning dataset, masks left out (for i2i/i2v validation),
    or None."""
    from PIL import Image

    from difftune.data.generators import GENERATED_ROOT, generated_id, generators_of

    suffixes = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
    folders = []
    for dataset in datasets:
        if dataset.disabled:
            continue
        if (
            dataset.dataset_type == "conditioning"
            and dataset.conditioning_type != "mask"
            and dataset.instance_data_dir
        ):
            folders.append(Path(dataset.instance_data_dir))
        # conditioning images generated from a dataset's own images (made before validation runs)
        folders += [
            GENERATED_ROOT / generated_id(dataset, g)
            for g in generators_of(dataset)
            if g.conditioning_type != "mask"
        ]
    for folder in folders:
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes)
        if files:
            return Image.open(files[0]).convert("RGB")
    return None
