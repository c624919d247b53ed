"""Tiny runs of any registered family: its tiny model, and the config files a user would write for it.

The tests, the demo and the benchmarks all write their runs here, so a run of one family differs from
a run of another only in what the family's registry row says: the pixel grid of its sizes, clips of
two latent frames for a video family, and a conditioning dataset for an image-to-image flavour.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from difftune.families import registry

TINY_SIDE = 64  # pixels: the smallest side the tiny models and the generated datasets are made for
CONDITIONING_ID = "conditioning"


def build_tiny_model(family: str, folder: Path, **options: Any) -> Path:
    """Save the tiny random model of `family` (the builder its registry row names) as a diffusers
    folder; `options` go to the builder (seed, i2i=True, ...). Returns the folder."""
    module_name, function_name = registry.spec(family).tiny_model.split(":")
    return getattr(importlib.import_module(module_name), function_name)(folder, **options)


def tiny_side(family: str) -> int:
    """The side in pixels of a tiny run's square samples: TINY_SIDE rounded up to the family's grid."""
    multiple = registry.spec(family).pixel_multiple
    return math.ceil(TINY_SIDE / multiple) * multiple


def tiny_clip_frames(family: str) -> int | None:
    """Frames of a tiny run's clips (two latent frames) for a video family; None for an image family."""
    spec = registry.spec(family)
    return spec.frames_per_latent + 1 if spec.is_video else None


def write_tiny_run(
    workdir: Path,
    model_dir: Path,
    data_dir: Path,
    *,
    dataset: dict[str, Any] | None = None,
    text_embeds: dict[str, Any] | None = None,
    extra_backends: Iterable[dict[str, Any]] = (),
    conditioning_dir: Path | None = None,
    **settings: Any,
) -> Path:
    """Write workdir/config/config.json and workdir/config/multidatabackend.json for a short LoRA run of
    the tiny model in `model_dir` on the media in `data_dir`; returns the config.json path.

    `settings` are config.json keys over the defaults below; their `model_family` (default sdxl) and
    `model_flavour` pick the registry row the files follow. `dataset` and `text_embeds` are keys over
    the training dataset's and the text-embeds dataset's entries, `extra_backends` more entries. An
    image-to-image flavour gets a conditioning dataset of `conditioning_dir` (default `data_dir`, each
    image its own source), linked from the training dataset. Output goes to workdir/out, caches to
    workdir/cache/{vae,text,conditioning}.
    """
    family = settings.get("model_family", "sdxl")
    spec = registry.spec(family)
    kind = spec.flavour(settings.get("model_flavour")).kind
    side = tiny_side(family)
    frames = tiny_clip_frames(family)
    config_dir = workdir / "config"
    backend_file = config_dir / "multidatabackend.json"

    training = {
        "id": "images",
        "type": "local",
        "dataset_type": "video" if frames else "image",
        "instance_data_dir": str(data_dir),
        "caption_strategy": "textfile",
        "resolution": side,
        "resolution_type": "pixel_area",
        "crop": True,
        "crop_aspect": "square",
        "crop_style": "center",
        "cache_dir_vae": str(workdir / "cache" / "vae"),
        "repeats": 1,
    }
    conditioning = []
    if kind == "i2i":
        training["conditioning_data"] = CONDITIONING_ID
        conditioning.append(
            {
                "id": CONDITIONING_ID,
                "type": "local",
                "dataset_type": "conditioning",
                "instance_data_dir": str(conditioning_dir or data_dir),
                "cache_dir_vae": str(workdir / "cache" / "conditioning"),
            }
        )
    training |= dataset or {}
    if training["dataset_type"] == "video" and "video" not in training:
        frame_rate = spec.defaults.get("framerate", 24)
        training["video"] = {"num_frames": frames, "min_frames": frames, "frame_rate": frame_rate}
    text = {
        "id": "text-embeds",
        "type": "local",
        "dataset_type": "text_embeds",
        "default": True,
        "cache_dir": str(workdir / "cache" / "text"),
    } | (text_embeds or {})

    config = {
        "model_type": "lora",
        "model_family": family,
        "pretrained_model_name_or_path": str(model_dir),
        "output_dir": str(workdir / "out"),
        "data_backend_config": str(backend_file),
        "train_batch_size": 2,
        "learning_rate": 1e-3,
        "optimizer": "adamw",
        "max_train_steps": 4,
        "checkpointing_steps": 2,
        "validation_steps": 0,
        "validation_prompt": "a red circle",
        "validation_resolution": f"{side}x{side}",
        "validation_num_inference_steps": 2,
        "mixed_precision": "no",
        "lora_rank": 4,
        "seed": 1,
        "report_to": "none",
        "gradient_checkpointing": False,
    }
    if kind == "t2v":
        # validation videos as long as the training clips; image-to-video keeps the family's default
        # length, which its pipeline needs to normalise the frames after the condition
        config["validation_num_video_frames"] = frames
    config |= settings

    config_dir.mkdir(parents=True, exist_ok=True)
    backend_file.write_text(json.dumps([training, text, *conditioning, *extra_backends], indent=2))
    path = config_dir / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path
