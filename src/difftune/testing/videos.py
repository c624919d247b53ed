"""Small synthetic videos (moving coloured shapes) and video datasets with captions, for tests and the demo.

Every frame carries its own index, painted as the brightness of a grey band across the top quarter,
so a test can tell which source frame a decoder picked (see `painted_frame_indices`).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from difftune.data.video import write_video

# Grey level of frame i is _BASE + i * step, step chosen so the last frame stays at or below _TOP.
_BASE, _TOP = 16, 236
_WORDS = (
    "a red ball rolls across a wooden table while a blue square slides past the window "
    "slowly in soft morning light with the camera panning right over green grass and a cat watching"
).split()


def _index_step(frames: int) -> float:
    return (_TOP - _BASE) / max(frames - 1, 1)


def _band_height(height: int) -> int:
    return max(2, (height // 4) // 2 * 2)


def render_frames(frames: int = 25, size: tuple[int, int] = (64, 48), seed: int = 0) -> torch.Tensor:
    """Frames of moving coloured shapes over a dark background; (C, T, H, W) float in [-1, 1]."""
    width, height = size
    rng = np.random.default_rng(seed)
    band = _band_height(height)
    step = _index_step(frames)
    shapes = []
    for _ in range(3):
        shapes.append(
            {
                "color": rng.integers(60, 256, size=3),
                "radius": int(rng.integers(max(2, height // 10), max(3, height // 4))),
                "start": rng.uniform((0.0, band), (width, height)),
                "velocity": rng.uniform(-2.0, 2.0, size=2) * max(width, height) / 64,
                "round": bool(rng.integers(0, 2)),
            }
        )
    background = rng.integers(0, 50, size=3)
    ys, xs = np.mgrid[0:height, 0:width]
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    for index in range(frames):
        image = np.broadcast_to(background, (height, width, 3)).copy()
        for shape in shapes:
            x, y = shape["start"] + shape["velocity"] * index
            x, y = x % width, band + (y - band) % (height - band)
            r = shape["radius"]
            if shape["round"]:
                mask = (xs - x) ** 2 + (ys - y) ** 2 <= r * r
            else:
                mask = (np.abs(xs - x) <= r) & (np.abs(ys - y) <= r)
            image[mask] = shape["color"]
        image[:band] = round(_BASE + index * step)
        video[index] = image
    return torch.from_numpy(video).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def make_video(
    path: str | Path,
    frames: int = 25,
    size: tuple[int, int] = (64, 48),
    fps: float = 24,
    seed: int = 0,
) -> Path:
    """Write a synthetic video; the codec follows the extension (.mp4/.mov/.mkv h264, .webm vp9).

    size is (width, height) and must be even (yuv420p).
    """
    width, height = size
    if width % 2 or height % 2 or width < 8 or height < 8:
        raise ValueError(f"make_video size {size}: width and height must be even and at least 8")
    if frames < 1:
        raise ValueError(f"make_video frames={frames}: need at least one frame")
    return write_video(path, render_frames(frames, size, seed), fps=fps)


def painted_frame_indices(video: torch.Tensor, frames: int) -> list[int]:
    """Source frame index of each frame of a decoded (C, T, H, W) clip made by `make_video`.

    frames is the source video's frame count (it sets the brightness step).
    """
    height = video.shape[-2]
    band = _band_height(height)
    # the band's inner rows avoid the edge where the encoder blurs into the shapes below
    inner = video[:, :, 1 : max(2, band - 2), 2:-2]
    grey = (inner.float().mean(dim=(0, 2, 3)) + 1.0) * 127.5
    indices = torch.round((grey - _BASE) / _index_step(frames)).long()
    return indices.clamp(0, frames - 1).tolist()


def make_video_dataset(
    folder: str | Path,
    n: int,
    frames: tuple[int, int] = (17, 40),
    sizes: tuple[tuple[int, int], ...] = ((64, 48), (48, 64), (64, 64), (80, 48)),
    fps_choices: tuple[float, ...] = (24, 30, 12),
    extensions: tuple[str, ...] = (".mp4", ".webm", ".mkv", ".mov"),
    seed: int = 0,
) -> list[Path]:
    """Write n synthetic videos with same-named .txt captions of varying lengths; returns the video paths.

    Frame counts are drawn from the inclusive range `frames`; size, fps and container vary per video.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for index in range(n):
        extension = extensions[index % len(extensions)]
        path = folder / f"video_{index:03d}{extension}"
        make_video(
            path,
            frames=rng.randint(*frames),
            size=rng.choice(sizes),
            fps=rng.choice(fps_choices),
            seed=seed * 1000 + index,
        )
        words = rng.sample(_WORDS, k=rng.randint(2, min(len(_WORDS), 6 + 4 * (index % 6))))
        path.with_suffix(".txt").write_text(" ".join(words) + "\n", encoding="utf-8")
        paths.append(path)
    return paths
