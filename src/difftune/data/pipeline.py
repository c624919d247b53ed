"""Training data as the trainer sees it: discover, caption, bucket, cache, then hand out batches.

`prepare_training_data` does the up-front work (discovery, plans, the size check, the text and latent
caches) and returns `TrainingData`, whose sampler gives index lists and whose `load_batch` turns one
into tensors. Unreadable files are reported once each through events("skipped", ...) and left out.

Image families train on image datasets. Video families train on video datasets (clips, see
data/video_samples.py) and on image datasets as one-frame clips. Linked conditioning datasets and
image-to-video first frames add batch["conditioning_latents"] (see data/conditioning.py).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difftune.cache.latents import LatentCache
from difftune.cache.text import TextEmbedCache
from difftune.data.buckets import SamplePlan, crops_each_epoch, plan_samples
from difftune.data.captions import load_captions
from difftune.data.conditioning import (
    encode_image_prompts,
    is_mask,
    linked_conditioning_datasets,
    pair_conditioning,
    prompts_use_images,
    wants_first_frame,
)
from difftune.data.discovery import discover, skip_words
from difftune.data.errors import DataError, UnreadableImage
from difftune.data.sampler import BucketBatchSampler, SampleGroup, check_enough_samples
from difftune.data.training_data import Events, TrainingData, cache_groups, encode_text
from difftune.data.video_samples import VideoLatentCache, as_one_frame_clips, plan_video_samples
from difftune.storage import DiskFull, megabytes

if TYPE_CHECKING:
    from difftune.config.schema import DatasetConfig, TrainConfig
    from difftune.families.base import Components, Family

__all__ = ["TrainingData", "encode_text", "prepare_training_data"]


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
    """Discover, caption and bucket every enabled training dataset; fill the caches; build the sampler.

    With num_processes > 1 the sampler walks global batches of num_processes * train_batch_size
    samples and hands out this process's train_batch_size rows of each (see data/sampler.py).
    extra_prompts (validation prompts, the negative prompt) are cached with the captions, and so is ""
    (not for families whose prompts include the conditioning image: those are cached per image).
    Raises DatasetTooSmall when the samples cannot fill one optimizer step of global batches.
    """
    seed = train.seed if train.seed is not None else 0
    batch_size = train.train_batch_size
    rows = slice(process_index * batch_size, (process_index + 1) * batch_size)
    if any(d.type == "huggingface" and not d.disabled for d in datasets):
        from difftune.data.huggingface import as_local

        datasets = [
            as_local(d, events) if d.type == "huggingface" and not d.disabled else d for d in datasets
        ]
    pair_captions: dict[str, list[str]] = {}
    if any(d.conditioning for d in datasets):
        from difftune.data.generators import with_generated

        datasets, pair_captions = with_generated(datasets, events)
    train_sets = [d for d in datasets if not d.disabled and d.dataset_type in ("image", "video")]
    for dataset in train_sets:
        if dataset.dataset_type == "video" and not family.is_video:
            raise DataError(
                f"dataset '{dataset.id}' is a video dataset but model_family '{family.name}' trains on images; "
                "use a video model family, or set its dataset_type to image with image files, or disable it"
            )
    if not train_sets:
        raise DataError(
            "no enabled image or video dataset in the data backend config; add one with dataset_type image "
            "(or video) and instance_data_dir, or set disabled: false on an existing one"
        )

    prompt_images = prompts_use_images(family)
    data = TrainingData(
        sampler=BucketBatchSampler([], batch_size * num_processes, seed, rows),
        plans=[],
        captions=[],
        skipped=[],
        family=family,
        components=components,
        device=device,
        text_cache=TextEmbedCache(
            text_cache_dir,
            text_cache_identity(train, family),
            next((d.write_batch_size for d in datasets if d.dataset_type == "text_embeds"), 128),
        ),
        latent_caches={},
        events=events,
        seed=seed,
        caption_dropout={d.id: _caption_dropout(d, train) for d in train_sets},
        encode_latents_each_time=train.vae_cache_disable,
        prompt_images=prompt_images,
        masked_loss_probability=train.masked_loss_probability,
        regularisation_datasets={d.id for d in train_sets if d.is_regularisation_data},
        recrop_datasets={d.id for d in train_sets if crops_each_epoch(d)},
    )
    latent_identity = f"{family.cache_identity()}|vae={train.pretrained_vae_model_name_or_path or ''}"
    for dataset in train_sets:
        _check_prompt_images(data, dataset, datasets)
        _add_dataset(data, dataset, datasets, latent_identity, seed, pair_captions)

    gas = train.gradient_accumulation_steps
    repeats = {d.id: d.repeats for d in train_sets}
    if train.allow_dataset_oversubscription:
        needed = batch_size * gas * num_processes
        all_groups = _groups(train_sets, data.plans, data.bucket_keys, set(), repeats)
        repeats.update(_oversubscribed_repeats(all_groups, train_sets, needed, events))

    def groups(excluded: set[int]) -> list[SampleGroup]:
        return _groups(train_sets, data.plans, data.bucket_keys, excluded, repeats)

    check_enough_samples(groups(set()), batch_size, gas, num_processes)
    data.cache_groups = cache_groups(data.plans, data.bucket_keys, train.vae_batch_size)
    if not (train.vae_cache_ondemand or train.vae_cache_disable):
        _fill_latent_cache(data, train_sets)

    captioned = [
        i
        for i, plan in enumerate(data.plans)
        if plan.dataset_id in {d.id for d in train_sets if "text" not in skip_words(d)}
    ]
    if prompt_images:
        _cache_image_prompts(data, captioned, with_empty=any(data.caption_dropout.values()))
    else:
        prompts = [""] + [p for p in extra_prompts if p is not None]
        prompts += [c for i in captioned for c in data.captions[i]]
        encode_text(family, components, data.text_cache, data.text_cache.missing(prompts), events)
    # files found unreadable while caching are left out
    check_enough_samples(groups(data._unreadable), batch_size, gas, num_processes)
    data.sampler = BucketBatchSampler(groups(data._unreadable), batch_size * num_processes, seed, rows)
    eval_sets = [
        d
        for d in datasets
        if not d.disabled and d.dataset_type == "eval" and train.eval_dataset_id in (None, d.id)
    ]
    if eval_sets:
        data.held_out_batches = _held_out_batches(data, train, eval_sets, datasets, latent_identity)
    return data


def _held_out_batches(
    data: TrainingData,
    train: TrainConfig,
    eval_sets: Sequence[DatasetConfig],
    datasets: Sequence[DatasetConfig],
    latent_identity: str,
) -> list[dict[str, Any]]:
    """Batches of the eval datasets (never sampled for training): the first num_eval_images samples by
    dataset and path, grouped by bucket into batches of train_batch_size, without caption dropout."""
    held = TrainingData(
        sampler=data.sampler,
        plans=[],
        captions=[],
        skipped=[],
        family=data.family,
        components=data.components,
        device=data.device,
        text_cache=data.text_cache,
        latent_caches={},
        events=data.events,
        seed=data.seed,
        encode_latents_each_time=data.encode_latents_each_time,
        prompt_images=data.prompt_images,
        masked_loss_probability=data.masked_loss_probability,
    )
    for dataset in eval_sets:
        as_training = "video" if dataset.video is not None and data.family.is_video else "image"
        _check_prompt_images(held, dataset, datasets)
        _add_dataset(
            held,
            dataset.model_copy(update={"dataset_type": as_training}),
            datasets,
            latent_identity,
            held.seed,
        )
    chosen = sorted(
        range(held.num_samples), key=lambda i: (held.plans[i].dataset_id, held.plans[i].relative_path)
    )
    chosen = chosen[: train.num_eval_images]
    if not chosen:
        names = ", ".join(f"'{d.id}'" for d in eval_sets)
        raise DataError(f"eval dataset(s) {names} hold no usable sample; add images or disable them")
    by_bucket: dict[Hashable, list[int]] = defaultdict(list)
    for i in chosen:
        by_bucket[held.bucket_keys[i]].append(i)
    batches = []
    for key in sorted(by_bucket, key=str):
        bucket = by_bucket[key]
        batches += [
            bucket[start : start + train.train_batch_size]
            for start in range(0, len(bucket), train.train_batch_size)
        ]
    return [held.load_batch(indices, position=(0, k)) for k, indices in enumerate(batches)]


def _check_prompt_images(
    data: TrainingData, dataset: DatasetConfig, datasets: Sequence[DatasetConfig]
) -> None:
    """Families whose prompts include the source image need every dataset linked to source images."""
    linked = linked_conditioning_datasets(dataset, datasets)
    if data.prompt_images and not [d for d in linked if not is_mask(d)]:
        raise DataError(
            f"dataset '{dataset.id}' has no conditioning_data, but this model's prompts include the source "
            "image (image-to-image); link it to a conditioning dataset with "
            '"conditioning_data": "<id>", or disable it'
        )


def _caption_dropout(dataset: DatasetConfig, train: TrainConfig) -> float:
    """The dataset's caption_dropout_probability, else the top-level one."""
    own = dataset.caption_dropout_probability
    return own if own is not None else train.caption_dropout_probability


