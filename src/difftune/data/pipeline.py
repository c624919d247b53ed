"""Training data as the trainer sees it: discover, caption, bucket, cache, then hand out batches.

`prepare_training_data` does the up-front work (discovery, plans, the size check, the text and latent
caches) and returns `TrainingData`, whose sampler gives index lists and whose `load_batch` turns one
into tensors. Unreadable images are reported once each through events("skipped", ...) and left out.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from difftune.cache.latents import LatentCache
from difftune.cache.store import CacheMiss
from difftune.cache.text import TextEmbedCache
from difftune.data.buckets import SamplePlan, plan_samples
from difftune.data.captions import load_captions, pick_caption
from difftune.data.discovery import discover, skip_words
from difftune.data.errors import DataError, UnreadableImage
from difftune.data.images import load_pixels
from difftune.data.sampler import BucketBatchSampler, SampleGroup, check_enough_samples

if TYPE_CHECKING:
    from difftune.config.schema import DatasetConfig, TrainConfig
    from difftune.families.base import Components, Family

Events = Callable[[str, dict[str, Any]], None]


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
    caption_dropout_probability: float = 0.0
    encode_latents_each_time: bool = False  # vae_cache_disable: never read or write latent files
    _unreadable: set[int] = field(default_factory=set)
    _index_of: dict[SamplePlan, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._index_of = {plan: index for index, plan in enumerate(self.plans)}

    @property
    def num_samples(self) -> int:
        return len(self.plans)

    def load_batch(self, indices: Sequence[int], position: tuple[int, int] | None = None) -> dict[str, Any]:
        """Tensors of one batch: latents (B, C, H, W) float32, collated prompt tensors, SDXL sizes, captions.

        position = (epoch, batch_index) picks each sample's caption and the caption dropout; it
        defaults to the sampler's last batch, so a resumed run sees the same captions. Sizes are long
        tensors (B, 2): original_sizes (h, w), crop_coords (top, left), target_sizes (h, w).
        """
        if not indices:
            raise ValueError("load_batch needs at least one sample index")
        epoch, batch_index = position or self.sampler.last_position or (self.sampler.epoch, 0)
        latents = self._latents(list(indices))
        good = [i for i in indices if i in latents]
        if not good:
            paths = ", ".join(str(self.plans[i].path) for i in indices)
            raise DataError(f"every image of a batch is unreadable ({paths}); remove or replace these files")
        # an image found unreadable only now is replaced by another of the same bucket in this batch
        indices = [good[k % len(good)] for k in range(len(indices))]

        captions = []
        for i in indices:
            caption = pick_caption(self.captions[i], self.seed, epoch, self.plans[i].relative_path)
            if self.caption_dropout_probability > 0 and (
                _unit_draw(self.seed, epoch, batch_index, i) < self.caption_dropout_probability
            ):
                caption = ""
            captions.append(caption)
        batch: dict[str, Any] = dict(self.family.collate_prompts([self._text_embeds(c) for c in captions]))
        plans = [self.plans[i] for i in indices]
        batch["latents"] = torch.stack([latents[i] for i in indices])
        batch["original_sizes"] = torch.tensor([(p.original_size[1], p.original_size[0]) for p in plans])
        batch["crop_coords"] = torch.tensor([p.crop_top_left for p in plans])
        batch["target_sizes"] = torch.tensor([(p.bucket[1], p.bucket[0]) for p in plans])
        batch["captions"] = captions
        batch["paths"] = [str(p.path) for p in plans]
        return batch

    # -- internals -----------------------------------------------------------------------------
    def _latents(self, indices: list[int]) -> dict[int, torch.Tensor]:
        """Latents (float32, CPU) of the readable samples among indices, from the cache or encoded now."""
        found: dict[int, torch.Tensor] = {}
        to_encode = []
        for i in dict.fromkeys(indices):
            if i in self._unreadable:
                continue
            if self.encode_latents_each_time:
                to_encode.append(i)
                continue
            try:
                found[i] = self.latent_caches[self.plans[i].dataset_id].load(self.plans[i]).latents
            except CacheMiss:
                to_encode.append(i)
        if to_encode:
            encoded = self.encode([self.plans[i] for i in to_encode])
            for i, latent in zip(to_encode, encoded):
                if latent is None:
                    self._unreadable.add(i)
                    continue
                found[i] = latent
                if not self.encode_latents_each_time:
                    self.latent_caches[self.plans[i].dataset_id].write([self.plans[i]], latent[None])
        return found

    def encode(self, plans: Sequence[SamplePlan]) -> list[torch.Tensor | None]:
        """Latents (float32, CPU) of plans sharing one bucket; None for an unreadable image (reported once)."""
        pixels, readable = [], []
        for position, plan in enumerate(plans):
            try:
                pixels.append(load_pixels(plan))
                readable.append(position)
            except UnreadableImage as error:
                self._report_unreadable(plan, error.reason)
        result: list[torch.Tensor | None] = [None] * len(plans)
        if pixels:
            if self.components is None:
                raise DataError("latents must be encoded but no model components were given; pass components")
            vae = self.components.vae
            dtype = _module_dtype(vae)
            with torch.no_grad():
                latents = self.family.encode_pixels(
                    self.components, torch.stack(pixels).to(self.device, dtype)
                )
            for position, latent in zip(readable, latents.float().cpu()):
                result[position] = latent
        return result

    def _report_unreadable(self, plan: SamplePlan, reason: str) -> None:
        index = self._index_of.get(plan)
        if index is not None:
            self._unreadable.add(index)
        if any(path == str(plan.path) for path, _ in self.skipped):
            return
        self.skipped.append((str(plan.path), reason))
        self.events("skipped", {"dataset": plan.dataset_id, "path": str(plan.path), "reason": reason})

    def _text_embeds(self, caption: str) -> dict[str, torch.Tensor]:
        try:
            return self.text_cache.load(caption)
        except CacheMiss:
            encode_text(self.family, self.components, self.text_cache, [caption], self.events)
            return self.text_cache.load(caption)


def prepare_training_data(
    train: TrainConfig,
    datasets: Sequence[DatasetConfig],
    text_cache_dir: Path,
    family: Family,
    components: Components | None,
    device: Any,
    events: Events,
    num_processes: int = 1,
    process_index: int = 0,
    extra_prompts: Sequence[str] = (),
) -> TrainingData:
    """Discover, caption and bucket every enabled image dataset; fill the caches; build the sampler.

    extra_prompts (validation prompts, the negative prompt) are cached with the captions, and so is "".
    Raises DatasetTooSmall when the samples cannot fill one optimizer step.
    """
    seed = train.seed if train.seed is not None else 0
    image_sets = [d for d in datasets if not d.disabled and d.dataset_type == "image"]
    for dataset in datasets:
        if not dataset.disabled and dataset.dataset_type == "video":
            raise DataError(
                f"dataset '{dataset.id}' is a video dataset; this training data pipeline reads image datasets "
                "only. Set its dataset_type to image with image files, or disable it"
            )
    if not image_sets:
        raise DataError(
            "no enabled image dataset in the data backend config; add one with dataset_type image and "
            "instance_data_dir, or set disabled: false on an existing one"
        )

    plans: list[SamplePlan] = []
    captions: list[list[str]] = []
    skipped: list[tuple[str, str]] = []
    latent_caches: dict[str, LatentCache] = {}
    latent_identity = f"{family.cache_identity()}|vae={train.pretrained_vae_model_name_or_path or ''}"
    for dataset in image_sets:
        cache_dir = (
            Path(dataset.cache_dir_vae)
            if dataset.cache_dir_vae
            else Path("cache/vae") / family.name / dataset.id
        )
        latent_caches[dataset.id] = LatentCache(
            cache_dir, latent_identity, write_batch_size=dataset.write_batch_size
        )
        found = discover(dataset, cache_dir)
        kept, rejected = plan_samples(found.samples, dataset, family.pixel_multiple, seed)
        for path, reason in found.skipped + rejected:
            skipped.append((str(path), reason))
            events("skipped", {"dataset": dataset.id, "path": str(path), "reason": reason})
        by_path = {s.path: s for s in found.samples}
        dataset_captions = load_captions(dataset, [by_path[p.path] for p in kept], found.root)
        message = dataset_captions.fallback_message(dataset.id, dataset.caption_strategy)
        if message:
            events("warning", {"message": message})
        plans += kept
        captions += dataset_captions.per_sample
        buckets = len({p.bucket for p in kept})
        events(
            "log",
            {
                "message": f"dataset '{dataset.id}': {len(kept)} samples in {buckets} bucket(s), "
                f"{len(found.skipped) + len(rejected)} left out",
                "dataset": dataset.id,
                "samples": len(kept),
                "buckets": buckets,
            },
        )

    def groups(excluded: set[int]) -> list[SampleGroup]:
        return _groups(image_sets, plans, excluded)

    gas = train.gradient_accumulation_steps
    check_enough_samples(groups(set()), train.train_batch_size, gas, num_processes)

    text_batch = next((d.write_batch_size for d in datasets if d.dataset_type == "text_embeds"), 128)
    data = TrainingData(
        sampler=BucketBatchSampler([], train.train_batch_size, seed, num_processes, process_index),
        plans=plans,
        captions=captions,
        skipped=skipped,
        family=family,
        components=components,
        device=device,
        text_cache=TextEmbedCache(text_cache_dir, family.cache_identity(), text_batch),
        latent_caches=latent_caches,
        events=events,
        seed=seed,
        caption_dropout_probability=train.caption_dropout_probability,
        encode_latents_each_time=train.vae_cache_disable,
    )
    if not (train.vae_cache_ondemand or train.vae_cache_disable):
        _fill_latent_cache(data, image_sets, train.vae_batch_size)
        check_enough_samples(groups(data._unreadable), train.train_batch_size, gas, num_processes)

    prompts = [""] + [p for p in extra_prompts if p is not None]
    for dataset in image_sets:
        if "text" not in skip_words(dataset):
            prompts += [c for i, p in enumerate(plans) if p.dataset_id == dataset.id for c in captions[i]]
    encode_text(family, components, data.text_cache, data.text_cache.missing(prompts), events)

    data.sampler = BucketBatchSampler(
        groups(data._unreadable), train.train_batch_size, seed, num_processes, process_index
    )
    return data


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


def _fill_latent_cache(data: TrainingData, datasets: Sequence[DatasetConfig], vae_batch_size: int) -> None:
    """Encode every plan whose latent is not cached, vae_batch_size images of one bucket at a time."""
    for dataset in datasets:
        if "vae" in skip_words(dataset):
            continue  # missing entries are encoded when first used
        cache = data.latent_caches[dataset.id]
        missing = cache.missing([p for p in data.plans if p.dataset_id == dataset.id])
        by_bucket: dict[tuple[int, int], list[SamplePlan]] = defaultdict(list)
        for plan in missing:
            by_bucket[plan.bucket].append(plan)
        done = 0
        for bucket in sorted(by_bucket):
            bucket_plans = by_bucket[bucket]
            for start in range(0, len(bucket_plans), vae_batch_size):
                chunk = bucket_plans[start : start + vae_batch_size]
                encoded = data.encode(chunk)
                readable = [(plan, latent) for plan, latent in zip(chunk, encoded) if latent is not None]
                if readable:
                    cache.write([p for p, _ in readable], [latent for _, latent in readable])
                done += len(chunk)
                data.events(
                    "cache", {"kind": "latents", "dataset": dataset.id, "done": done, "total": len(missing)}
                )


def _groups(
    datasets: Sequence[DatasetConfig], plans: Sequence[SamplePlan], excluded: set[int]
) -> list[SampleGroup]:
    """One SampleGroup per dataset: its plan indices by bucket, the excluded ones left out."""
    by_dataset: dict[str, dict[tuple[int, int], list[int]]] = {d.id: defaultdict(list) for d in datasets}
    for index, plan in enumerate(plans):
        if index not in excluded:
            by_dataset[plan.dataset_id][plan.bucket].append(index)
    return [SampleGroup(d.id, dict(by_dataset[d.id]), d.repeats, d.probability) for d in datasets]


def _module_dtype(module: torch.nn.Module | None) -> torch.dtype:
    if module is None:
        return torch.float32
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next((p.dtype for p in module.parameters()), torch.float32)


def _unit_draw(seed: int, epoch: int, batch_index: int, index: int) -> float:
    """A number in [0, 1) fixed by (seed, epoch, batch_index, sample index)."""
    digest = hashlib.sha256(f"dropout:{seed}:{epoch}:{batch_index}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
