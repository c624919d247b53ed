"""Video probing, frame rules, resampling, filtering, buckets and writing."""

from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from difftune.config.schema import VideoConfig
from difftune.data.video import (
    UnreadableVideo,
    VideoInfo,
    check_frame_count,
    filter_videos,
    first_frame,
    frames_needed,
    load_video_frames,
    nearest_valid_frame_counts,
    probe_video,
    resize_and_crop_video,
    usable_frames,
    valid_frame_count,
    video_bucket,
    write_video,
)
from difftune.families.registry import KANDINSKY5_VIDEO
from difftune.testing.videos import make_video, painted_frame_indices, render_frames

CONTAINERS = [".mp4", ".webm", ".mkv", ".mov"]
# the video family's temporal compression, read from its registry row
STEP = KANDINSKY5_VIDEO.frames_per_latent


def _nearest_earlier_on_tie(position: float) -> int:
    """Nearest integer to position, the lower one on an exact half."""
    return math.ceil(position - 0.5)


@pytest.fixture(scope="module")
def video_30fps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_video(tmp_path_factory.mktemp("v") / "clip.mp4", frames=30, size=(64, 48), fps=30)


# --- probing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("extension", CONTAINERS)
def test_probe_reads_size_frames_and_rate_of_each_container(tmp_path: Path, extension: str) -> None:
    path = make_video(tmp_path / f"clip{extension}", frames=21, size=(80, 48), fps=30)
    info = probe_video(path)
    assert (info.width, info.height, info.num_frames) == (80, 48, 21)
    assert info.fps == pytest.approx(30.0)
    assert info.duration_s == pytest.approx(21 / 30, abs=0.04)


def test_probe_counts_packets_when_the_stream_stores_no_frame_count(tmp_path: Path) -> None:
    path = make_video(tmp_path / "clip.webm", frames=17, fps=24)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # webm keeps no count: the fallback is what is tested
    assert probe_video(path).num_frames == 17


def test_unreadable_file_names_the_path(tmp_path: Path) -> None:
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"this is not a video" * 50)
    with pytest.raises(UnreadableVideo, match="broken.mp4") as caught:
        probe_video(broken)
    assert caught.value.path == broken and caught.value.reason
    with pytest.raises(UnreadableVideo, match="broken.mp4"):
        load_video_frames(broken, 5)
    with pytest.raises(UnreadableVideo, match="missing.mp4"):
        probe_video(tmp_path / "missing.mp4")


# --- the frame-count rule ---------------------------------------------------------------------


def test_valid_frame_counts_follow_the_vae_rule() -> None:
    assert [n for n in range(0, 30) if valid_frame_count(n, STEP)] == [1, 5, 9, 13, 17, 21, 25, 29]
    assert nearest_valid_frame_counts(60, STEP) == (57, 61)
    assert nearest_valid_frame_counts(61, STEP) == (61, 61)
    assert nearest_valid_frame_counts(50, STEP) == (49, 53)


def test_frame_rule_follows_the_family_step_not_a_fixed_four() -> None:
    # a VAE compressing time 8x takes 1, 9, 17 ... frames
    assert [n for n in range(0, 20) if valid_frame_count(n, 8)] == [1, 9, 17]
    assert nearest_valid_frame_counts(12, 8) == (9, 17)
    with pytest.raises(ValueError, match=r"compresses time 8x.*use 9 or 17"):
        check_frame_count(12, "video.num_frames", 8)
    config = VideoConfig(num_frames=9, bucket_strategy="resolution_frames")
    assert video_bucket(_info(30, fps=30.0), config, (64, 48), 8) == ("64x48@25", 25)


def test_check_frame_count_names_key_value_and_nearest_counts() -> None:
    check_frame_count(61, "video.num_frames", STEP)
    with pytest.raises(ValueError) as caught:
        check_frame_count(60, "validation_num_video_frames", STEP)
    message = str(caught.value)
    assert "validation_num_video_frames=60" in message
    assert "57 or 61" in message
    assert "(frames - 1) % 4 == 0" in message


