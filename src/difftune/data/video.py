"""Video files for video families: probing, frame rules, decoding, buckets, writing.

Layouts: decoded clips are (C, T, H, W) float tensors in [-1, 1], RGB. Frame counts follow the video
VAE's temporal compression (the family's `frames_per_latent`, k): a clip of T frames needs (T - 1) % k == 0. Lengths used for filtering
and buckets are counted AFTER resampling to `video.frame_rate` (the source's own rate when unset).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from difftune import events

if TYPE_CHECKING:
    from PIL import Image

    from difftune.config.schema import VideoConfig

# Tolerance for comparing timestamps and frame counts computed from float rates.
_EPS = 1e-6


class UnreadableVideo(ValueError):
    """A video file could not be opened or decoded; names the path and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read video {self.path}: {reason}")


@dataclass(frozen=True)
class VideoInfo:
    """Container/stream metadata of one video: size in pixels, frame count, rate, length in seconds."""

    width: int
    height: int
    num_frames: int
    fps: float
    duration_s: float


class VideoBucket(NamedTuple):
    """Where a video trains: its bucket key and the frame count each of its samples has."""

    key: str | tuple[int, int]
    num_frames: int


@dataclass(frozen=True)
class DroppedVideo:
    """A video left out of a dataset, with its usable length (frames after resampling) and why."""

    path: Path
    frames: int
    reason: str


# ---------------------------------------------------------------------------------------------
# probing


def probe_video(path: str | Path) -> VideoInfo:
    """Read width, height, frame count, fps and duration from metadata, without decoding frames.

    When the stream does not store its frame count (webm, mkv), the packets are counted instead.
    """
    import av

    path = Path(path)
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as error:
        raise UnreadableVideo(path, _reason(error)) from error
    with container:
        if not container.streams.video:
            raise UnreadableVideo(path, "the file has no video stream")
        stream = container.streams.video[0]
        width, height = int(stream.width or 0), int(stream.height or 0)
        if width <= 0 or height <= 0:
            raise UnreadableVideo(path, f"the video stream has no frame size ({width}x{height})")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        num_frames = int(stream.frames or 0)
        if num_frames <= 0:
            try:
                num_frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
            except av.error.FFmpegError as error:
                raise UnreadableVideo(path, f"cannot read its packets: {_reason(error)}") from error
        if num_frames <= 0:
            raise UnreadableVideo(path, "the video stream holds no frames")
        if stream.duration and stream.time_base:
            duration_s = float(stream.duration * stream.time_base)
        elif container.duration:
            duration_s = container.duration / av.time_base
        else:
            duration_s = num_frames / fps if fps else 0.0
        if fps <= 0:
            if duration_s <= 0:
                raise UnreadableVideo(path, "neither a frame rate nor a duration is stored")
            fps = num_frames / duration_s
    return VideoInfo(width, height, num_frames, fps, duration_s)


def _reason(error: BaseException) -> str:
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


# ---------------------------------------------------------------------------------------------
# the frame-count rule of the video VAE


def valid_frame_count(n: int, frames_per_latent: int) -> bool:
    """True when a clip of n frames fits the VAE's temporal compression: (n - 1) % frames_per_latent == 0."""
    return n >= 1 and (n - 1) % frames_per_latent == 0


def nearest_valid_frame_counts(n: int, frames_per_latent: int) -> tuple[int, int]:
    """The largest valid count <= n and the smallest valid count >= n (both n when n is valid)."""
    if n <= 1:
        return 1, 1
    below = n - (n - 1) % frames_per_latent
    above = below if below == n else below + frames_per_latent
    return below, above


def check_frame_count(n: int, key: str, frames_per_latent: int) -> None:
    """Raise ValueError naming `key` when n breaks the rule (frames - 1) % frames_per_latent == 0."""
    if valid_frame_count(n, frames_per_latent):
        return
    below, above = nearest_valid_frame_counts(n, frames_per_latent)
    choices = f"{above}" if below == above else f"{below} or {above}"
    raise ValueError(
        f"{key}={n} is not a valid frame count: the video VAE compresses time {frames_per_latent}x, so "
        f"(frames - 1) % {frames_per_latent} == 0 must hold; use {choices}"
    )


def _round_down_to_valid(n: int, frames_per_latent: int) -> int:
    return nearest_valid_frame_counts(n, frames_per_latent)[0] if n >= 1 else 0


# ---------------------------------------------------------------------------------------------
# lengths after resampling, filtering


def usable_frames(info: VideoInfo, frame_rate: float | None) -> int:
    """Frames the video yields when resampled to frame_rate (its own count when frame_rate is None)."""
    if frame_rate is None or math.isclose(frame_rate, info.fps, rel_tol=1e-6):
        return info.num_frames
    return int(math.floor(info.num_frames / info.fps * frame_rate + _EPS))


