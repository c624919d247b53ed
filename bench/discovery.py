"""Discovery and bucket planning: images/second cold and warm, the warm/cold ratio and peak memory.

N tiny PNG and JPEG files of mixed sizes and aspects are written (not timed) in folders of 1,000.
Cold = discover() with no discovery cache (every header opened) + plan_samples(); warm = the same on
the unchanged folder, which must cost little more than listing it: the reference is a bare os.walk
with one stat per file, measured in the same run. Peak memory is tracemalloc's peak over a separate
cold and warm pass (tracemalloc slows the code down, so those passes are not timed).

    python bench/discovery.py --quick    # 2,000 images
    python bench/discovery.py            # 10,000 images
    python bench/discovery.py --slow     # 100,000 images
"""

from __future__ import annotations

import os
import tempfile
import tracemalloc
from pathlib import Path

import common

# (width, height): square, landscape and portrait, so several aspect buckets fill
SIZES = ((32, 32), (48, 32), (32, 48), (64, 36), (36, 64), (40, 30), (30, 40), (56, 24))
PER_FOLDER = 1000


def write_images(folder: Path, count: int) -> None:
    """`count` solid-colour images, PNG and JPEG alternately, sizes cycling through SIZES."""
    from PIL import Image

    for index in range(count):
        subfolder = folder / f"part-{index // PER_FOLDER:03d}"
        if index % PER_FOLDER == 0:
            subfolder.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", SIZES[index % len(SIZES)], (index % 251, index % 241, index % 239))
        suffix = ".png" if index % 2 == 0 else ".jpg"
        image.save(subfolder / f"image_{index:06d}{suffix}")


def list_folder(root: Path) -> int:
    """The reference: walk the folder and stat every file, as any discovery must; returns the count."""
    count = 0
    for folder, _, names in os.walk(root):
        for name in names:
            os.stat(os.path.join(folder, name))
            count += 1
    return count


def discover_and_plan(dataset, metadata_dir: Path) -> tuple[int, int]:
    """discover() + plan_samples(); (samples planned, headers opened)."""
    from difftune.data.buckets import plan_samples
    from difftune.data.discovery import discover

    found = discover(dataset, metadata_dir)
    plans, _ = plan_samples(found.samples, dataset, 16, seed=0)
    return len(plans), found.headers_read


def peak_traced_mb(function) -> float:
    """tracemalloc's peak (MiB) while function runs."""
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def main() -> None:
    arguments = common.parser(__doc__.splitlines()[0])
    arguments.add_argument("--slow", action="store_true", help="100,000 images")
    arguments.add_argument("--images", type=int, default=None, help="number of images (overrides the size)")
    args = arguments.parse_args()
    count = args.images or (100_000 if args.slow else 2_000 if args.quick else 10_000)

    from difftune.config.schema import DatasetConfig
    from difftune.data.discovery import metadata_path

    with tempfile.TemporaryDirectory(prefix="difftune-bench-") as scratch:
        scratch = Path(scratch)
        with common.stopwatch() as written:
            write_images(scratch / "images", count)
        dataset = DatasetConfig(
            id="bench",
            instance_data_dir=str(scratch / "images"),
            resolution=64,
            resolution_type="pixel_area",
            crop=False,
        )
        metadata_dir = scratch / "metadata"
        cache_file = metadata_path(dataset, metadata_dir)

        with common.stopwatch() as listing:
            listed = list_folder(scratch / "images")
        with common.stopwatch() as cold:
            planned, opened_cold = discover_and_plan(dataset, metadata_dir)
        with common.stopwatch() as warm:
            _, opened_warm = discover_and_plan(dataset, metadata_dir)
        with common.stopwatch() as warm_again:
            discover_and_plan(dataset, metadata_dir)
        warm_s = min(warm["s"], warm_again["s"])
        cache_bytes = cache_file.stat().st_size

        cache_file.unlink()
        cold_peak = peak_traced_mb(lambda: discover_and_plan(dataset, metadata_dir))
        warm_peak = peak_traced_mb(lambda: discover_and_plan(dataset, metadata_dir))

    if planned != count or listed != count or opened_cold != count or opened_warm != 0:
        raise RuntimeError(
            f"expected {count} images planned, listed and opened once; got {planned} planned, "
            f"{listed} listed, {opened_cold} headers read cold and {opened_warm} warm"
        )
    figures = {
        "images": count,
        "cold_s": cold["s"],
        "warm_s": warm_s,
        "listing_s": listing["s"],
        "cold_images_per_s": count / cold["s"],
        "warm_images_per_s": count / warm_s,
        "warm_to_cold_ratio": warm_s / cold["s"],
        "warm_to_listing_ratio": warm_s / listing["s"],
        "cold_peak_traced_mb": cold_peak,
        "warm_peak_traced_mb": warm_peak,
        "metadata_cache_bytes_per_image": cache_bytes / count,
    }
    notes = {
        "setup": f"{count} images {'/'.join(f'{w}x{h}' for w, h in SIZES)} px, half PNG half JPEG, "
        f"folders of {PER_FOLDER}, resolution 64 pixel_area without crop (aspect buckets); "
        f"writing them took {written['s']:.1f} s (not counted)",
        "reference": "listing = os.walk + os.stat of every file, the floor of any warm discovery",
    }
    common.report("discovery", figures, notes, save=not args.no_save)


if __name__ == "__main__":
    main()
