from pathlib import Path

import pytest
import torch
from PIL import Image

from difftune.data.buckets import SamplePlan
from difftune.data.errors import DataError, UnreadableImage
from difftune.data.images import load_pixels


def _plan(path: Path, original, resize_to, crop_box) -> SamplePlan:
    return SamplePlan(
        path=path,
        relative_path=path.name,
        dataset_id="d",
        original_size=original,
        resize_to=resize_to,
        crop_box=crop_box,
        bucket=crop_box[2:],
        size_bytes=1,
        mtime_ns=1,
    )


def test_resize_then_crop_gives_the_bucket_in_range(tmp_path):
    image = Image.new("RGB", (64, 32), (255, 0, 0))
    image.paste((0, 0, 255), (32, 0, 64, 32))  # left half red, right half blue
    image.save(tmp_path / "halves.png")
    pixels = load_pixels(_plan(tmp_path / "halves.png", (64, 32), (32, 16), (16, 0, 16, 16)))
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    # the crop keeps the right half: blue
    assert torch.allclose(pixels[:, 4:12, 4:12].mean(dim=(1, 2)), torch.tensor([-1.0, -1.0, 1.0]), atol=0.02)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 255, 0))
    image.paste((255, 255, 255), (0, 0, 20, 20))  # white left half before rotation
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: the white half ends up on top
    image.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    pixels = load_pixels(_plan(tmp_path / "rot.jpg", (20, 40), (20, 40), (0, 0, 20, 40)))
    assert pixels.shape == (3, 40, 20)
    assert pixels[:, 2:18].mean() > 0.9 and pixels[1, 22:38].mean() > 0.9 and pixels[0, 22:38].mean() < -0.9


def test_transparency_becomes_white_and_grey_becomes_rgb(tmp_path):
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("L", (16, 16), 0).save(tmp_path / "grey.png")
    clear = load_pixels(_plan(tmp_path / "clear.png", (16, 16), (16, 16), (0, 0, 16, 16)))
    grey = load_pixels(_plan(tmp_path / "grey.png", (16, 16), (16, 16), (0, 0, 16, 16)))
    assert torch.all(clear == 1.0) and grey.shape == (3, 16, 16) and torch.all(grey == -1.0)


def test_broken_image_raises_unreadable_image_naming_the_file(tmp_path):
    good = Image.new("RGB", (32, 32), (1, 2, 3))
    good.save(tmp_path / "cut.jpg")
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "junk.png").write_bytes(b"junk")
    for name in ("cut.jpg", "junk.png", "missing.png"):
        with pytest.raises(UnreadableImage, match=name) as caught:
            load_pixels(_plan(tmp_path / name, (32, 32), (32, 32), (0, 0, 32, 32)))
        assert isinstance(caught.value, DataError) and caught.value.path == tmp_path / name