def text_cache_identity(train: TrainConfig, family: Family) -> str:
    """What the cached prompt embeddings depend on: the text encoders and the prompt length asked for."""
    identity = family.cache_identity()
    if train.tokenizer_max_length is not None:
        identity += f"|tokenizer_max_length={train.tokenizer_max_length}"
    return identity


def _add_dataset(
    data: TrainingData,
    dataset: DatasetConfig,
    datasets: Sequence[DatasetConfig],
    latent_identity: str,
    seed: int,
    pair_captions: dict[str, list[str]] | None = None,
) -> None:
    """Discover, plan, pair and caption one training dataset and append its samples to data.

    pair_captions: captions (by conditioning dataset id) that replace those of the samples paired with it.
    """
    family = data.family
    cache_dir = _vae_cache_dir(dataset, family)
    cache_type = VideoLatentCache if family.is_video else LatentCache
    data.latent_caches[dataset.id] = cache_type(
        cache_dir, latent_identity, write_batch_size=dataset.write_batch_size
    )
    found = discover(dataset, cache_dir)
    if dataset.dataset_type == "video":
        planned = plan_video_samples(
            found.samples, dataset, family.pixel_multiple, family.spec.frames_per_latent, seed
        )
        kept, keys, rejected = planned.plans, planned.bucket_keys, planned.skipped
    else:
        kept, rejected = plan_samples(found.samples, dataset, family.pixel_multiple, seed)
        kept = as_one_frame_clips(kept) if family.is_video else kept
        keys = [plan.bucket for plan in kept]
    by_path = {s.path: s for s in found.samples}
    dataset_captions = load_captions(dataset, [by_path[p.path] for p in kept], found.root, seed)
    readable = [i for i, captions in enumerate(dataset_captions.per_sample) if captions is not None]
    kept, keys = [kept[i] for i in readable], [keys[i] for i in readable]
    per_sample = [dataset_captions.per_sample[i] for i in readable]
    rejected = rejected + dataset_captions.unreadable

    pairs: dict[int, SamplePlan] = {}
    masks: dict[int, SamplePlan] = {}
    linked = linked_conditioning_datasets(dataset, datasets)
    sources = [d for d in linked if not is_mask(d)]
    for role, chosen in (("sources", sources), ("masks", [d for d in linked if is_mask(d)])):
        if not chosen:
            continue
        found_sources = []
        for source in chosen:
            source_dir = _vae_cache_dir(source, family)
            if role == "sources":
                data.conditioning_caches.setdefault(
                    source.id,
                    LatentCache(
                        source_dir,
                        f"{latent_identity}|conditioning",
                        write_batch_size=source.write_batch_size,
                    ),
                )
            found_sources.append((source, discover(source, source_dir)))
        matched, unpaired = pair_conditioning(kept, found_sources)
        rejected = rejected + unpaired
        paired = sorted(matched)
        kept, keys = [kept[k] for k in paired], [keys[k] for k in paired]
        per_sample = [per_sample[k] for k in paired]
        pairs = {new: pairs[old] for new, old in enumerate(paired) if old in pairs}
        masks = {new: masks[old] for new, old in enumerate(paired) if old in masks}
        (pairs if role == "sources" else masks).update({new: matched[old] for new, old in enumerate(paired)})
    for k, paired_plan in pairs.items():
        if pair_captions and paired_plan.dataset_id in pair_captions:
            per_sample[k] = pair_captions[paired_plan.dataset_id]
    if not sources and wants_first_frame(dataset, family):
        data.first_frame_datasets.add(dataset.id)
        data.conditioning_caches[dataset.id] = VideoLatentCache(
            cache_dir, f"{latent_identity}|first-frame", write_batch_size=dataset.write_batch_size
        )

    for path, reason in found.skipped + rejected:
        data.skipped.append((str(path), reason))
        data.events("skipped", {"dataset": dataset.id, "path": str(path), "reason": reason})
    message = dataset_captions.fallback_message(dataset.id, dataset.caption_strategy)
    if message:
        data.events("warning", {"message": message})
    offset = len(data.plans)
    data.plans += kept
    data.bucket_keys += keys
    data.captions += per_sample
    data.conditioning_plans.update({offset + k: plan for k, plan in pairs.items()})
    data.mask_plans.update({offset + k: plan for k, plan in masks.items()})
    buckets = len(set(keys))
    data.events(
        "log",
        {
            "message": f"dataset '{dataset.id}': {len(kept)} samples in {buckets} bucket(s), "
            f"{len(found.skipped) + len(rejected)} left out",
            "dataset": dataset.id,
            "samples": len(kept),
            "buckets": buckets,
        },
    )


