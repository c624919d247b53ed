"""The samples of a run and how one batch of them becomes tensors: caches first, the VAE when missing.

`TrainingData` is built by `difftune.data.pipeline.prepare_training_data`. Latents are (C, H, W) per
image sample, (C, T', H', W') per clip for video families; conditioning latents (C, h, w), or
(C, 1, h, w) for video families, come from a paired conditioning image or a clip's first frame.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from difftune.cache.latents import LatentCache
from difftune.cache.store import CacheMiss
from difftune.cache.text import TextEmbedCache
from difftune.data.buckets import SamplePlan, recrop
from difftune.data.captions import pick_caption
from difftune.data.conditioning import (
    encode_image_prompts,
    mask_weights,
    prompt_key,
    to_pil,
)
from difftune.data.errors import DataError, UnreadableImage
from difftune.data.images import load_pixels
from difftune.data.sampler import BucketBatchSampler
from difftune.data.video import UnreadableVideo
from difftune.data.video_samples import is_video_file, load_clip
from difftune.families.base import SampleGeometry

if TYPE_CHECKING:
    from difftune.families.base import Components, Family

Events = Callable[[str, dict[str, Any]], None]
Encoded = tuple[torch.Tensor, "torch.Tensor | None"]  # (latents, conditioning latents) of one sample


@dataclass
class TrainingData:
    """Samples, their captions, the sampler over them, and how to load a batch of them."""

    sampler: BucketBatchSampler
    plans: list[SamplePlan]
    captions: list[list[str]]
    skipped: list[tuple[str, str]]  # (path, reason) of every file left out
    family: Family
    components: Components | None
    device: Any
    text_cache: TextEmbedCache
    latent_caches: dict[str, LatentCache]  # by dataset id
    events: Events
    seed: int = 0
    caption_dropout: dict[str, float] = field(default_factory=dict)  # probability by dataset id
    encode_latents_each_time: bool = False  # vae_cache_disable: never read or write latent files
    bucket_keys: list[Hashable] = field(default_factory=list)  # per plan; defaults to plan.bucket
    conditioning_plans: dict[int, SamplePlan] = field(default_factory=dict)  # paired conditioning images
    first_frame_datasets: set[str] = field(default_factory=set)  # image-to-video from each clip's first frame
    # conditioning latents, by the dataset id of the plan they are keyed by (see conditioning_source)
    conditioning_caches: dict[str, LatentCache] = field(default_factory=dict)
    prompt_images: bool = False  # prompt embeddings include the conditioning image
    # the samples each one's latents are encoded with (see cache_groups); a sample without one is
    # encoded with the others missing from its batch
    cache_groups: dict[int, tuple[int, ...]] = field(default_factory=dict)
    mask_plans: dict[int, SamplePlan] = field(default_factory=dict)  # paired loss masks
    masked_loss_probability: float = 1.0  # the share of batches whose masks weight the loss
    regularisation_datasets: set[str] = field(default_factory=set)  # is_regularisation_data
    recrop_datasets: set[str] = field(default_factory=set)  # a new random crop each epoch
    _crop_epoch: int = 0
    _first_plans: dict[int, tuple[SamplePlan, SamplePlan | None, SamplePlan | None]] = field(
        default_factory=dict
    )
    held_out_batches: list[dict[str, Any]] = field(
        default_factory=list
    )  # eval datasets' batches, never trained on
    _unreadable: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not self.bucket_keys:
            self.bucket_keys = [plan.bucket for plan in self.plans]

    @property
    def num_samples(self) -> int:
        return len(self.plans)

    def load_batch(self, indices: Sequence[int], position: tuple[int, int] | None = None) -> dict[str, Any]:
        """Tensors of one batch: latents float32, collated prompt tensors, the family's extras, captions.

        Latents are (B, C, H, W), or (B, C, T', H', W') for video families; "conditioning_latents"
        ((B, C, h, w), video (B, C, 1, h, w)) is there when the samples have conditioning.
        "regularisation" ((B,) bool) is there when some dataset is regularisation data.
        "loss_mask" ((B, 1, h, w), video (B, 1, 1, h, w); 0/1 on the latent grid) is there when the
        samples have linked masks and this batch draws one under masked_loss_probability.
        position = (epoch, batch_index) picks each sample's caption and the caption dropout; it
        defaults to the sampler's last batch, so a resumed run sees the same captions. The family's
        `batch_extras` add what its denoiser takes from the samples' sizes and crops.
        """
        if not indices:
            raise ValueError("load_batch needs at least one sample index")
        epoch, batch_index = position or self.sampler.last_position or (self.sampler.epoch, 0)
        self.crop_for_epoch(epoch)
        latents = self._latents(list(indices), (epoch, batch_index))
        good = [i for i in indices if i in latents]
        if not good:
            paths = ", ".join(str(self.plans[i].path) for i in indices)
            raise DataError(f"every sample of a batch is unreadable ({paths}); remove or replace these files")
        # a sample found unreadable only now is replaced by another of the same bucket in this batch
        indices = [good[k % len(good)] for k in range(len(indices))]

        captions = []
        for i in indices:
            caption = pick_caption(self.captions[i], self.seed, epoch, self.plans[i].relative_path)
            dropout = self.caption_dropout.get(self.plans[i].dataset_id, 0.0)
            if dropout > 0 and _unit_draw(self.seed, epoch, batch_index, i) < dropout:
                caption = ""
            captions.append(caption)
        embeds = [self._text_embeds(caption, i) for caption, i in zip(captions, indices)]
        batch: dict[str, Any] = dict(self.family.collate_prompts(embeds))
        plans = [self.plans[i] for i in indices]
        batch["latents"] = torch.stack([latents[i][0] for i in indices])
        conditions = [latents[i][1] for i in indices]
        if all(c is not None for c in conditions):
            batch["conditioning_latents"] = torch.stack(conditions)
        batch.update(self.family.batch_extras([geometry_of(p) for p in plans]))
        batch["captions"] = captions
        batch["paths"] = [str(p.path) for p in plans]
        if self.regularisation_datasets:
            batch["regularisation"] = torch.tensor(
                [p.dataset_id in self.regularisation_datasets for p in plans]
            )
        masks = self._loss_masks(indices, batch["latents"], (epoch, batch_index))
        if masks is not None:
            batch["loss_mask"] = masks
        return batch

    def _loss_masks(
        self, indices: Sequence[int], latents: torch.Tensor, position: tuple[int, int]
    ) -> torch.Tensor | None:
        """The batch's masks on the latent grid, or None (no masks, or not drawn for this batch).

        A sample without a mask in a batch that has some counts everywhere (all ones).
        """
        if not any(i in self.mask_plans for i in indices):
            return None
        epoch, batch_index = position
        if _unit_draw(self.seed, epoch, batch_index, -1, "masked-loss") >= self.masked_loss_probability:
            return None
        size = tuple(latents.shape[-2:])
        masks = []
        for i in indices:
            plan = self.mask_plans.get(i)
            if plan is None:
                masks.append(torch.ones(1, *size))
                continue
            try:
                masks.append(mask_weights(plan, size))
            except UnreadableImage as error:
                # this step counts the sample everywhere; later batches leave it out
                self.report_unreadable(i, error.path, error.reason)
                masks.append(torch.ones(1, *size))
        stacked = torch.stack(masks)
        return stacked.unsqueeze(2) if latents.ndim == 5 else stacked

    def crop_for_epoch(self, epoch: int) -> None:
        """Move the random crops of recrop_datasets to `epoch`'s windows (the paired conditioning image
        and mask with them); entries of two epochs back are deleted from the latent caches.

        Latents of a new window are encoded when a batch first needs them, then cached.
        """
        if epoch == self._crop_epoch or not self.recrop_datasets:
            return
        if not self._first_plans:
            self._first_plans = {
                i: (plan, self.conditioning_plans.get(i), self.mask_plans.get(i))
                for i, plan in enumerate(self.plans)
                if plan.dataset_id in self.recrop_datasets
            }
        for i, (first, paired, mask) in self._first_plans.items():
            if epoch >= 2 and not self.encode_latents_each_time:
                self._forget(i, recrop(first, self.seed, epoch - 2), paired)
            plan = self.plans[i] = recrop(first, self.seed, epoch)
            if paired is not None:
                self.conditioning_plans[i] = replace(paired, crop_box=plan.crop_box)
            if mask is not None:
                self.mask_plans[i] = replace(mask, crop_box=plan.crop_box)
        self._crop_epoch = epoch

    def _forget(self, index: int, old: SamplePlan, paired: SamplePlan | None) -> None:
        """Delete the cache entries of a sample's crop that is no longer used (vae_cache_clear_each_epoch)."""
        if old.crop_box == self.plans[index].crop_box:
            return
        self.latent_caches[old.dataset_id].path_for(old).unlink(missing_ok=True)
        if paired is not None:
            old_paired = replace(paired, crop_box=old.crop_box)
            self.conditioning_caches[paired.dataset_id].path_for(old_paired).unlink(missing_ok=True)
        elif old.dataset_id in self.first_frame_datasets:
            self.conditioning_caches[old.dataset_id].path_for(old).unlink(missing_ok=True)

    def conditioning_source(self, index: int) -> SamplePlan | None:
        """The plan a sample's conditioning latents are keyed by: its paired image, itself (first frame), or None."""
        paired = self.conditioning_plans.get(index)
        if paired is not None:
            return paired
        plan = self.plans[index]
        return plan if plan.dataset_id in self.first_frame_datasets else None

    def missing_latents(self, indices: Sequence[int]) -> list[int]:
        """The indices whose latents (or conditioning latents) are not cached."""
        missing = []
        for i in indices:
            plan, source = self.plans[i], self.conditioning_source(i)
            if self.latent_caches[plan.dataset_id].missing([plan]) or (
                source is not None and self.conditioning_caches[source.dataset_id].missing([source])
            ):
                missing.append(i)
        return missing

    def encode(
        self, indices: Sequence[int], latents: bool = True, conditions: bool = True, draw: str = ""
    ) -> dict[int, Encoded]:
        """Encode samples sharing one bucket: {index: (latents, conditioning latents)}, float32 CPU.

        latents / conditions: which of the two to encode (the other is None). Each entry's posterior
        sample is drawn from a generator seeded by its cache key (and `draw`, which names the batch
        when latents are encoded for each batch), so an entry does not depend on which others are
        encoded with it or in what order. Unreadable samples (their file or their conditioning image)
        are reported once and left out.
        """
        loaded: list[tuple[int, torch.Tensor | None, torch.Tensor | None]] = []
        for i in indices:
            plan, paired = self.plans[i], self.conditioning_plans.get(i)
            first_frame = plan.dataset_id in self.first_frame_datasets
            try:
                pixels = self._sample_pixels(plan) if latents or (conditions and first_frame) else None
                condition = self._image_pixels(paired) if paired is not None and conditions else None
            except (UnreadableImage, UnreadableVideo) as error:
                self.report_unreadable(i, error.path, error.reason)
                continue
            loaded.append((i, pixels, condition))
        if not loaded:
            return {}
        if self.components is None:
            raise DataError("latents must be encoded but no model components were given; pass components")
        dtype = _module_dtype(self.components.vae)

        def generators(keys: list[str]) -> list[torch.Generator]:
            return [torch.Generator().manual_seed(_entry_seed(f"{key}{draw}")) for key in keys]

        def encode_pixels(rows: list[int], column: int) -> dict[int, torch.Tensor]:
            if not rows:
                return {}
            pixels = torch.stack([loaded[k][column] for k in rows]).to(self.device, dtype)
            if column == 1:
                keys = [self._latent_key(loaded[k][0]) for k in rows]
            else:
                keys = [self._condition_key(loaded[k][0]) for k in rows]
            encoded = self.family.encode_pixels(self.components, pixels, generators(keys))
            return dict(zip(rows, encoded.float().cpu()))

        with torch.no_grad():
            found = encode_pixels([k for k in range(len(loaded)) if latents], 1)
            paired = encode_pixels([k for k, (_, _, c) in enumerate(loaded) if c is not None], 2)
            first = [
                k
                for k, (i, _, _) in enumerate(loaded)
                if conditions and self.plans[i].dataset_id in self.first_frame_datasets
            ]
            if first:
                clips = torch.stack([loaded[k][1] for k in first]).to(self.device, dtype)
                keys = [self._condition_key(loaded[k][0]) for k in first]
                encoded = self.family.encode_condition(self.components, clips, generators(keys))
                paired.update(zip(first, encoded.float().cpu()))
        return {i: (found.get(k), paired.get(k)) for k, (i, _, _) in enumerate(loaded)}

    def cached_or_encoded(self, indices: Sequence[int]) -> dict[int, Encoded]:
        """(latents, conditioning) from the caches; what is missing is encoded with its cache group and stored."""
        found: dict[int, Encoded] = {}
        lacking = []
        for i in indices:
            plan, source = self.plans[i], self.conditioning_source(i)
            latent = _load_or_none(self.latent_caches[plan.dataset_id], plan)
            condition = (
                None if source is None else _load_or_none(self.conditioning_caches[source.dataset_id], source)
            )
            if latent is not None and (source is None or condition is not None):
                found[i] = (latent, condition)
            else:
                lacking.append(i)
        for group in dict.fromkeys(self.cache_groups.get(i, tuple(lacking)) for i in lacking):
            filled = self.fill_cache(group)
            found.update({i: filled[i] for i in lacking if i in filled})
        return found

    def fill_cache(self, group: Sequence[int]) -> dict[int, Encoded]:
        """Encode one cache group and store the entries it lacks; returns every member as the cache holds it.

        The whole group is encoded even when only one entry is missing: a VAE's results can differ in
        the last bits with the batch it runs in, and a fixed batch keeps every rebuilt entry identical.
        """
        lacks_latents = [
            i for i in group if self.latent_caches[self.plans[i].dataset_id].missing([self.plans[i]])
        ]
        lacks_conditions = []
        for i in group:
            source = self.conditioning_source(i)
            if source is not None and self.conditioning_caches[source.dataset_id].missing([source]):
                lacks_conditions.append(i)
        encoded = self.encode(group, latents=bool(lacks_latents), conditions=bool(lacks_conditions))
        stored: dict[int, Encoded] = {}
        for i, (latent, condition) in encoded.items():
            plan, source = self.plans[i], self.conditioning_source(i)
            cache = self.latent_caches[plan.dataset_id]
            if latent is None:
                latent = _load_or_none(cache, plan)
            else:
                latent = _as_stored(cache, latent)
                if i in lacks_latents:
                    cache.write([plan], [latent])
            if source is not None:
                condition_cache = self.conditioning_caches[source.dataset_id]
                if condition is None:
                    condition = _load_or_none(condition_cache, source)
                else:
                    condition = _as_stored(condition_cache, condition)
                    if i in lacks_conditions:
                        condition_cache.write([source], [condition])
            if latent is not None:
                stored[i] = (latent, condition)
        return stored

    def _latent_key(self, index: int) -> str:
        plan = self.plans[index]
        return self.latent_caches[plan.dataset_id].key(plan)

    def _condition_key(self, index: int) -> str:
        source = self.conditioning_source(index)
        return self.conditioning_caches[source.dataset_id].key(source)

    # -- internals -----------------------------------------------------------------------------
    def _latents(self, indices: list[int], position: tuple[int, int]) -> dict[int, Encoded]:
        """(latents, conditioning) of the readable samples among indices, from the caches or encoded now.

        Encoded for each batch (vae_cache_disable), an image gets a new posterior sample at each
        (epoch, batch_index), which a resumed run draws again exactly.
        """
        readable = [i for i in dict.fromkeys(indices) if i not in self._unreadable]
        if self.encode_latents_each_time:
            return self.encode(readable, draw=f"|batch:{position[0]}:{position[1]}")
        return self.cached_or_encoded(readable)

    def _sample_pixels(self, plan: SamplePlan) -> torch.Tensor:
        """(3, H, W), or (3, T, H, W) for video families (an image is a one-frame clip)."""
        if is_video_file(plan.path):
            return load_clip(plan)
        return self._image_pixels(plan)

    def _image_pixels(self, plan: SamplePlan) -> torch.Tensor:
        pixels = load_pixels(plan)
        return pixels.unsqueeze(1) if self.family.is_video else pixels

    def report_unreadable(self, index: int, path: Path, reason: str) -> None:
        """Leave a sample out from now on; report its unreadable file (or conditioning image) once."""
        self._unreadable.add(index)
        if any(known == str(path) for known, _ in self.skipped):
            return
        self.skipped.append((str(path), reason))
        self.events("skipped", {"dataset": self.plans[index].dataset_id, "path": str(path), "reason": reason})

    def text_key(self, caption: str, index: int) -> str:
        """The text-cache key of a sample's caption: the caption, or caption + image for image prompts."""
        paired = self.conditioning_plans.get(index)
        if not self.prompt_images or paired is None:
            return caption
        return prompt_key(caption, self.conditioning_caches[paired.dataset_id].key(paired))

    def prompt_image(self, index: int):
        """The PIL conditioning image of a sample as its prompt embedding sees it (resized and cropped)."""
        return to_pil(load_pixels(self.conditioning_plans[index]))

    def _text_embeds(self, caption: str, index: int) -> dict[str, torch.Tensor]:
        key = self.text_key(caption, index)
        try:
            return self.text_cache.load(key)
        except CacheMiss:
            if key == caption:
                encode_text(self.family, self.components, self.text_cache, [caption], self.events)
            else:
                item = (key, caption, self.prompt_image(index))
                encode_image_prompts(self.family, self.components, self.text_cache, [item], self.events)
            return self.text_cache.load(key)


