"""`difftune demo`: the whole pipeline on a tiny built-in model and a generated dataset, on the CPU.

It builds a tiny random model of the real diffusers classes, saves it as a diffusers folder, writes
config.json and multidatabackend.json exactly as a user would, and trains through `difftune train`'s
code path (load_config -> train).
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import time
from pathlib import Path

from difftune.families import registry


def build_demo_model(family: str, folder: Path) -> Path:
    """A tiny random model of `family` (the builder its registry row names) saved as a diffusers folder."""
    module_name, function_name = registry.spec(family).tiny_model.split(":")
    return getattr(importlib.import_module(module_name), function_name)(folder)


def demo_data_dir(workdir: Path, family: str) -> Path:
    """Generated videos for a video family, generated images for the others."""
    return workdir / "datasets" / ("demo-videos" if registry.spec(family).is_video else "demo-images")


def write_demo_config(workdir: Path, family: str, model_dir: Path, steps: int) -> Path:
    """Write config/config.json and config/multidatabackend.json for the demo run; returns config.json."""
    config_dir = workdir / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    spec = registry.spec(family)
    is_video = spec.is_video
    dataset = {
        "id": demo_data_dir(workdir, family).name,
        "type": "local",
        "dataset_type": "video" if is_video else "image",
        "instance_data_dir": str(demo_data_dir(workdir, family)),
        "caption_strategy": "textfile",
        "resolution": 64,
        "resolution_type": "pixel_area",
        "crop": True,
        "crop_aspect": "square",
        "crop_style": "center",
        "cache_dir_vae": str(workdir / "cache" / "vae" / family),
        "repeats": 2,
    }
    if is_video:
        frames = spec.frames_per_latent + 1  # two latent frames
        dataset["video"] = {"num_frames": frames, "min_frames": frames, "frame_rate": 8}
    backends = [
        dataset,
        {
            "id": "text-embeds",
            "type": "local",
            "dataset_type": "text_embeds",
            "default": True,
            "cache_dir": str(workdir / "cache" / "text" / family),
            "write_batch_size": 16,
        },
    ]
    (config_dir / "multidatabackend.json").write_text(json.dumps(backends, indent=2))
    config = {
        "model_type": "lora",
        "model_family": family,
        "pretrained_model_name_or_path": str(model_dir),
        "output_dir": str(workdir / "output" / family),
        "data_backend_config": str(config_dir / "multidatabackend.json"),
        "train_batch_size": 2,
        "learning_rate": 1e-3,
        "lr_scheduler": "constant",
        "optimizer": "adamw",
        "max_train_steps": steps,
        "checkpointing_steps": steps // 2,
        "validation_steps": steps // 2,
        "validation_prompt": "a red circle on a blue background",
        "validation_resolution": "64x64",
        "validation_num_inference_steps": 4,
        "mixed_precision": "no",
        "lora_rank": 4,
        "seed": 42,
        "report_to": "tensorboard",
    }
    if is_video:
        config["validation_num_video_frames"] = dataset["video"]["num_frames"]
    path = config_dir / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


DEMO_EPILOG = """reads nothing: it builds a tiny random model, a generated dataset and a config under --workdir
(models/, datasets/, config/), then trains through `difftune train`'s code path.

writes (in WORKDIR/output/FAMILY):
  pytorch_lora_weights.safetensors, validation/STEP/*.png (samples before and after), loss.png,
  events.jsonl, config.resolved.json; the end message says what to look at.

example:
  difftune demo --family kandinsky5-image --workdir /tmp/demo
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="difftune demo",
        description=__doc__.splitlines()[0],
        epilog=DEMO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--family", default="sdxl", choices=list(registry.FAMILIES), help="default: %(default)s"
    )
    parser.add_argument("--workdir", default="difftune-demo", help="where the model, data and output go")
    parser.add_argument("--steps", type=int, default=60, help="training steps (default: %(default)s)")
    parser.add_argument("--verbose", action="store_true", help="also show the libraries' own output")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an internal error")
    args = parser.parse_args(argv)

    from difftune.config import load_config
    from difftune.console import library_output
    from difftune.testing.images import make_image_dataset
    from difftune.training.loop import train

    started = time.perf_counter()
    workdir = Path(args.workdir).resolve()
    output_dir = workdir / "output" / args.family
    shutil.rmtree(output_dir, ignore_errors=True)  # each demo run starts fresh
    model_dir = workdir / "models" / args.family
    with library_output(output_dir / "events.jsonl", args.verbose):
        if not (model_dir / "model_index.json").exists():
            build_demo_model(args.family, model_dir)
        data_dir = demo_data_dir(workdir, args.family)
        if not data_dir.exists():
            if registry.spec(args.family).is_video:
                from difftune.testing.videos import make_video_dataset

                make_video_dataset(data_dir, n=6)
            else:
                make_image_dataset(data_dir, n=12)
        config_path = write_demo_config(workdir, args.family, model_dir, args.steps)
        result = train(load_config(config_path))
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s at step {result.global_step}")
    print(f"  LoRA:        {result.lora_path}")
    print(f"  validation:  {result.output_dir / 'validation'}")
    print(f"  loss plot:   {result.loss_plot}")
    print(f"  config used: {result.output_dir / 'config.resolved.json'}")
    return 0