def _fill_latent_cache(data: TrainingData, datasets: Sequence[DatasetConfig]) -> None:
    """Encode every cache group (vae_batch_size samples of one bucket) that lacks an entry, and store it.

    The groups are fixed by the plans alone, so a run that resumes after an interrupted caching pass
    encodes each missing entry in the same batch, with the same noise, as an uninterrupted run.
    """
    for dataset in datasets:
        if "vae" in skip_words(dataset):
            continue  # missing entries are encoded when first used
        indices = [i for i, plan in enumerate(data.plans) if plan.dataset_id == dataset.id]
        missing = set(data.missing_latents(indices))
        groups = list(dict.fromkeys(data.cache_groups[i] for i in sorted(missing)))
        done = 0
        for group in sorted(groups, key=lambda g: (str(data.bucket_keys[g[0]]), g)):
            try:
                data.fill_cache(group)
            except DiskFull as error:
                left = len(missing) - done
                raise DiskFull(
                    f"no space left on device while writing the latent cache of dataset '{dataset.id}' in "
                    f"{data.latent_caches[dataset.id].cache_dir} (needs about "
                    f"{megabytes(error.size_bytes * left)} for the {left} entries left); free some space "
                    "or set its cache_dir_vae to a folder on a larger disk",
                    error.size_bytes * left,
                ) from None
            done += sum(1 for i in group if i in missing)
            data.events(
                "cache", {"kind": "latents", "dataset": dataset.id, "done": done, "total": len(missing)}
            )