# --- decoding and resampling ------------------------------------------------------------------


def test_load_returns_channels_first_clip_in_range(video_30fps: Path) -> None:
    clip = load_video_frames(video_30fps, 9, start=4)
    assert clip.shape == (3, 9, 48, 64) and clip.dtype == torch.float32
    assert clip.min() >= -1.0 and clip.max() <= 1.0
    assert painted_frame_indices(clip, 30) == list(range(4, 13))
    # decoded frames match the rendered source closely (lossy codec)
    source = render_frames(30, (64, 48), seed=0)[:, 4:13]
    assert (clip - source).abs().mean() < 0.05


@pytest.mark.parametrize("extension", [".mp4", ".webm"])
def test_resampling_30_to_24_fps_picks_the_nearest_source_frames(tmp_path: Path, extension: str) -> None:
    path = make_video(tmp_path / f"clip{extension}", frames=30, fps=30)
    info = probe_video(path)
    assert usable_frames(info, 24) == 24
    clip = load_video_frames(path, 24, frame_rate=24)
    assert clip.shape[1] == 24
    expected = [_nearest_earlier_on_tie(k * 30 / 24) for k in range(24)]
    assert expected[:8] == [0, 1, 2, 4, 5, 6, 7, 9]
    assert painted_frame_indices(clip, 30) == expected


def test_resampling_up_and_from_an_offset_repeats_frames_in_order(video_30fps: Path) -> None:
    clip = load_video_frames(video_30fps, 10, frame_rate=60, start=3)
    assert painted_frame_indices(clip, 30) == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]


def test_loading_more_frames_than_the_video_has_says_how_many_it_gives(video_30fps: Path) -> None:
    with pytest.raises(ValueError, match=r"clip\.mp4 gives 12 frames at 12 fps"):
        load_video_frames(video_30fps, 13, frame_rate=12)
    assert load_video_frames(video_30fps, 12, frame_rate=12).shape[1] == 12


# --- filtering by length ----------------------------------------------------------------------


def _info(frames: int, fps: float = 30.0) -> VideoInfo:
    return VideoInfo(64, 48, frames, fps, frames / fps)


def test_min_frames_is_measured_after_resampling_and_drops_short_videos() -> None:
    config = VideoConfig(num_frames=29, min_frames=33, frame_rate=24, bucket_strategy="resolution_frames")
    infos = {"long.mp4": _info(45), "short.mp4": _info(40), "slow.mp4": _info(33, fps=24.0)}
    # 40 frames at 30 fps last 1.33 s: 32 frames at 24 fps, one short of 33
    assert usable_frames(infos["short.mp4"], 24) == 32
    assert frames_needed(infos["short.mp4"], config) == 42
    kept, dropped = filter_videos(infos, config, STEP)
    assert set(kept) == {Path("long.mp4"), Path("slow.mp4")}
    assert [(d.path, d.frames) for d in dropped] == [(Path("short.mp4"), 32)]
    assert "32 frames at 24 fps" in dropped[0].reason and "min_frames=33" in dropped[0].reason


def test_min_frames_defaults_to_num_frames_and_max_frames_drops_long_videos() -> None:
    config = VideoConfig(num_frames=25, max_frames=41)
    kept, dropped = filter_videos({"a.mp4": _info(24), "b.mp4": _info(25), "c.mp4": _info(42)}, config, STEP)
    assert list(kept) == [Path("b.mp4")]
    reasons = {d.path.name: d.reason for d in dropped}
    assert "num_frames=25" in reasons["a.mp4"] and "24 frames" in reasons["a.mp4"]
    assert "max_frames=41" in reasons["c.mp4"] and "42 frames" in reasons["c.mp4"]


# --- buckets ----------------------------------------------------------------------------------


