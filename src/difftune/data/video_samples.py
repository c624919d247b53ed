"""Video samples for training: length filtering, spatial + frame buckets, clip decoding, their latent cache.

A video's plan is an image plan of its frame size (same bucket planner, same resize and crop) plus
`num_frames`, the clip length it trains with, and `fps`, the rate its frames are resampled to (None
keeps the source rate). Clips start at the first frame. For video families, image datasets train as
one-frame clips. Clip pixels are (3, T, H, W) float32 in [-1, 1].
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from difftune.cache.latents import LatentCache
from difftune.data.buckets import SamplePlan, plan_sample
from difftune.data.discovery import VIDEO_EXTENSIONS
from difftune.data.errors import DataError, SampleRejected
from difftune.data.video import (
    UnreadableVideo,
    VideoInfo,
    filter_videos,
    load_video_frames,
    resize_and_crop_video,
    video_bucket,
)

if TYPE_CHECKING:
    from difftune.config.schema import DatasetConfig, VideoConfig
    from difftune.data.discovery import SampleInfo


class VideoLatentCache(LatentCache):
    """LatentCache whose key also covers the clip length (frames) and the frame rate it was resampled to."""

    def key(self, plan: SamplePlan) -> str:
        rate = None if plan.fps is None else float(plan.fps)
        return hashlib.sha256(json.dumps([super().key(plan), plan.num_frames, rate]).encode()).hexdigest()


@dataclass
class VideoPlans:
    """The kept plans of a video dataset, each one's bucket key, and (path, reason) of the videos left out."""

    plans: list[SamplePlan] = field(default_factory=list)
    bucket_keys: list[Hashable] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def video_config_of(dataset: DatasetConfig) -> VideoConfig:
    """The dataset's `video` block, or the defaults when it has none."""
    from difftune.config.schema import VideoConfig

    return dataset.video if dataset.video is not None else VideoConfig()


def is_video_file(path: str | Path) -> bool:
    """Whether a file is a video by its extension."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def plan_video_samples(
    samples: Sequence[SampleInfo],
    dataset: DatasetConfig,
    pixel_multiple: int,
    frames_per_latent: int,
    seed: int,
) -> VideoPlans:
    """Drop videos outside min_frames/max_frames, plan the rest, and give each its bucket key.

    Bucket keys: aspect_ratio -> the spatial bucket (w, h), every clip num_frames long;
    resolution_frames -> "WxH@F" with F the clip length of that video.
    """
    video_cfg = video_config_of(dataset)
    infos = {sample.path: _video_info(sample) for sample in samples}
    kept, dropped = filter_videos(infos, video_cfg, frames_per_latent)
    result = VideoPlans(skipped=[(d.path, d.reason) for d in dropped])
    for sample in samples:
        if sample.path not in kept:
            continue
        try:
            plan = plan_sample(sample, dataset, pixel_multiple, seed)
        except SampleRejected as rejected:
            result.skipped.append((sample.path, rejected.reason))
            continue
        try:
            bucket = video_bucket(kept[sample.path], video_cfg, plan.bucket, frames_per_latent)
        except ValueError as error:
            raise DataError(f"dataset '{dataset.id}': {error}") from error
        result.plans.append(replace(plan, num_frames=bucket.num_frames, fps=video_cfg.frame_rate))
        result.bucket_keys.append(bucket.key)
    return result


def as_one_frame_clips(plans: Sequence[SamplePlan]) -> list[SamplePlan]:
    """Image plans as one-frame clips, for video families."""
    return [replace(plan, num_frames=1, fps=None) for plan in plans]


def load_clip(plan: SamplePlan) -> torch.Tensor:
    """(3, T, H, W) float32 in [-1, 1], T = plan.num_frames, (W, H) = plan.bucket; raises UnreadableVideo."""
    if plan.num_frames is None:
        raise ValueError(f"{plan.path}: the plan has no num_frames; plan videos with plan_video_samples")
    try:
        frames = load_video_frames(plan.path, plan.num_frames, plan.fps)
    except UnreadableVideo:
        raise
    except (ValueError, OSError) as error:  # too few frames once decoded, or the file vanished
        raise UnreadableVideo(plan.path, str(error)) from error
    left, top, width, height = plan.crop_box
    if (frames.shape[-1], frames.shape[-2]) != (plan.original_size[0], plan.original_size[1]):
        raise UnreadableVideo(
            plan.path,
            f"frames decode as {frames.shape[-1]}x{frames.shape[-2]} but the header said "
            f"{plan.original_size[0]}x{plan.original_size[1]}",
        )
    return resize_and_crop_video(frames, plan.resize_to, (left, top, left + width, top + height))


def _video_info(sample: SampleInfo) -> VideoInfo:
    fps = float(sample.fps or 0.0)
    frames = int(sample.num_frames or 0)
    return VideoInfo(sample.width, sample.height, frames, fps, frames / fps if fps else 0.0)