def encode_text(
    family: Family,
    components: Components | None,
    cache: TextEmbedCache,
    prompts: Sequence[str],
    events: Events,
) -> None:
    """Encode prompts with the family's text encoders in batches of cache.write_batch_size and cache them."""
    prompts = list(prompts)
    if not prompts:
        return
    if components is None:
        raise DataError(
            f"{len(prompts)} prompt(s) are not in the text cache and no model components were given"
        )
    for start in range(0, len(prompts), cache.write_batch_size):
        chunk = prompts[start : start + cache.write_batch_size]
        with torch.no_grad():
            embeds = family.encode_prompts(components, chunk)
        cache.write(chunk, [{k: v.detach().cpu() for k, v in e.items()} for e in embeds])
        events("cache", {"kind": "text", "done": start + len(chunk), "total": len(prompts)})


def geometry_of(plan: SamplePlan) -> SampleGeometry:
    """A sample's sizes and crop as the Family boundary takes them: (height, width) and (top, left)."""
    width, height = plan.original_size
    return SampleGeometry(
        original_size=(height, width),
        crop_top_left=plan.crop_top_left,
        target_size=(plan.bucket[1], plan.bucket[0]),
    )


def _module_dtype(module: torch.nn.Module | None) -> torch.dtype:
    if module is None:
        return torch.float32
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next((p.dtype for p in module.parameters()), torch.float32)


