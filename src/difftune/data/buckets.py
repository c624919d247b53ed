"""Aspect buckets: where each sample trains, how it is resized and which part of it is kept.

Units of `resolution` (and of minimum_image_size, maximum_image_size, target_downsample_size) follow
resolution_type: pixel = the short edge in px; area = megapixels where 1.0 means 1024*1024 px;
pixel_area = px whose square is the area (1024 -> 1024*1024 px). Bucket sides are multiples of the
family's pixel_multiple and never larger than asked (area types: width*height <= the area).

Every plan ends in the same two steps: resize the whole image to `resize_to` (aspect kept), then
keep `crop_box` = (left, top, width, height), whose size is the bucket. Without crop the resize just
covers the bucket, so at most pixel_multiple - 1 px are trimmed, centred.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from difftune.data.errors import DataError, SampleRejected

if TYPE_CHECKING:
    from pathlib import Path

    from difftune.config.schema import DatasetConfig
    from difftune.data.discovery import SampleInfo

MEGAPIXEL = 1024 * 1024
DEFAULT_RESOLUTION = {"pixel": 1024.0, "pixel_area": 1024.0, "area": 1.0}
DEFAULT_CROP_ASPECT_BUCKETS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16)


@dataclass(frozen=True)
class SamplePlan:
    """How one sample becomes a training tensor; sizes are (width, height), crop_box (left, top, width, height)."""

    path: Path
    relative_path: str
    dataset_id: str
    original_size: tuple[int, int]
    resize_to: tuple[int, int]
    crop_box: tuple[int, int, int, int]
    bucket: tuple[int, int]
    size_bytes: int
    mtime_ns: int
    num_frames: int | None = None  # videos: frames the clip has after resampling
    fps: float | None = None

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """(top, left) of the kept window in the resized image, as a family's crop conditioning takes it."""
        return (self.crop_box[1], self.crop_box[0])


def resolution_of(dataset: DatasetConfig) -> float:
    """The dataset's resolution, or the default for its resolution_type."""
    return (
        float(dataset.resolution)
        if dataset.resolution is not None
        else DEFAULT_RESOLUTION[dataset.resolution_type]
    )


def target_area(value: float, resolution_type: str) -> float:
    """A size setting in px^2 (area types only)."""
    return value * MEGAPIXEL if resolution_type == "area" else value * value


def measure(size: tuple[int, int], resolution_type: str) -> float:
    """An image's size in the unit of resolution_type: short edge px, megapixels, or sqrt(area) px."""
    width, height = size
    if resolution_type == "pixel":
        return float(min(width, height))
    if resolution_type == "area":
        return width * height / MEGAPIXEL
    return math.sqrt(width * height)


def bucket_for_aspect(aspect: float, dataset: DatasetConfig, pixel_multiple: int) -> tuple[int, int]:
    """The (width, height) bucket of aspect ratio width/height at the dataset's resolution."""
    resolution = resolution_of(dataset)
    if dataset.resolution_type == "pixel":
        short = resolution
        width, height = (short * aspect, short) if aspect >= 1 else (short, short / aspect)
    else:
        area = target_area(resolution, dataset.resolution_type)
        width, height = math.sqrt(area * aspect), math.sqrt(area / aspect)
    bucket = (_floor_to(width, pixel_multiple), _floor_to(height, pixel_multiple))
    if min(bucket) < pixel_multiple:
        raise DataError(
            f"dataset '{dataset.id}': resolution {resolution:g} ({dataset.resolution_type}) gives a side below "
            f"{pixel_multiple} px for aspect {aspect:.3g}; raise resolution or set maximum_aspect_ratio"
        )
    return bucket


def plan_sample(sample: SampleInfo, dataset: DatasetConfig, pixel_multiple: int, seed: int) -> SamplePlan:
    """Plan one sample; raises SampleRejected (with the reason) when the dataset's rules leave it out."""
    size = sample.size
    _check_limits(sample, dataset)
    aspect = size[0] / size[1]
    # the generator is only built when a random choice is made (it costs more than the rest of the plan)
    needs_rng = dataset.crop and "random" in (dataset.crop_aspect, dataset.crop_style)
    rng = _sample_rng(seed, sample.relative_path) if needs_rng else None

    if not dataset.crop or dataset.crop_aspect == "preserve":
        bucket = bucket_for_aspect(aspect, dataset, pixel_multiple)
    elif dataset.crop_aspect == "square":
        bucket = bucket_for_aspect(1.0, dataset, pixel_multiple)
    else:
        choices = list(dataset.crop_aspect_buckets or DEFAULT_CROP_ASPECT_BUCKETS)
        if dataset.crop_aspect == "closest":
            chosen = min(choices, key=lambda a: (abs(math.log(a / aspect)), a))
        else:
            chosen = rng.choice(choices)
        bucket = bucket_for_aspect(chosen, dataset, pixel_multiple)

    resize_to = _cover(size, bucket)
    if dataset.crop:
        downsampled = _downsampled_size(size, dataset)
        if downsampled is not None and downsampled[0] >= resize_to[0] and downsampled[1] >= resize_to[1]:
            resize_to = downsampled  # crop the bucket out of the image at this scale, not the covering one
    style = dataset.crop_style if dataset.crop else "center"
    left, top = _crop_offsets(resize_to, bucket, style, rng)
    return SamplePlan(
        path=sample.path,
        relative_path=sample.relative_path,
        dataset_id=dataset.id,
        original_size=size,
        resize_to=resize_to,
        crop_box=(left, top, bucket[0], bucket[1]),
        bucket=bucket,
        size_bytes=sample.size_bytes,
        mtime_ns=sample.mtime_ns,
        num_frames=sample.num_frames,
        fps=sample.fps,
    )


