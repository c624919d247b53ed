"""Decode an image as its plan says: EXIF-upright RGB, resized with Lanczos, cropped to the bucket."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from difftune.data.errors import UnreadableImage

if TYPE_CHECKING:
    from difftune.data.buckets import SamplePlan


def load_pixels(plan: SamplePlan) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1] with (W, H) = plan.bucket; raises UnreadableImage when decoding fails.

    Transparent images are composited on white, so transparent areas do not turn black.
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(plan.path) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
            image = _to_rgb(image)
            if image.size != plan.resize_to:
                image = image.resize(plan.resize_to, Image.Resampling.LANCZOS)
            left, top, width, height = plan.crop_box
            if (left, top, width, height) != (0, 0, *image.size):
                image = image.crop((left, top, left + width, top + height))
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise UnreadableImage(plan.path, f"{type(error).__name__}: {error}") from error
    pixels = torch.from_numpy(array.copy()).permute(2, 0, 1)  # (H, W, C) -> (C, H, W)
    return pixels.float().div_(127.5).sub_(1.0)


def _to_rgb(image):
    """RGB copy of a PIL image; alpha (also palette transparency) composited on white."""
    from PIL import Image

    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image
