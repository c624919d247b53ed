"""Validation previews: decode the intermediate latents every N inference steps and emit them.

The callback plugs into a diffusers pipeline call as `callback_on_step_end`. With
`validation_num_inference_steps` 20 and `validation_preview_steps` 5, previews come at inference
steps 5, 10, 15 and 20.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

Emit = Callable[[str, dict[str, Any]], None]


def preview_callback(
    pipeline: Any,
    decode_fn: Callable[[torch.Tensor], torch.Tensor],
    every_n_steps: int,
    emit: Emit,
    *,
    out_dir: str | Path,
    step: int = 0,
    name: str = "preview",
) -> Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]:
    """A `callback_on_step_end` that saves out_dir/NAME_NNN.png every `every_n_steps` and emits it.

    `decode_fn(latents)` gets the pipeline's latents as they are (the denoiser's space and layout) and
    returns pixels in [-1, 1], (B, C, H, W) or (B, C, T, H, W) (the first frame is shown). Emits `validation_preview` with
    {step (training), preview_index (1, 2, ...), inference_step, path}.
    """
    if every_n_steps < 1:
        raise ValueError(f"validation_preview_steps must be >= 1, got {every_n_steps}")
    tensor_inputs = getattr(pipeline, "_callback_tensor_inputs", None)
    if tensor_inputs is not None and "latents" not in tensor_inputs:
        raise ValueError(
            f"{type(pipeline).__name__} does not pass latents to callback_on_step_end; "
            "set validation_preview false for this model"
        )
    out_dir = Path(out_dir)
    previews_made = 0

    def callback(
        pipe: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        nonlocal previews_made
        inference_step = step_index + 1
        if inference_step % every_n_steps != 0:
            return callback_kwargs
        latents = callback_kwargs["latents"]
        with torch.no_grad():
            pixels = decode_fn(latents)
        previews_made += 1
        path = out_dir / f"{name}_{inference_step:03d}.png"
        save_preview(pixels, path)
        emit(
            "validation_preview",
            {
                "step": step,
                "preview_index": previews_made,
                "inference_step": inference_step,
                "path": str(path),
            },
        )
        return callback_kwargs

    return callback


def save_preview(pixels: torch.Tensor, path: Path) -> Path:
    """Write the first image of (B, C, H, W) or first frame of (B, C, T, H, W) pixels in [-1, 1] as PNG."""
    image = pixels[0]
    if image.ndim == 4:
        image = image[:, 0]
    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path