def _cache_image_prompts(data: TrainingData, indices: Sequence[int], with_empty: bool) -> None:
    """Encode the captions (and "" with caption dropout) of each sample with its conditioning image.

    Encoded and written a text-cache batch at a time, so only that many images are held at once.
    """
    items: list[tuple[str, str, Any]] = []
    for i in indices:
        if len(items) >= data.text_cache.write_batch_size:
            encode_image_prompts(data.family, data.components, data.text_cache, items, data.events)
            items = []
        if i in data._unreadable:
            continue
        captions = list(dict.fromkeys(data.captions[i] + ([""] if with_empty else [])))
        keys = {data.text_key(caption, i): caption for caption in captions}
        missing = data.text_cache.missing(list(keys))
        if not missing:
            continue
        try:
            image = data.prompt_image(i)
        except UnreadableImage as error:
            data.report_unreadable(i, error.path, error.reason)
            continue
        items += [(key, keys[key], image) for key in missing]
    encode_image_prompts(data.family, data.components, data.text_cache, items, data.events)


def _groups(
    datasets: Sequence[DatasetConfig],
    plans: Sequence[SamplePlan],
    bucket_keys: Sequence[Hashable],
    excluded: set[int],
    repeats: dict[str, int],
) -> list[SampleGroup]:
    """One SampleGroup per dataset: its plan indices by bucket key, the excluded ones left out."""
    by_dataset: dict[str, dict[Hashable, list[int]]] = {d.id: defaultdict(list) for d in datasets}
    for index, plan in enumerate(plans):
        if index not in excluded:
            by_dataset[plan.dataset_id][bucket_keys[index]].append(index)
    return [SampleGroup(d.id, dict(by_dataset[d.id]), repeats[d.id], d.probability) for d in datasets]


def _oversubscribed_repeats(
    groups: Sequence[SampleGroup], datasets: Sequence[DatasetConfig], needed: int, events: Events
) -> dict[str, int]:
    """allow_dataset_oversubscription, as the original tool: a dataset that does not set repeats and has a
    bucket smaller than `needed` (batch x accumulation x processes) gets the repeats that fill it."""
    raised = {}
    explicit = {d.id for d in datasets if "repeats" in d.model_fields_set}
    for group in groups:
        smallest = min((len(ix) for ix in group.buckets.values()), default=0)
        if group.dataset_id in explicit or not 0 < smallest < needed:
            continue
        raised[group.dataset_id] = -(-needed // smallest) - 1
        events(
            "warning",
            {
                "message": f"dataset '{group.dataset_id}': its smallest bucket holds {smallest} samples, fewer "
                f"than one optimizer step takes ({needed}); allow_dataset_oversubscription sets its repeats "
                f"to {raised[group.dataset_id]}"
            },
        )
    return raised


def _vae_cache_dir(dataset: DatasetConfig, family: Family) -> Path:
    """The dataset's cache_dir_vae, else cache/vae/<family>/<dataset id>."""
    return (
        Path(dataset.cache_dir_vae) if dataset.cache_dir_vae else Path("cache/vae") / family.name / dataset.id
    )