def plan_samples(
    samples: list[SampleInfo], dataset: DatasetConfig, pixel_multiple: int, seed: int
) -> tuple[list[SamplePlan], list[tuple[Path, str]]]:
    """Plans for the samples the dataset keeps, and (path, reason) for those it leaves out."""
    plans, skipped = [], []
    for sample in samples:
        try:
            plans.append(plan_sample(sample, dataset, pixel_multiple, seed))
        except SampleRejected as rejected:
            skipped.append((sample.path, rejected.reason))
    return plans, skipped


def crops_each_epoch(dataset: DatasetConfig) -> bool:
    """Whether the dataset's random crop is drawn again each epoch (vae_cache_clear_each_epoch, on by
    default for random crops, as the original tool)."""
    random_crop = dataset.crop and dataset.crop_style == "random"
    return random_crop and dataset.vae_cache_clear_each_epoch is not False


def recrop(plan: SamplePlan, seed: int, epoch: int) -> SamplePlan:
    """The plan with its random crop window drawn again for `epoch`; epoch 0 keeps the plan's own.

    Only the window moves: the bucket and the resize stay, so the sample keeps its place in the
    sampler. Fixed by (seed, path, epoch), so a resumed run draws the same crops.
    """
    if epoch == 0:
        return plan
    rng = _sample_rng(seed, f"{plan.relative_path}|crop-epoch:{epoch}")
    left, top = _crop_offsets(plan.resize_to, plan.bucket, "random", rng)
    return replace(plan, crop_box=(left, top, plan.bucket[0], plan.bucket[1]))


def _check_limits(sample: SampleInfo, dataset: DatasetConfig) -> None:
    width, height = sample.size
    aspect = width / height
    unit = {"pixel": "px short edge", "area": "megapixels", "pixel_area": "px (sqrt of area)"}[
        dataset.resolution_type
    ]
    measured = measure(sample.size, dataset.resolution_type)
    if dataset.minimum_image_size is not None and measured < dataset.minimum_image_size:
        raise SampleRejected(
            sample.path,
            f"too small: {width}x{height} is {measured:.4g} {unit}, below minimum_image_size "
            f"{dataset.minimum_image_size:g}",
        )
    if dataset.minimum_aspect_ratio is not None and aspect < dataset.minimum_aspect_ratio:
        raise SampleRejected(
            sample.path,
            f"aspect ratio {aspect:.3g} ({width}x{height}) is below minimum_aspect_ratio "
            f"{dataset.minimum_aspect_ratio:g}",
        )
    if dataset.maximum_aspect_ratio is not None and aspect > dataset.maximum_aspect_ratio:
        raise SampleRejected(
            sample.path,
            f"aspect ratio {aspect:.3g} ({width}x{height}) is above maximum_aspect_ratio "
            f"{dataset.maximum_aspect_ratio:g}",
        )


def _downsampled_size(size: tuple[int, int], dataset: DatasetConfig) -> tuple[int, int] | None:
    """The size a large image is brought down to before cropping, or None when it stays as it is.

    An image above maximum_image_size is scaled (aspect kept) to target_downsample_size, or to
    maximum_image_size when no target is set.
    """
    limit = dataset.maximum_image_size
    if limit is None or measure(size, dataset.resolution_type) <= limit:
        return None
    goal = dataset.target_downsample_size if dataset.target_downsample_size is not None else limit
    width, height = size
    if dataset.resolution_type == "pixel":
        scale = goal / min(width, height)
    else:
        scale = math.sqrt(target_area(goal, dataset.resolution_type) / (width * height))
    if scale >= 1:
        return None
    return (max(1, round(width * scale)), max(1, round(height * scale)))


def _cover(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """The smallest aspect-keeping resize of size that covers bucket in both sides."""
    width, height = size
    scale = max(bucket[0] / width, bucket[1] / height)
    return (max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale)))


def _crop_offsets(
    resized: tuple[int, int], bucket: tuple[int, int], style: str, rng: random.Random | None
) -> tuple[int, int]:
    spare_x, spare_y = resized[0] - bucket[0], resized[1] - bucket[1]
    if style == "random":
        return rng.randint(0, spare_x), rng.randint(0, spare_y)
    if style == "corner":
        return 0, 0
    return spare_x // 2, spare_y // 2  # center / centre


def _floor_to(value: float, multiple: int) -> int:
    return int(math.floor(value / multiple + 1e-9)) * multiple


def _sample_rng(seed: int, relative_path: str) -> random.Random:
    """A generator fixed by (seed, path): random crops and aspects repeat across runs."""
    digest = hashlib.sha256(f"{seed}:{relative_path}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))
