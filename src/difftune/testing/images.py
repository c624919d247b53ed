"""A small generated image dataset: coloured shapes on plain backgrounds, with matching captions."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 50, 170),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
DEFAULT_SIZES = ((64, 64), (96, 64), (64, 96), (128, 128))
CAPTION_STRATEGIES = ("textfile", "filename", "jsonl", "instanceprompt")


def _draw(
    shape: str,
    colour: tuple[int, int, int],
    background: tuple[int, int, int],
    size: tuple[int, int],
    rng: random.Random,
):
    """One RGB image (width, height) = size with one shape at a random place and scale."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    side = rng.randint(min(size) // 3, min(size) * 3 // 4)
    left, top = rng.randint(0, width - side), rng.randint(0, height - side)
    box = (left, top, left + side, top + side)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(left + side // 2, top), (left, top + side), (left + side, top + side)], fill=colour)
    return image


def make_image_dataset(
    folder: Path,
    n: int = 8,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    seed: int = 0,
    caption_strategy: str = "textfile",
) -> list[Path]:
    """Write `n` images (PNG and JPEG alternately, (width, height) cycling through `sizes`) into `folder`.

    Captions such as "a red circle on a blue background" are written as the dataset's
    caption_strategy reads them: `textfile` (image.txt beside each image), `filename` (the caption
    is the file name), `jsonl` (metadata.jsonl with file_name and caption), `instanceprompt` (none).
    Returns the image paths, sorted.
    """
    if caption_strategy not in CAPTION_STRATEGIES:
        raise ValueError(f"caption_strategy '{caption_strategy}': use one of {', '.join(CAPTION_STRATEGIES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(COLOURS)
    paths, records = [], []
    for index in range(n):
        colour, background = rng.sample(names, 2)
        shape = SHAPES[index % len(SHAPES)]
        size = tuple(sizes[index % len(sizes)])
        caption = f"a {colour} {shape} on a {background} background"
        image = _draw(shape, COLOURS[colour], COLOURS[background], size, rng)
        suffix = ".png" if index % 2 == 0 else ".jpg"
        stem = (
            caption.replace(" ", "_") + f"_{index}"
            if caption_strategy == "filename"
            else f"image_{index:03d}"
        )
        path = folder / f"{stem}{suffix}"
        image.save(path, **({"quality": 95} if suffix == ".jpg" else {}))
        if caption_strategy == "textfile":
            path.with_suffix(".txt").write_text(caption, encoding="utf-8")
        records.append({"file_name": path.name, "caption": caption})
        paths.append(path)
    if caption_strategy == "jsonl":
        lines = "\n".join(json.dumps(record) for record in records) + "\n"
        (folder / "metadata.jsonl").write_text(lines, encoding="utf-8")
    return sorted(paths)


def make_solid_colour_dataset(
    folder: Path,
    colour: tuple[int, int, int],
    n: int = 4,
    size: tuple[int, int] = (64, 64),
    caption: str = "a plain picture",
    frames: int | None = None,
) -> list[Path]:
    """Write `n` PNG images of one RGB `colour` (with `frames`: mp4 clips of that many frames), each with
    `caption` in a .txt beside it. Two such datasets with one caption differ only in colour.
    Returns the paths, sorted.
    """
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(n):
        image = Image.new("RGB", size, colour)
        paths.append(_write_sample(folder, index, image, caption, frames))
    return paths


def make_theme_dataset(
    folder: Path,
    n: int = 12,
    shape: str = "circle",
    colour: str = "red",
    background: str = "blue",
    size: tuple[int, int] = (64, 64),
    seed: int = 0,
    frames: int | None = None,
) -> list[Path]:
    """Write `n` PNG images of one theme (a `colour` `shape` on a `background`, placed and sized at random),
    each with its caption in a .txt beside it, so that a short run can learn what they share. With
    `frames`, each is an mp4 clip of that many frames of one such picture. Returns the paths.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    caption = f"a {colour} {shape} on a {background} background"
    paths = []
    for index in range(n):
        image = _draw(shape, COLOURS[colour], COLOURS[background], size, rng)
        paths.append(_write_sample(folder, index, image, caption, frames))
    return paths


def _write_sample(folder: Path, index: int, image, caption: str, frames: int | None) -> Path:
    """A PIL image as image_NNN.png (or, with `frames`, clip_NNN.mp4 of that many copies at 8 fps), and
    its caption .txt beside it."""
    if frames is None:
        path = folder / f"image_{index:03d}.png"
        image.save(path)
    else:
        from difftune.data.video import write_video

        path = write_video(folder / f"clip_{index:03d}.mp4", [image] * frames, fps=8)
    path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path
