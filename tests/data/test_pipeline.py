import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difftune.config.schema import DatasetConfig, TrainConfig
from difftune.data.errors import DatasetTooSmall
from difftune.data.pipeline import prepare_training_data
from difftune.families.base import Family
from tests.data.fakes import FakeFamily, fake_components, save_image

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def _make_images(folder: Path, n=6, size=(64, 48)) -> list[Path]:
    paths = []
    for i in range(n):
        path = save_image(folder / f"img_{i}.png", size, COLOURS[i % len(COLOURS)])
        path.with_suffix(".txt").write_text(f"picture number {i}")
        paths.append(path)
    return paths


class Run:
    """prepare_training_data with a fake family, recording the events."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.events: list[tuple[str, dict]] = []

    def dataset(self, **kwargs) -> DatasetConfig:
        settings = {
            "id": "pics",
            "instance_data_dir": str(self.tmp_path / "data"),
            "caption_strategy": "textfile",
            "resolution": 32,
            "resolution_type": "pixel",
            "cache_dir_vae": str(self.tmp_path / "vae"),
        }
        return DatasetConfig(**{**settings, **kwargs})

    def prepare(
        self, family=None, dataset=None, extra_prompts=("a validation prompt",), processes=(1, 0), **train
    ):
        config = TrainConfig(
            model_family="fake", **{"train_batch_size": 2, "seed": 1, "vae_batch_size": 2, **train}
        )
        family = family or FakeFamily(config)
        data = prepare_training_data(
            config,
            [dataset or self.dataset()],
            self.tmp_path / "text",
            family,
            fake_components(),
            "cpu",
            lambda kind, payload: self.events.append((kind, payload)),
            num_processes=processes[0],
            process_index=processes[1],
            extra_prompts=list(extra_prompts),
        )
        return data, family

    def latent_files(self) -> set[str]:
        return {p.name for p in (self.tmp_path / "vae").glob("*.safetensors")}


def test_batches_hold_latents_prompts_and_sizes(tmp_path):
    _make_images(tmp_path / "data")
    run = Run(tmp_path)
    data, family = run.prepare()
    assert data.num_samples == 6 and data.sampler.batches_per_epoch == 3 and data.skipped == []
    assert family.encoded_images == 6 and len(run.latent_files()) == 6
    assert set(family.encoded_prompts) == {f"picture number {i}" for i in range(6)} | {
        "",
        "a validation prompt",
    }
    indices = next(data.sampler.iter_forever())
    batch = data.load_batch(indices)
    assert batch["latents"].shape == (2, 4, 4, 4) and batch["latents"].dtype == torch.float32
    assert batch["prompt_embeds"].shape == (2, 3, 8) and batch["pooled_prompt_embeds"].shape == (2, 8)
    # 64x48 at a 32 px short edge: bucket 32x32 from a 43x32 resize, centre crop
    assert (
        batch["original_sizes"].tolist() == [[48, 64], [48, 64]]
        and batch["original_sizes"].dtype == torch.long
    )
    assert batch["target_sizes"].tolist() == [[32, 32], [32, 32]] and batch["crop_coords"].tolist() == [
        [0, 5],
        [0, 5],
    ]
    assert batch["captions"] == [f"picture number {Path(p).stem.split('_')[1]}" for p in batch["paths"]]
    # the latent is the fake VAE's 8x pooling of the solid colour
    index = int(Path(batch["paths"][0]).stem.split("_")[1])
    colour = torch.tensor(COLOURS[index % len(COLOURS)]) / 127.5 - 1
    assert torch.allclose(batch["latents"][0, :3].mean(dim=(1, 2)), colour, atol=0.02)
    expected = family.encode_prompts(None, [batch["captions"][0]])[0]["pooled_prompt_embeds"]
    assert torch.equal(batch["pooled_prompt_embeds"][0], expected)


class PlainFakeFamily(FakeFamily):
    """FakeFamily whose denoiser takes nothing from the samples' sizes and crops."""

    batch_extras = Family.batch_extras  # the neutral default