def required_frames(video_cfg: VideoConfig) -> int:
    """The shortest usable length (after resampling) a video may have to stay in the dataset."""
    minimum = video_cfg.min_frames if video_cfg.min_frames is not None else video_cfg.num_frames
    if video_cfg.bucket_strategy == "aspect_ratio":
        # every sample of an aspect bucket has num_frames frames, so shorter videos cannot be used
        minimum = max(minimum, video_cfg.num_frames)
    return minimum


def frames_needed(info: VideoInfo, video_cfg: VideoConfig) -> int:
    """Source frames this video must hold to reach `required_frames` after resampling to frame_rate."""
    needed = required_frames(video_cfg)
    rate = video_cfg.frame_rate
    if rate is None or math.isclose(rate, info.fps, rel_tol=1e-6):
        return needed
    return int(math.ceil(needed * info.fps / rate - _EPS))


def length_problem(info: VideoInfo, video_cfg: VideoConfig, frames_per_latent: int) -> str | None:
    """Why this video cannot train under video_cfg (too short, too long), or None when it can."""
    frames = usable_frames(info, video_cfg.frame_rate)
    at_rate = _rate_words(info, video_cfg.frame_rate)
    minimum = required_frames(video_cfg)
    if frames < minimum:
        which = "min_frames" if minimum == (video_cfg.min_frames or 0) else "num_frames"
        return (
            f"{frames} frames{at_rate}, shorter than {which}={minimum} "
            f"(needs {frames_needed(info, video_cfg)} source frames at {info.fps:g} fps)"
        )
    if video_cfg.max_frames is not None and frames > video_cfg.max_frames:
        return f"{frames} frames{at_rate}, longer than max_frames={video_cfg.max_frames}"
    if (
        video_cfg.bucket_strategy == "resolution_frames"
        and training_frame_count(info, video_cfg, frames_per_latent) < 1
    ):
        return f"{frames} frames{at_rate}, fewer than frame_interval={video_cfg.frame_interval}"
    return None


def filter_videos(
    infos: Mapping[str | Path, VideoInfo], video_cfg: VideoConfig, frames_per_latent: int
) -> tuple[dict[Path, VideoInfo], list[DroppedVideo]]:
    """Split videos into those that can train and those dropped (with their length and the reason)."""
    kept: dict[Path, VideoInfo] = {}
    dropped: list[DroppedVideo] = []
    for path, info in infos.items():
        problem = length_problem(info, video_cfg, frames_per_latent)
        if problem is None:
            kept[Path(path)] = info
        else:
            dropped.append(DroppedVideo(Path(path), usable_frames(info, video_cfg.frame_rate), problem))
    return kept, dropped


def _rate_words(info: VideoInfo, frame_rate: float | None) -> str:
    if frame_rate is None or math.isclose(frame_rate, info.fps, rel_tol=1e-6):
        return f" at {info.fps:g} fps"
    return f" at {frame_rate:g} fps ({info.num_frames} at {info.fps:g} fps)"


# ---------------------------------------------------------------------------------------------
# buckets


def training_frame_count(info: VideoInfo, video_cfg: VideoConfig, frames_per_latent: int) -> int:
    """Frames each sample of this video trains with (0 when it cannot give a valid clip).

    aspect_ratio: num_frames. resolution_frames: the usable count capped by max_frames, rounded down
    to a multiple of frame_interval, then down to a valid (F - 1) % frames_per_latent == 0 count.
    """
    if video_cfg.bucket_strategy == "aspect_ratio":
        return video_cfg.num_frames
    frames = usable_frames(info, video_cfg.frame_rate)
    if video_cfg.max_frames is not None:
        frames = min(frames, video_cfg.max_frames)
    if video_cfg.frame_interval:
        frames -= frames % video_cfg.frame_interval
    return _round_down_to_valid(frames, frames_per_latent)


def video_bucket(
    info: VideoInfo, video_cfg: VideoConfig, spatial_bucket: tuple[int, int], frames_per_latent: int
) -> VideoBucket:
    """Bucket key and training frame count of a video whose frames resize to spatial_bucket (w, h).

    aspect_ratio: key is spatial_bucket itself; resolution_frames: key is "WxH@F".
    """
    width, height = spatial_bucket
    if video_cfg.bucket_strategy == "aspect_ratio":
        check_frame_count(video_cfg.num_frames, "video.num_frames", frames_per_latent)
        return VideoBucket((width, height), video_cfg.num_frames)
    frames = training_frame_count(info, video_cfg, frames_per_latent)
    if frames < 1:
        raise ValueError(
            f"a video of {usable_frames(info, video_cfg.frame_rate)} usable frames gives no valid clip "
            f"with frame_interval={video_cfg.frame_interval}; lower video.frame_interval or drop it"
        )
    return VideoBucket(f"{width}x{height}@{frames}", frames)


