"""Conditioning data: source images paired with training samples, and first frames for image-to-video.

A training dataset with `conditioning_data: "<id>"` (or a list of ids) links to datasets of
dataset_type conditioning. A training file pairs with the conditioning file of the same relative
path and name, any image extension ("cats/a.jpg" or "cats/a.mp4" <-> "cats/a.png"); with several
linked datasets the first that holds a pair is used. The conditioning image is resized and cropped
with its training sample's plan, so both cover the same pixels, then encoded with the family's VAE:
(C, h, w) for image families, (C, 1, h, w) (a one-frame clip) for video families.

A linked dataset with `conditioning_type: "mask"` holds loss masks instead: each training file pairs
with its mask the same way, the mask is resized and cropped with the sample's plan and brought to the
latent grid (`mask_weights`), and the loss counts only the latent cells whose mask pixels are not all
black, on a `masked_loss_probability` share of batches.

Image-to-video datasets without linked conditioning take the first frame of each clip instead.
Families whose prompt embeddings hold the source image (`conditioning` "prompt_image") cache one text entry per
(caption, conditioning image), under `prompt_key`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import torch

from difftune.data.errors import DataError

if TYPE_CHECKING:
    from difftune.cache.text import TextEmbedCache
    from difftune.config.schema import DatasetConfig
    from difftune.data.buckets import SamplePlan
    from difftune.data.discovery import Discovery
    from difftune.families.base import Components, Family

Events = Callable[[str, dict[str, Any]], None]
_PROMPT_IMAGE_SEPARATOR = "\x1fconditioning-image:"


def linked_ids(dataset: DatasetConfig) -> list[str]:
    """The ids in the dataset's conditioning_data (none, one or a list)."""
    value = dataset.conditioning_data
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def linked_conditioning_datasets(
    dataset: DatasetConfig, datasets: Sequence[DatasetConfig]
) -> list[DatasetConfig]:
    """The conditioning datasets a training dataset links to; raises DataError for a bad link."""
    by_id = {d.id: d for d in datasets}
    linked = []
    for name in linked_ids(dataset):
        target = by_id.get(name)
        if target is None:
            raise DataError(
                f"dataset '{dataset.id}': conditioning_data '{name}' names no dataset (ids: "
                f"{', '.join(sorted(by_id))}); set it to the id of a dataset with dataset_type conditioning"
            )
        if target.dataset_type != "conditioning":
            raise DataError(
                f"dataset '{dataset.id}': conditioning_data '{name}' is a dataset of dataset_type "
                f"{target.dataset_type}; set that dataset's dataset_type to conditioning"
            )
        if target.disabled:
            raise DataError(
                f"dataset '{dataset.id}': its conditioning dataset '{name}' is disabled; enable it "
                "or remove conditioning_data"
            )
        linked.append(target)
    return linked


def is_mask(dataset: DatasetConfig) -> bool:
    """Whether a conditioning dataset holds loss masks (conditioning_type mask) rather than source images."""
    return dataset.conditioning_type == "mask"


def mask_weights(plan: SamplePlan, latent_size: tuple[int, int]) -> torch.Tensor:
    """(1, h, w) float32 0/1 on the latent grid: 1 where the mask's pixels under a cell are not all black.

    The mask image is resized and cropped with its sample's plan (so it covers the same pixels), made
    grey, and averaged over each latent cell (area interpolation), as the original tool does.
    Raises UnreadableImage when the mask cannot be decoded.
    """
    import torch.nn.functional as F

    from difftune.data.images import load_pixels

    grey = load_pixels(plan).mean(dim=0, keepdim=True)  # (1, H, W) in [-1, 1]; black is exactly -1
    area = F.interpolate(grey[None], size=latent_size, mode="area")[0]
    return (area > -1.0 + 1e-6).float()