def test_batches_hold_only_the_extras_a_family_asks_for(tmp_path):
    _make_images(tmp_path / "data")
    data, _ = Run(tmp_path).prepare(family=PlainFakeFamily(TrainConfig(model_family="fake")))
    batch = data.load_batch([0, 1])
    assert batch.keys() == {"prompt_embeds", "pooled_prompt_embeds", "latents", "captions", "paths"}


def test_corrupt_image_is_skipped_reported_once_and_data_still_builds(tmp_path):
    paths = _make_images(tmp_path / "data")
    data_bytes = paths[0].read_bytes()
    paths[0].write_bytes(data_bytes[:60])  # the header survives, the pixels do not
    run = Run(tmp_path)
    data, family = run.prepare()
    skipped = [payload for kind, payload in run.events if kind == "skipped"]
    assert [Path(s["path"]).name for s in skipped] == ["img_0.png"] and skipped[0]["dataset"] == "pics"
    assert [Path(p).name for p, _ in data.skipped] == ["img_0.png"]
    all_indices = {i for batch in data.sampler for i in batch}
    assert 0 not in all_indices and len(all_indices) == 4  # 5 readable, batches of 2: one dropped per epoch
    assert len(run.latent_files()) == 5
    again_events = Run(tmp_path)
    again, _ = again_events.prepare()
    assert [Path(p).name for p, _ in again.skipped] == ["img_0.png"]


def test_a_binary_caption_file_is_skipped_and_reported(tmp_path):
    paths = _make_images(tmp_path / "data")
    paths[2].with_suffix(".txt").write_bytes(b"\xff\xfe\xfa binary \x00\x01")
    run = Run(tmp_path)
    data, _ = run.prepare()
    skipped = [payload for kind, payload in run.events if kind == "skipped"]
    assert [Path(s["path"]).name for s in skipped] == ["img_2.txt"]
    assert "not UTF-8 text" in skipped[0]["reason"]
    assert len(data.plans) == len(data.captions) == 5
    assert all("picture number 2" not in captions for captions in data.captions)


def test_changed_caption_reencodes_only_that_prompt(tmp_path):
    _make_images(tmp_path / "data")
    run = Run(tmp_path)
    run.prepare()
    (tmp_path / "data" / "img_3.txt").write_text("a brand new caption")
    _, family = run.prepare()
    assert family.encoded_prompts == ["a brand new caption"] and family.encoded_images == 0


def test_touched_image_reencodes_only_its_cache_group_and_resolution_change_all(tmp_path):
    paths = _make_images(tmp_path / "data")
    run = Run(tmp_path)
    run.prepare()
    stat = paths[2].stat()
    os.utime(paths[2], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000_000))
    _, family = run.prepare()
    assert family.encoded_images == 2 and family.encoded_prompts == []  # its group of vae_batch_size
    _, family = run.prepare(dataset=run.dataset(resolution=48))
    assert family.encoded_images == 6


def test_corrupt_latent_file_is_rebuilt(tmp_path):
    _make_images(tmp_path / "data")
    run = Run(tmp_path)
    run.prepare()
    victim = sorted((tmp_path / "vae").glob("*.safetensors"))[0]
    original = load_file(str(victim))["latents"].clone()  # the file is mapped, not read
    victim.write_bytes(victim.read_bytes()[:30])
    _, family = run.prepare()
    assert family.encoded_images == 2  # rebuilt with its group
    assert torch.equal(load_file(str(victim))["latents"], original)


def test_vae_cache_disable_writes_no_latent_files_and_encodes_per_batch(tmp_path):
    _make_images(tmp_path / "data")
    run = Run(tmp_path)
    data, family = run.prepare(vae_cache_disable=True)
    assert family.encoded_images == 0 and run.latent_files() == set()
    batch = data.load_batch(next(data.sampler.iter_forever()))
    assert batch["latents"].shape == (2, 4, 4, 4) and family.encoded_images == 2
    data.load_batch([0, 1])
    assert family.encoded_images == 4 and run.latent_files() == set()