# ---------------------------------------------------------------------------------------------
# decoding


def load_video_frames(
    path: str | Path, num_frames: int, frame_rate: float | None = None, start: int = 0
) -> torch.Tensor:
    """Decode num_frames frames, resampled to frame_rate, from output frame `start` on.

    Resampling picks, for each target time (start + k) / frame_rate after the first frame, the
    source frame nearest in time (the earlier on a tie). Without frame_rate, source frames
    start .. start + num_frames - 1 are taken. Returns (C, T, H, W) float32 in [-1, 1].
    """
    import av

    if num_frames < 1 or start < 0:
        raise ValueError(f"need num_frames >= 1 and start >= 0, got num_frames={num_frames}, start={start}")
    path = Path(path)
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as error:
        raise UnreadableVideo(path, _reason(error)) from error
    with container:
        if not container.streams.video:
            raise UnreadableVideo(path, "the file has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            if frame_rate is None:
                picked, available = _take_by_index(container.decode(stream), start, num_frames)
            else:
                picked, available = _take_by_time(
                    container.decode(stream), stream, frame_rate, start, num_frames
                )
        except av.error.FFmpegError as error:
            raise UnreadableVideo(path, f"decoding failed: {_reason(error)}") from error
    if len(picked) < num_frames:
        rate = f" at {frame_rate:g} fps" if frame_rate is not None else ""
        raise ValueError(
            f"video {path} gives {available} frames{rate}, too few for {num_frames} frames from frame {start}; "
            "raise video.min_frames so short videos are dropped, or lower video.num_frames"
        )
    clip = torch.from_numpy(np.stack(picked))  # (T, H, W, C) uint8
    return clip.permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0)


def _take_by_index(frames: Any, start: int, count: int) -> tuple[list[np.ndarray], int]:
    picked: list[np.ndarray] = []
    seen = 0
    for index, frame in enumerate(frames):
        seen = index + 1
        if index >= start:
            picked.append(frame.to_ndarray(format="rgb24"))
            if len(picked) == count:
                break
    return picked, seen


def _take_by_time(
    frames: Any, stream: Any, frame_rate: float, start: int, count: int
) -> tuple[list[np.ndarray], int]:
    """Stream through decoded frames, keeping the one nearest each target time."""
    targets = [(start + k) / frame_rate for k in range(count)]
    source_rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    source_step = 1.0 / float(source_rate) if source_rate else 0.0
    # timestamps are rounded to the stream's time base (1 ms in webm/mkv), so differences within one
    # tick are ties, resolved to the earlier frame as for exact timestamps
    tie = max(_EPS, min(float(stream.time_base or 0), source_step / 4))
    picked: list[np.ndarray] = []
    origin: float | None = None
    previous: tuple[float, Any] | None = None
    for index, frame in enumerate(frames):
        time = _frame_time(frame, index, source_step)
        if origin is None:
            origin = time
        time -= origin
        while len(picked) < count and time >= targets[len(picked)] - _EPS:
            target = targets[len(picked)]
            if previous is not None and target - previous[0] <= time - target + tie:
                picked.append(previous[1].to_ndarray(format="rgb24"))
            else:
                picked.append(frame.to_ndarray(format="rgb24"))
        if len(picked) == count:
            return picked, start + count
        previous = (time, frame)
    if previous is None:
        return picked, 0
    # targets before the end of the last frame's display time still take the last frame
    end = previous[0] + source_step
    while len(picked) < count and targets[len(picked)] < end - _EPS:
        picked.append(previous[1].to_ndarray(format="rgb24"))
    available = int(math.floor(end * frame_rate + _EPS))
    return picked, available


def _frame_time(frame: Any, index: int, source_step: float) -> float:
    time = frame.time
    return float(time) if time is not None else index * source_step


# ---------------------------------------------------------------------------------------------
# resizing, i2v conditioning


