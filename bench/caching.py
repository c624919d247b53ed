"""Cache filling: latents and text embeddings per second through prepare_training_data, and where time goes.

The tiny SDXL encodes a generated dataset into empty caches; the pipeline's own steps are timed by
wrapping them (decode + resize + crop = load_pixels, VAE encode = family.encode_pixels, latent write
= LatentCache.write, prompt encode = family.encode_prompts, text write = TextEmbedCache.write); the
rest (discovery, planning, cache look-ups) is "other". The reference, in the same run, is the bare
VAE encoding the same number of images in memory at the same batch size: `latent_efficiency` is the
pipeline's latents/s over that. Stored bytes per sample are the .safetensors files' sizes (bf16).
Runs on the CPU, and also on CUDA when a GPU is there.

    python bench/caching.py --quick     # 48 images
    python bench/caching.py --images 512 --resolution 128
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from pathlib import Path

import common

PHASES = ("decode_resize", "vae_encode", "latent_write", "text_encode", "text_write")


def timed(function, totals: dict[str, float], phase: str):
    """function, wrapped to add its seconds to totals[phase]."""

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            totals[phase] += time.perf_counter() - started

    return wrapper


def fill_caches(loaded, family, components, device, totals: dict[str, float]):
    """prepare_training_data with its phases wrapped; returns the TrainingData."""
    import sys

    from difftune.cache.latents import LatentCache
    from difftune.cache.text import TextEmbedCache
    from difftune.data import images
    from difftune.data.pipeline import prepare_training_data
    from difftune.training.setup import text_cache_dir

    # load_pixels is wrapped in every difftune module that imported it by name
    load_pixels = images.load_pixels
    users = [
        m
        for name, m in list(sys.modules.items())
        if name.startswith("difftune.") and getattr(m, "load_pixels", None) is load_pixels
    ]
    originals = (LatentCache.write, TextEmbedCache.write)
    family.encode_pixels = timed(type(family).encode_pixels.__get__(family), totals, "vae_encode")
    family.encode_prompts = timed(type(family).encode_prompts.__get__(family), totals, "text_encode")
    for module in users:
        module.load_pixels = timed(load_pixels, totals, "decode_resize")
    LatentCache.write = timed(LatentCache.write, totals, "latent_write")
    TextEmbedCache.write = timed(TextEmbedCache.write, totals, "text_write")
    try:
        return prepare_training_data(
            loaded.train,
            loaded.datasets,
            text_cache_dir(loaded),
            family,
            components,
            device,
            lambda *_: None,
            extra_prompts=[""],
        )
    finally:
        LatentCache.write, TextEmbedCache.write = originals
        for module in users:
            module.load_pixels = load_pixels
        del family.encode_pixels, family.encode_prompts


def bare_encode_seconds(family, components, device, count: int, batch: int, side: int) -> float:
    """Seconds the VAE alone takes to encode `count` random images (side x side) in batches of `batch`."""
    import torch

    pixels = torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pixels = pixels.to(device)
    with torch.no_grad():
        family.encode_pixels(components, pixels)  # warm-up: first-call allocations, kernel selection
        _synchronize(device)
        started = time.perf_counter()
        for _ in range(max(1, count // batch)):
            family.encode_pixels(components, pixels)
        _synchronize(device)
    return (time.perf_counter() - started) * count / (max(1, count // batch) * batch)


def measure(device_name: str, scratch: Path, model: Path, images: Path, count: int, side: int) -> dict:
    """Figures for one device, with cold caches in a fresh folder."""
    import torch

    from difftune.config import load_config
    from difftune.families import get_family
    from difftune.testing.runs import write_tiny_run

    device = torch.device(device_name)
    workdir = scratch / f"run-{device_name}"
    dataset = {**common.DATASET, "resolution": side}
    config = write_tiny_run(workdir, model, images, dataset=dataset, max_train_steps=1, **common.RUN)
    loaded = load_config(config)
    family = get_family(loaded.train)
    components = family.load(device, torch.float32)
    totals: dict[str, float] = defaultdict(float)
    with common.stopwatch() as cold:
        data = fill_caches(loaded, family, components, device, totals)
    with common.stopwatch() as warm:
        fill_caches(loaded, family, components, device, defaultdict(float))
    if data.num_samples != count:
        raise RuntimeError(f"expected {count} samples planned, got {data.num_samples}")
    bare_s = bare_encode_seconds(family, components, device, count, loaded.train.vae_batch_size, side)

    latent_files = list((workdir / "cache" / "vae").glob("*.safetensors"))
    text_files = list((workdir / "cache" / "text").glob("*.safetensors"))
    latent_s = totals["decode_resize"] + totals["vae_encode"] + totals["latent_write"]
    text_s = totals["text_encode"] + totals["text_write"]
    other_s = max(0.0, cold["s"] - latent_s - text_s)
    latent_shape = tuple(data.latent_caches["images"].load(data.plans[0]).latents.shape)
    figures = {
        "latents_per_s": count / latent_s,
        "bare_vae_per_s": count / bare_s,
        "latent_efficiency": bare_s / latent_s,
        "embeddings_per_s": len(text_files) / text_s,
        "cold_prepare_s": cold["s"],
        "warm_prepare_s": warm["s"],
        "warm_to_cold_ratio": warm["s"] / cold["s"],
        "latent_file_bytes": sum(f.stat().st_size for f in latent_files) / len(latent_files),
        "latent_tensor_bytes": 2 * _numel(latent_shape),
        "text_file_bytes": sum(f.stat().st_size for f in text_files) / len(text_files),
    }
    figures |= {f"{phase}_share": totals[phase] / cold["s"] for phase in PHASES}
    figures["other_share"] = other_s / cold["s"]
    return {f"{device_name}_{key}": value for key, value in figures.items()} | {
        f"{device_name}_latent_shape": "x".join(map(str, latent_shape))
    }


def main() -> None:
    arguments = common.parser(__doc__.splitlines()[0])
    arguments.add_argument("--images", type=int, default=None, help="images (default 48 quick, 256)")
    arguments.add_argument("--resolution", type=int, default=64, help="bucket side in px")
    arguments.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda if there")
    args = arguments.parse_args()
    common.quiet()
    count = args.images or (48 if args.quick else 256)

    import torch

    from difftune.testing.images import make_image_dataset
    from difftune.testing.runs import build_tiny_model

    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="difftune-bench-") as scratch:
        scratch = Path(scratch)
        model = build_tiny_model("sdxl", scratch / "models" / "sdxl")
        side = args.resolution
        sizes = [(side, side), (side * 3 // 2, side), (side, side * 3 // 2), (side * 2, side * 2)]
        make_image_dataset(scratch / "images", n=count, sizes=sizes, seed=0)
        for device in devices:
            results |= measure(device, scratch, model, scratch / "images", count, side)
    figures = {key: value for key, value in results.items() if isinstance(value, (int, float))}
    notes = {
        "setup": f"tiny SDXL (VAE 8-16 channels), {count} PNG/JPEG images of {', '.join(f'{w}x{h}' for w, h in sizes)} "
        f"px cropped to {side}x{side}, vae_batch_size 4, fp32 models, bf16 latents on disk",
        "latent shape": ", ".join(
            f"{k.split('_')[0]}: {v}" for k, v in results.items() if k.endswith("shape")
        ),
        "reference": "latent_efficiency = bare VAE encode time of the same images in memory / pipeline latent time",
    }
    common.report("caching", figures, notes, save=not args.no_save)


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for side in shape:
        total *= side
    return total


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
