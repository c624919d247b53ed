"""`difftune demo`: the whole pipeline on a tiny built-in model and a generated dataset, on the CPU.

It builds a tiny random model of the real diffusers classes, saves it as a diffusers folder, writes
config.json and multidatabackend.json exactly as a user would, and trains through `difftune train`'s
code path (load_config -> train). The images all show one theme (a red circle on a blue background),
so a short run visibly learns it; `before_after.png` puts a training image, the untrained model's
sample and the trained model's sample (one prompt, one seed) side by side.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from difftune.families import registry

DEMO_CAPTION = "a red circle on a blue background"  # what every demo image shows
SAMPLE_STEPS = 12


def demo_data_dir(workdir: Path, family: str) -> Path:
    """Generated clips for a video family, generated images for the others (see `make_theme_dataset`)."""
    return workdir / "datasets" / ("theme-videos" if registry.spec(family).is_video else "theme-images")


def before_after(config_path: Path, trained: Path, example: Path | None, out_path: Path) -> Path:
    """Write a training image (when `example` is one), the base model's sample and the trained one's
    (same prompt and seed) side by side.

    Both samples come from the family's stock pipeline: with the base denoiser, then with the saved
    LoRA file loaded by `load_lora_weights` (`trained` is that file) or with the saved denoiser of a
    full run (`trained` is its folder). Each panel is scaled up 3x. Returns `out_path`.
    """
    import torch
    from PIL import Image

    from difftune.config import load_config
    from difftune.families import get_family
    from difftune.families.base import GenerationRequest

    config = load_config(config_path).train
    family = get_family(config)
    components = family.load(torch.device("cpu"), torch.float32)
    samples = []
    for after in (False, True):
        denoiser = components.denoiser
        if after and config.model_type == "full":
            denoiser = type(denoiser).from_pretrained(trained)
        pipeline = family.pipeline(components, denoiser)
        pipeline.set_progress_bar_config(disable=True)
        if after and config.model_type != "full":
            pipeline.load_lora_weights(str(trained.parent), weight_name=trained.name)
        request = GenerationRequest(
            prompt=DEMO_CAPTION,
            width=64,
            height=64,
            num_inference_steps=SAMPLE_STEPS,
            guidance_scale=1.0,
            generator=torch.Generator().manual_seed(0),
            num_frames=config.validation_num_video_frames,
        )
        with torch.no_grad():
            sample = family.generate(pipeline, request)[0]
        samples.append(sample[0] if isinstance(sample, list) else sample)  # a video: its first frame
    panels = ([Image.open(example).convert("RGB")] if example is not None else []) + samples
    size = 192
    sheet = Image.new("RGB", (size * len(panels) + 8 * (len(panels) - 1), size), "white")
    for index, panel in enumerate(panels):
        sheet.paste(panel.resize((size, size), Image.NEAREST), (index * (size + 8), 0))
    sheet.save(out_path)
    return out_path


def write_demo_config(
    workdir: Path, family: str, model_dir: Path, steps: int, model_type: str = "lora"
) -> Path:
    """Write config/config.json and config/multidatabackend.json for the demo run; returns config.json."""
    from difftune.testing.runs import tiny_clip_frames, write_tiny_run

    data_dir = demo_data_dir(workdir, family)
    dataset = {"id": data_dir.name, "cache_dir_vae": str(workdir / "cache" / "vae" / family), "repeats": 2}
    frames = tiny_clip_frames(family)
    if frames:
        dataset["video"] = {"num_frames": frames, "min_frames": frames, "frame_rate": 8}
    settings = {
        "model_type": model_type,
        "model_family": family,
        "output_dir": str(workdir / "output" / family),
        "learning_rate": 3e-3,
        "lr_scheduler": "constant",
        "max_train_steps": steps,
        "checkpointing_steps": steps // 2,
        "validation_steps": steps // 2,
        "validation_prompt": DEMO_CAPTION,
        "validation_num_inference_steps": SAMPLE_STEPS,
        "lora_rank": 8,
        "seed": 42,
        "report_to": "tensorboard",
        "gradient_checkpointing": True,
    }
    if not registry.spec(family).flow_matching:
        # From an epsilon prediction, x0 at the first (noisiest) sampling step is about 14x the
        # prediction's error, which a short run leaves too large to see what it learned; v is not.
        settings["prediction_type"] = "v_prediction"
    text_embeds = {"cache_dir": str(workdir / "cache" / "text" / family), "write_batch_size": 16}
    return write_tiny_run(workdir, model_dir, data_dir, dataset=dataset, text_embeds=text_embeds, **settings)


DEMO_EPILOG = """reads nothing: it builds a tiny random model, a generated dataset and a config under --workdir
(models/, datasets/, config/), then trains through `difftune train`'s code path.

writes (in WORKDIR/output/FAMILY):
  before_after.png (a training image, the untrained model's sample, the trained model's sample),
  loss.png, pytorch_lora_weights.safetensors, validation/STEP/*, events.jsonl, config.resolved.json;
  the end message says what to look at.

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
    parser.add_argument("--steps", type=int, default=200, help="training steps (default: %(default)s)")
    parser.add_argument(
        "--model-type",
        default="full",
        choices=["full", "lora"],
        help="train the whole denoiser (default; a tiny random model learns visibly only so) or a LoRA",
    )
    parser.add_argument("--verbose", action="store_true", help="also show the libraries' own output")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an internal error")
    args = parser.parse_args(argv)

    from difftune.config import load_config
    from difftune.console import library_output
    from difftune.testing.images import make_theme_dataset
    from difftune.testing.runs import build_tiny_model, tiny_clip_frames
    from difftune.training.loop import train

    started = time.perf_counter()
    workdir = Path(args.workdir).resolve()
    output_dir = workdir / "output" / args.family
    shutil.rmtree(output_dir, ignore_errors=True)  # each demo run starts fresh
    model_dir = workdir / "models" / args.family
    with library_output(output_dir / "events.jsonl", args.verbose):
        if not (model_dir / "model_index.json").exists():
            build_tiny_model(args.family, model_dir)
        data_dir = demo_data_dir(workdir, args.family)
        if not data_dir.exists():
            make_theme_dataset(data_dir, n=12, frames=tiny_clip_frames(args.family))
        config_path = write_demo_config(workdir, args.family, model_dir, args.steps, args.model_type)
        result = train(load_config(config_path))
        example = None if registry.spec(args.family).is_video else sorted(data_dir.glob("*.png"))[0]
        trained = result.lora_path or result.model_path
        comparison = before_after(config_path, trained, example, result.output_dir / "before_after.png")
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s at step {result.global_step}")
    if result.lora_path:
        print(f"  LoRA:        {result.lora_path}")
    else:
        print(f"  model:       {result.model_path}")
    print(f"  validation:  {result.output_dir / 'validation'}")
    print(f"  loss plot:   {result.loss_plot}")
    print(f"  config used: {result.output_dir / 'config.resolved.json'}")
    print(f"\nwhat to look at:\n  {comparison}")
    if example is not None:
        print("    left: a training image; middle: the untrained model; right: the trained model,")
    else:
        print("    left: the untrained model's first frame; right: the trained model's,")
    print(
        f"    both sampled with the prompt '{DEMO_CAPTION}' and one seed: the right one has moved toward\n"
        "    the training data.\n"
        f"  {result.loss_plot}\n"
        "    the training loss by step and its moving average: it falls as the model learns."
    )
    return 0