def pair_conditioning(
    plans: Sequence[SamplePlan], sources: Sequence[tuple[DatasetConfig, Discovery]]
) -> tuple[dict[int, SamplePlan], list[tuple[Path, str]]]:
    """Conditioning plans by index into plans, and (path, reason) of the plans without a pair.

    A conditioning plan is its training plan with the conditioning file's path, size and mtime.
    """
    tables = []
    for dataset, found in sources:
        usable = {}
        for sample in found.samples:
            usable.setdefault(_stem_key(sample.relative_path), sample)
        broken = {
            _stem_key(path.relative_to(found.root).as_posix()): reason for path, reason in found.skipped
        }
        tables.append((dataset, found, usable, broken))

    pairs: dict[int, SamplePlan] = {}
    unpaired: list[tuple[Path, str]] = []
    for index, plan in enumerate(plans):
        stem = _stem_key(plan.relative_path)
        match = next(((d, table[stem]) for d, _, table, _ in tables if stem in table), None)
        if match is not None:
            dataset, sample = match
            pairs[index] = replace(
                plan,
                path=sample.path,
                relative_path=sample.relative_path,
                dataset_id=dataset.id,
                original_size=sample.size,
                size_bytes=sample.size_bytes,
                mtime_ns=sample.mtime_ns,
                num_frames=None,
                fps=None,
            )
            continue
        reasons = [f"{d.id}: {broken[stem]}" for d, _, _, broken in tables if stem in broken]
        folders = ", ".join(str(found.root) for _, found, _, _ in tables)
        detail = f" (unreadable: {'; '.join(reasons)})" if reasons else ""
        unpaired.append((plan.path, f"no conditioning image named {stem}.<png|jpg|...> in {folders}{detail}"))
    return pairs, unpaired


def wants_first_frame(dataset: DatasetConfig, family: Family) -> bool:
    """Whether a dataset trains image-to-video from each clip's first frame (video.is_i2v, else the family).

    Only asked for datasets without linked source images (those give the conditioning instead).
    """
    if not family.is_video:
        return False
    if dataset.video is not None and dataset.video.is_i2v is not None:
        return bool(dataset.video.is_i2v)
    return family.conditioning == "first_frame"


def prompts_use_images(family: Family) -> bool:
    """Whether the family's prompt embeddings include the conditioning image (encode_prompts(images=...))."""
    return family.conditioning == "prompt_image"


def prompt_key(caption: str, image_key: str) -> str:
    """The text-cache key of a caption encoded together with one conditioning image (its latent cache key)."""
    return f"{caption}{_PROMPT_IMAGE_SEPARATOR}{image_key}"


def to_pil(pixels: torch.Tensor):
    """(3, H, W) float in [-1, 1] -> an RGB PIL image."""
    from PIL import Image

    array = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).contiguous().numpy())


def encode_image_prompts(
    family: Family,
    components: Components | None,
    cache: TextEmbedCache,
    items: Sequence[tuple[str, str, Any]],
    events: Events,
) -> None:
    """Encode (key, caption, PIL image) items with their images and cache them under their keys."""
    items = list(items)
    if not items:
        return
    if components is None:
        raise DataError(
            f"{len(items)} image-conditioned prompt(s) are not in the text cache and no model components were given"
        )
    for start in range(0, len(items), cache.write_batch_size):
        chunk = items[start : start + cache.write_batch_size]
        with torch.no_grad():
            embeds = family.encode_prompts(
                components, [caption for _, caption, _ in chunk], images=[image for _, _, image in chunk]
            )
        cache.write(
            [key for key, _, _ in chunk], [{k: v.detach().cpu() for k, v in e.items()} for e in embeds]
        )
        events("cache", {"kind": "text", "done": start + len(chunk), "total": len(items)})


def _stem_key(relative_path: str) -> str:
    """'cats/a.jpg' -> 'cats/a': the pairing key (relative path without its extension)."""
    return PurePosixPath(relative_path).with_suffix("").as_posix()