def test_vae_cache_ondemand_encodes_when_first_used_then_reads_the_cache(tmp_path):
    _make_images(tmp_path / "data")
    run = Run(tmp_path)
    data, family = run.prepare(vae_cache_ondemand=True)
    assert family.encoded_images == 0
    first = data.load_batch([0, 1])
    second = data.load_batch([0, 1])
    assert family.encoded_images == 2 and len(run.latent_files()) == 2
    assert torch.allclose(first["latents"], second["latents"], atol=0.02)


def test_unreadable_image_found_during_training_is_replaced_within_the_batch(tmp_path):
    paths = _make_images(tmp_path / "data")
    run = Run(tmp_path)
    data, _ = run.prepare(vae_cache_disable=True)
    paths[1].write_bytes(paths[1].read_bytes()[:60])
    batch = data.load_batch([0, 1])
    assert [Path(p).name for p in batch["paths"]] == ["img_0.png", "img_0.png"]
    data.load_batch([0, 1])
    assert [Path(s["path"]).name for kind, s in run.events if kind == "skipped"] == ["img_1.png"]


def test_caption_dropout_is_deterministic(tmp_path):
    _make_images(tmp_path / "data", n=8)
    run = Run(tmp_path)
    data, _ = run.prepare(caption_dropout_probability=0.5)
    captions = [data.load_batch([i, (i + 1) % 8], position=(0, i))["captions"] for i in range(8)]
    flat = [c for pair in captions for c in pair]
    assert 0 < flat.count("") < len(flat)
    assert captions == [data.load_batch([i, (i + 1) % 8], position=(0, i))["captions"] for i in range(8)]


def test_too_few_samples_raise_dataset_too_small(tmp_path):
    _make_images(tmp_path / "data", n=3)
    run = Run(tmp_path)
    with pytest.raises(DatasetTooSmall, match=r"'pics'.*give 2 usable samples.*needs 8.*6 short"):
        run.prepare(train_batch_size=2, gradient_accumulation_steps=4)
    assert run.latent_files() == set()


def test_caption_dropout_empties_captions_at_the_dataset_rate(tmp_path):
    _make_images(tmp_path / "data", n=6)
    run = Run(tmp_path)
    data, _ = run.prepare(
        dataset=run.dataset(caption_dropout_probability=0.3), caption_dropout_probability=0.9
    )
    captions = [
        c for b in range(300) for c in data.load_batch([b % 6, (b + 1) % 6], position=(0, b))["captions"]
    ]
    # 600 draws at 0.3: standard deviation 0.019
    assert captions.count("") / len(captions) == pytest.approx(0.3, abs=0.08)
    again = [
        c for b in range(300) for c in data.load_batch([b % 6, (b + 1) % 6], position=(0, b))["captions"]
    ]
    assert again == captions
    data, _ = run.prepare(caption_dropout_probability=0.0)
    assert "" not in data.load_batch([0, 1], position=(0, 0))["captions"]


def test_a_new_tokenizer_max_length_reencodes_the_prompts_and_not_the_latents(tmp_path):
    _make_images(tmp_path / "data")
    run = Run(tmp_path)
    run.prepare()
    _, family = run.prepare(tokenizer_max_length=8)
    assert {f"picture number {i}" for i in range(6)} <= set(family.encoded_prompts)
    assert family.encoded_images == 0
    _, again = run.prepare(tokenizer_max_length=8)
    assert again.encoded_prompts == []


def test_dataset_oversubscription_raises_repeats_of_a_dataset_too_small_for_one_step(tmp_path):
    _make_images(tmp_path / "data", n=3)
    run = Run(tmp_path)
    data, _ = run.prepare(
        train_batch_size=2, gradient_accumulation_steps=4, allow_dataset_oversubscription=True
    )
    # one bucket of 3 samples, 8 per optimizer step: repeats 2 gives 9 samples, 4 full batches
    assert data.sampler.batches_per_epoch == 4
    (warning,) = [payload["message"] for kind, payload in run.events if kind == "warning"]
    assert "dataset 'pics'" in warning and "sets its repeats to 2" in warning
    with pytest.raises(DatasetTooSmall):  # repeats the dataset sets itself are kept
        run.prepare(
            dataset=run.dataset(repeats=0),
            train_batch_size=2,
            gradient_accumulation_steps=4,
            allow_dataset_oversubscription=True,
        )