def _unit_draw(seed: int, epoch: int, batch_index: int, index: int, purpose: str = "dropout") -> float:
    """A number in [0, 1) fixed by (purpose, seed, epoch, batch_index, sample index)."""
    digest = hashlib.sha256(f"{purpose}:{seed}:{epoch}:{batch_index}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _load_or_none(cache: LatentCache, plan: SamplePlan) -> torch.Tensor | None:
    try:
        return cache.load(plan).latents
    except CacheMiss:
        return None


def _entry_seed(key: str) -> int:
    """The seed of a cache entry's posterior sample: fixed by its key, so rebuilding it gives the same latents."""
    return int.from_bytes(hashlib.sha256(f"latent-noise:{key}".encode()).digest()[:8], "big") >> 1


def _as_stored(cache: LatentCache, latents: torch.Tensor) -> torch.Tensor:
    """Latents rounded to the cache's storage dtype and back, as a later read of the entry returns them."""
    return latents.to(cache.dtype).float()


def cache_groups(
    plans: Sequence[SamplePlan], bucket_keys: Sequence[Hashable], group_size: int
) -> dict[int, tuple[int, ...]]:
    """Each sample's cache group: up to group_size samples of one dataset and bucket, in plan order.

    Entries are always encoded with their group (see TrainingData.fill_cache), whichever are missing.
    """
    by_bucket: dict[tuple[str, Hashable], list[int]] = {}
    for index, plan in enumerate(plans):
        by_bucket.setdefault((plan.dataset_id, bucket_keys[index]), []).append(index)
    groups: dict[int, tuple[int, ...]] = {}
    for members in by_bucket.values():
        for start in range(0, len(members), max(1, group_size)):
            group = tuple(members[start : start + group_size])
            groups.update(dict.fromkeys(group, group))
    return groups