def test_aspect_ratio_buckets_by_spatial_size_and_trains_num_frames() -> None:
    config = VideoConfig(num_frames=21, bucket_strategy="aspect_ratio")
    bucket = video_bucket(_info(90), config, (64, 48), STEP)
    assert bucket.key == (64, 48) and bucket.num_frames == 21
    with pytest.raises(ValueError, match="video.num_frames=20"):
        video_bucket(_info(90), VideoConfig(num_frames=20), (64, 48), STEP)


def test_resolution_frames_buckets_by_size_and_usable_length() -> None:
    config = VideoConfig(num_frames=17, bucket_strategy="resolution_frames", frame_rate=24)
    # 90 frames at 30 fps -> 72 at 24 fps -> valid 69
    assert video_bucket(_info(90), config, (64, 48), STEP) == ("64x48@69", 69)
    with_interval = config.model_copy(update={"frame_interval": 10})
    # 72 -> multiple of 10: 70 -> valid 69; 40 frames at 30 fps -> 32 -> 30 -> 29
    assert video_bucket(_info(90), with_interval, (64, 48), STEP).key == "64x48@69"
    assert video_bucket(_info(40), with_interval, (48, 64), STEP) == ("48x64@29", 29)
    too_coarse = VideoConfig(num_frames=5, bucket_strategy="resolution_frames", frame_interval=50)
    kept, dropped = filter_videos({"a.mp4": _info(40)}, too_coarse, STEP)
    assert not kept and "frame_interval=50" in dropped[0].reason
    capped = config.model_copy(update={"max_frames": 50})
    assert video_bucket(_info(60, fps=24.0), capped, (64, 64), STEP) == ("64x64@49", 49)


# --- resizing, first frame --------------------------------------------------------------------


def test_resize_and_crop_applies_one_plan_to_every_frame() -> None:
    frames = torch.rand(3, 5, 48, 64) * 2 - 1
    out = resize_and_crop_video(frames, (32, 24), crop_box=(4, 2, 28, 22))
    assert out.shape == (3, 5, 20, 24)
    assert out.min() >= -1 and out.max() <= 1
    single = torch.nn.functional.interpolate(
        frames[:, 3][None], size=(24, 32), mode="bicubic", antialias=True, align_corners=False
    )[0].clamp(-1, 1)
    assert torch.allclose(out[:, 3], single[:, 2:22, 4:28], atol=1e-6)
    with pytest.raises(ValueError, match="crop_box"):
        resize_and_crop_video(frames, (32, 24), crop_box=(0, 0, 40, 24))


def test_first_frame_is_the_conditioning_image() -> None:
    frames = torch.arange(3 * 4 * 2 * 2, dtype=torch.float32).reshape(3, 4, 2, 2)
    image = first_frame(frames)
    assert image.shape == (3, 2, 2) and torch.equal(image, frames[:, 0])
    assert first_frame(frames[None]).shape == (1, 3, 2, 2)


# --- writing ----------------------------------------------------------------------------------


def test_write_video_round_trips_pil_frames_as_h264(tmp_path: Path) -> None:
    images = [Image.new("RGB", (33, 21), (index * 20, 100, 200)) for index in range(9)]
    path = write_video(tmp_path / "out" / "validation.mp4", images, fps=24)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
    info = probe_video(path)
    assert (info.width, info.height, info.num_frames) == (34, 22, 9)  # odd sides padded to even
    clip = load_video_frames(path, 9)
    red = (clip[0, :, 10, 10] + 1) * 127.5
    assert np.allclose(red.numpy(), [index * 20 for index in range(9)], atol=6)


def test_write_video_round_trips_a_tensor(tmp_path: Path) -> None:
    frames = render_frames(13, (64, 48), seed=3)
    path = write_video(tmp_path / "clip.mp4", frames, fps=12)
    info = probe_video(path)
    assert info.num_frames == 13 and info.fps == pytest.approx(12)
    assert painted_frame_indices(load_video_frames(path, 13), 13) == list(range(13))