def test_each_process_samples_its_rows_of_the_global_batches_of_one_process(tmp_path):
    _make_images(tmp_path / "data")
    run = Run(tmp_path)
    one, _ = run.prepare(train_batch_size=2)
    rows = [run.prepare(train_batch_size=1, processes=(2, p))[0].sampler for p in (0, 1)]
    assert [a + b for a, b in zip(*(r.epoch_batches(0) for r in rows))] == one.sampler.epoch_batches(0)
    assert rows[0].batches_per_epoch == rows[1].batches_per_epoch == one.sampler.batches_per_epoch == 3


def test_too_few_samples_for_a_global_batch_stop_before_any_latent_is_cached(tmp_path):
    _make_images(tmp_path / "data", n=3)
    run = Run(tmp_path)
    with pytest.raises(DatasetTooSmall, match="full batches of 4 .* 2 process"):
        run.prepare(train_batch_size=2, processes=(2, 1))
    assert run.latent_files() == set()
    run.prepare(train_batch_size=2)  # one process fills its batches of 2


def test_a_full_disk_while_caching_latents_says_how_much_is_needed_and_leaves_no_partial_file(
    tmp_path, monkeypatch
):
    import errno

    from difftune.cache import store
    from difftune.storage import DiskFull

    _make_images(tmp_path / "data")
    run = Run(tmp_path)
    real_write, writes = store.write_tensors, []

    def full_after_two(path, tensors, metadata=None):
        if len(writes) == 2:
            path.write_bytes(b"partial")  # what a full disk leaves behind
            raise OSError(errno.ENOSPC, "No space left on device")
        writes.append(path)
        real_write(path, tensors, metadata)

    monkeypatch.setattr(store, "write_tensors", full_after_two)
    with pytest.raises(DiskFull) as error:
        run.prepare()
    message = str(error.value)
    assert "no space left on device while writing the latent cache of dataset 'pics'" in message
    assert "needs about 1 MB for the 4 entries left" in message and "cache_dir_vae" in message
    assert len(run.latent_files()) == 2  # the entries written before the disk filled up
    assert not [p for p in (tmp_path / "vae").iterdir() if ".tmp" in p.name]


class NoisyFakeFamily(FakeFamily):
    """FakeFamily whose encoding adds posterior noise from the generators it is given, like a VAE sample."""

    def encode_pixels(self, components, pixels, generator=None):
        mean = super().encode_pixels(components, pixels, generator)
        noise = [torch.randn(mean.shape[1:], generator=g) for g in generator]
        return mean + 0.1 * torch.stack(noise)


def test_posterior_noise_is_fixed_by_the_cache_entry_or_by_the_batch_when_encoding_each_time(tmp_path):
    _make_images(tmp_path / "data")
    run = Run(tmp_path)
    config = TrainConfig(model_family="fake")
    cached, _ = run.prepare(family=NoisyFakeFamily(config))
    first = cached.load_batch([0, 1], position=(0, 0))["latents"]
    assert torch.equal(first, cached.load_batch([1, 0], position=(3, 1))["latents"][[1, 0]])
    # the same entry encoded again in a fresh cache, in another group, gets the same noise
    other = Run(tmp_path / "other")
    other.dataset = lambda **kwargs: run.dataset(cache_dir_vae=str(tmp_path / "other" / "vae"), **kwargs)
    again, _ = other.prepare(family=NoisyFakeFamily(config), vae_batch_size=3)
    assert torch.equal(again.load_batch([0, 1], position=(0, 0))["latents"], first)

    each_time, _ = run.prepare(family=NoisyFakeFamily(config), vae_cache_disable=True)
    a = each_time.load_batch([0, 1], position=(0, 0))["latents"]
    assert torch.equal(a, each_time.load_batch([0, 1], position=(0, 0))["latents"])  # a resumed run's draw
    assert not torch.equal(a, each_time.load_batch([0, 1], position=(1, 0))["latents"])  # a new epoch's