def resize_and_crop_video(
    frames: torch.Tensor,
    resize_to: tuple[int, int],
    crop_box: tuple[int, int, int, int] | None = None,
    mode: Literal["bilinear", "bicubic"] = "bicubic",
) -> torch.Tensor:
    """Resize every frame to resize_to (w, h), then crop crop_box (left, top, right, bottom).

    The crop box is in pixels of the resized frame, PIL's convention; None keeps the whole frame.
    (C, T, H, W) in, (C, T, bottom - top, right - left) out; antialiased, clamped to [-1, 1].
    """
    if frames.ndim != 4:
        raise ValueError(f"expected frames shaped (C, T, H, W), got {tuple(frames.shape)}")
    width, height = resize_to
    if crop_box is not None:
        left, top, right, bottom = crop_box
        if not (0 <= left < right <= width and 0 <= top < bottom <= height):
            raise ValueError(f"crop_box {crop_box} does not fit inside the resized frame {width}x{height}")
    by_time = frames.permute(1, 0, 2, 3)  # (T, C, H, W): frames are the batch of interpolate
    if (by_time.shape[-1], by_time.shape[-2]) != (width, height):
        dtype = by_time.dtype
        by_time = F.interpolate(
            by_time.float(), size=(height, width), mode=mode, align_corners=False, antialias=True
        )
        by_time = by_time.clamp_(-1.0, 1.0).to(dtype)
    if crop_box is not None:
        by_time = by_time[:, :, top:bottom, left:right]
    return by_time.permute(1, 0, 2, 3).contiguous()


def first_frame(frames: torch.Tensor) -> torch.Tensor:
    """The first frame, for image-to-video conditioning: (C, T, H, W) -> (C, H, W).

    A batch (B, C, T, H, W) gives (B, C, H, W).
    """
    if frames.ndim not in (4, 5):
        raise ValueError(f"expected frames shaped (C, T, H, W) or (B, C, T, H, W), got {tuple(frames.shape)}")
    return frames[..., 0, :, :].clone()


# ---------------------------------------------------------------------------------------------
# writing

_ENCODERS = {
    ".mp4": ("libx264", "mpeg4"),
    ".mov": ("libx264", "mpeg4"),
    ".mkv": ("libx264", "mpeg4"),
    ".webm": ("libvpx-vp9", "libvpx"),
}
_ENCODER_OPTIONS = {
    "libx264": {"crf": "16", "preset": "veryfast"},
    "mpeg4": {"qscale": "2"},
    "libvpx-vp9": {"crf": "16", "b": "0", "deadline": "realtime", "cpu-used": "8"},
    "libvpx": {"crf": "8", "b": "1M", "deadline": "realtime", "cpu-used": "8"},
}
_warned_fallback: set[str] = set()


def pick_encoder(path: str | Path) -> str:
    """The encoder for a file name's extension: h264 for .mp4/.mov/.mkv (mpeg4 without it), vp9 for .webm."""
    import av

    suffix = Path(path).suffix.lower()
    if suffix not in _ENCODERS:
        raise ValueError(f"cannot write video {path}: use one of {', '.join(sorted(_ENCODERS))}")
    preferred, fallback = _ENCODERS[suffix]
    if preferred in av.codecs_available:
        return preferred
    if fallback in av.codecs_available:
        if preferred not in _warned_fallback:
            _warned_fallback.add(preferred)
            events.warn(
                f"encoder {preferred} is not available in this PyAV build; writing {fallback} instead"
            )
        return fallback
    raise ValueError(f"cannot write video {path}: neither {preferred} nor {fallback} is available to PyAV")


def write_video(path: str | Path, frames: Sequence[Image.Image] | torch.Tensor, fps: float = 24) -> Path:
    """Write frames as a video (h264, yuv420p for .mp4); returns the path.

    frames: PIL images of one size, or a (C, T, H, W) float tensor in [-1, 1]. An odd width or
    height is padded by one repeated edge pixel, as yuv420p needs even sizes.
    """
    import av

    path = Path(path)
    arrays = _frames_as_uint8(frames)
    if not arrays:
        raise ValueError(f"no frames to write to {path}")
    height, width = arrays[0].shape[:2]
    pad_h, pad_w = height % 2, width % 2
    encoder = pick_encoder(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(encoder, rate=rate)
        stream.width, stream.height = width + pad_w, height + pad_h
        stream.pix_fmt = "yuv420p"
        stream.options = dict(_ENCODER_OPTIONS.get(encoder, {}))
        for index, array in enumerate(arrays):
            if array.shape[:2] != (height, width):
                raise ValueError(
                    f"frame {index} is {array.shape[1]}x{array.shape[0]}, the first is {width}x{height}; "
                    f"all frames written to {path} need one size"
                )
            if pad_h or pad_w:
                array = np.pad(array, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def _frames_as_uint8(frames: Sequence[Image.Image] | torch.Tensor) -> list[np.ndarray]:
    """Frames as a list of (H, W, 3) uint8 arrays."""
    if isinstance(frames, torch.Tensor):
        if frames.ndim != 4 or frames.shape[0] not in (1, 3):
            raise ValueError(
                f"expected a video tensor shaped (C, T, H, W) with C 1 or 3, got {tuple(frames.shape)}"
            )
        pixels = ((frames.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        pixels = pixels.expand(3, -1, -1, -1).permute(1, 2, 3, 0)  # (T, H, W, C)
        return list(pixels.numpy())
    return [np.asarray(image.convert("RGB")) for image in frames]
