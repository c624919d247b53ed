import os
from pathlib import Path

import pytest
import torch

from difftune.config.schema import DatasetConfig, TrainConfig
from difftune.data.errors import DataError
from difftune.data.pipeline import prepare_training_data
from difftune.testing.videos import make_video
from tests.data.fakes import FakeFamily, fake_components, save_image
from tests.data.video_fakes import FakeVideoFamily


def _videos(folder: Path, specs) -> list[Path]:
    """specs: (name, frames, (width, height), fps); each video gets a caption file."""
    paths = []
    for index, (name, frames, size, fps) in enumerate(specs):
        path = make_video(folder / name, frames=frames, size=size, fps=fps, seed=index)
        path.with_suffix(".txt").write_text(f"clip {Path(name).stem}")
        paths.append(path)
    return paths


class VideoRun:
    """prepare_training_data with a fake video family, recording the events."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.events: list[tuple[str, dict]] = []

    def dataset(self, video=None, **kwargs) -> DatasetConfig:
        settings = {
            "id": "clips",
            "dataset_type": "video",
            "instance_data_dir": str(self.tmp_path / "videos"),
            "caption_strategy": "textfile",
            "resolution": 32,
            "resolution_type": "pixel",
            "cache_dir_vae": str(self.tmp_path / "vae"),
            "video": {"num_frames": 5, **(video or {})},
        }
        return DatasetConfig(**{**settings, **kwargs})

    def prepare(self, family=None, datasets=None, **train):
        config = TrainConfig(
            model_family="fake", **{"train_batch_size": 2, "seed": 1, "vae_batch_size": 2, **train}
        )
        family = family or FakeVideoFamily(config)
        self.events.clear()
        data = prepare_training_data(
            config,
            datasets or [self.dataset()],
            self.tmp_path / "text",
            family,
            fake_components(),
            "cpu",
            lambda kind, payload: self.events.append((kind, payload)),
        )
        return data, family

    def skipped(self) -> list[str]:
        return [Path(p["path"]).name for kind, p in self.events if kind == "skipped"]


def test_short_videos_are_dropped_once_and_batches_hold_clip_latents(tmp_path):
    _videos(
        tmp_path / "videos",
        [
            ("a.mp4", 9, (64, 48), 24),
            ("b.webm", 7, (48, 64), 24),
            ("c.mkv", 6, (64, 48), 24),
            ("short.mov", 3, (64, 48), 24),
        ],
    )
    run = VideoRun(tmp_path)
    data, family = run.prepare(datasets=[run.dataset(video={"num_frames": 5, "min_frames": 5})])
    assert run.skipped() == ["short.mov"]
    reason = next(p["reason"] for kind, p in run.events if kind == "skipped")
    assert "3 frames" in reason and "min_frames=5" in reason
    assert data.num_samples == 3 and family.frame_counts == [5, 5]  # 3 clips of 5 frames, batches of 2 + 1
    # aspect_ratio: spatial buckets from the image planner (32 px short edge), one frame count
    assert sorted({data.bucket_keys[i] for i in range(3)}) == [
        (32, 32)
    ]  # 64x48 and 48x64 at a 32 px short edge: 42 px floors to 32
    batch = data.load_batch(next(data.sampler.iter_forever()))
    assert batch["latents"].shape == (2, 4, 2, 4, 4) and "conditioning_latents" not in batch
    assert all(c.startswith("clip ") for c in batch["captions"])


def test_preserved_aspect_buckets_and_resolution_frames_keys(tmp_path):
    _videos(
        tmp_path / "videos",
        [
            ("wide_1.mp4", 9, (64, 32), 24),
            ("wide_2.mp4", 10, (64, 32), 24),
            ("tall_1.mp4", 13, (32, 64), 24),
            ("tall_2.mp4", 14, (32, 64), 24),
            ("tall_3.mp4", 6, (32, 64), 24),
        ],
    )
    run = VideoRun(tmp_path)
    dataset = run.dataset(
        crop=False, video={"num_frames": 5, "min_frames": 5, "bucket_strategy": "resolution_frames"}
    )
    data, _ = run.prepare(datasets=[dataset], train_batch_size=1)
    keys = {Path(p.path).name: data.bucket_keys[i] for i, p in enumerate(data.plans)}
    assert keys == {
        "wide_1.mp4": "64x32@9",
        "wide_2.mp4": "64x32@9",
        "tall_1.mp4": "32x64@13",
        "tall_2.mp4": "32x64@13",
        "tall_3.mp4": "32x64@5",
    }
    for indices in data.sampler.epoch_batches(0):
        batch = data.load_batch(indices)
        plan = data.plans[indices[0]]
        expected_frames = (plan.num_frames - 1) // 4 + 1
        assert batch["latents"].shape == (1, 4, expected_frames, plan.bucket[1] // 8, plan.bucket[0] // 8)


def test_max_frames_drops_long_videos(tmp_path):
    _videos(tmp_path / "videos", [("ok.mp4", 9, (32, 32), 24), ("long.mp4", 30, (32, 32), 24)])
    run = VideoRun(tmp_path)
    data, _ = run.prepare(
        datasets=[run.dataset(video={"num_frames": 5, "max_frames": 20})], train_batch_size=1
    )
    assert [Path(p.path).name for p in data.plans] == ["ok.mp4"] and run.skipped() == ["long.mp4"]


def test_latents_are_reused_and_frame_rate_or_changed_files_reencode(tmp_path):
    paths = _videos(tmp_path / "videos", [(f"v{i}.mp4", 17, (32, 32), 24) for i in range(2)])
    run = VideoRun(tmp_path)
    _, family = run.prepare()
    assert family.encoded_images == 2
    _, family = run.prepare()
    assert family.encoded_images == 0

    # a new frame rate resamples the clips: every latent is encoded again
    _, family = run.prepare(datasets=[run.dataset(video={"num_frames": 5, "frame_rate": 12})])
    assert family.encoded_images == 2
    # so is a new clip length
    _, family = run.prepare(datasets=[run.dataset(video={"num_frames": 9})])
    assert family.encoded_images == 2
    # and a changed file, with the other clips of its cache group (vae_batch_size 2: both)
    make_video(paths[0], frames=17, size=(32, 32), fps=24, seed=7)
    os.utime(paths[0], ns=(1, 1))
    _, family = run.prepare()
    assert family.encoded_images == 2


def test_discovery_reprobes_only_changed_videos(tmp_path, monkeypatch):
    import difftune.data.video as video

    paths = _videos(tmp_path / "videos", [(f"v{i}.mp4", 9, (32, 32), 24) for i in range(3)])
    run = VideoRun(tmp_path)
    probed: list[str] = []
    real_probe = video.probe_video

    def counting_probe(path):
        probed.append(Path(path).name)
        return real_probe(path)

    monkeypatch.setattr(video, "probe_video", counting_probe)
    run.prepare()
    assert sorted(probed) == ["v0.mp4", "v1.mp4", "v2.mp4"]
    probed.clear()
    run.prepare()
    assert probed == []
    os.utime(paths[1], ns=(5, 5))
    run.prepare()
    assert probed == ["v1.mp4"]


def test_image_datasets_train_as_one_frame_clips_for_video_families(tmp_path):
    for i in range(2):
        save_image(tmp_path / "images" / f"img_{i}.png", (48, 32), (250, 0, 0)).with_suffix(
            ".txt"
        ).write_text("red")
    run = VideoRun(tmp_path)
    dataset = DatasetConfig(
        id="stills",
        instance_data_dir=str(tmp_path / "images"),
        caption_strategy="textfile",
        resolution=32,
        resolution_type="pixel",
        cache_dir_vae=str(tmp_path / "vae"),
    )
    data, family = run.prepare(datasets=[dataset])
    assert family.frame_counts == [1]
    batch = data.load_batch(next(data.sampler.iter_forever()))
    assert batch["latents"].shape == (2, 4, 1, 4, 6)  # 48x32 keeps its aspect
    assert torch.allclose(batch["latents"][0, 0], torch.full((1, 4, 6), 250 / 127.5 - 1), atol=0.02)


def test_video_dataset_with_an_image_family_is_a_clear_error(tmp_path):
    _videos(tmp_path / "videos", [("a.mp4", 5, (32, 32), 24)])
    run = VideoRun(tmp_path)
    config = TrainConfig(model_family="fake", train_batch_size=1)
    with pytest.raises(DataError, match="'clips' is a video dataset.*trains on images"):
        run.prepare(family=FakeFamily(config), train_batch_size=1)


def test_invalid_num_frames_names_the_dataset(tmp_path):
    _videos(tmp_path / "videos", [("a.mp4", 9, (32, 32), 24)])
    run = VideoRun(tmp_path)
    with pytest.raises(DataError, match="dataset 'clips'.*num_frames=6.*5 or 9"):
        run.prepare(datasets=[run.dataset(video={"num_frames": 6})], train_batch_size=1)


def test_i2v_delivers_the_first_frame_encoded_alone_and_caches_it(tmp_path):
    _videos(tmp_path / "videos", [(f"v{i}.mp4", 9, (32, 32), 24) for i in range(2)])
    run = VideoRun(tmp_path)
    config = TrainConfig(model_family="fake", train_batch_size=2)
    data, family = run.prepare(family=FakeVideoFamily(config, i2v=True))
    assert family.first_frames_encoded == 2
    batch = data.load_batch(next(data.sampler.iter_forever()))
    assert batch["conditioning_latents"].shape == (2, 4, 1, 4, 4)
    # the first frame of the clip is the first latent frame of the fake VAE
    torch.testing.assert_close(batch["conditioning_latents"], batch["latents"][:, :, :1], atol=1e-2, rtol=0)
    again, family = run.prepare(family=FakeVideoFamily(config, i2v=True))
    assert family.first_frames_encoded == 0 and family.encoded_images == 0
    assert again.load_batch([0, 1])["conditioning_latents"].shape == (2, 4, 1, 4, 4)
    # video.is_i2v false turns it off for a dataset
    off, _ = run.prepare(
        family=FakeVideoFamily(config, i2v=True),
        datasets=[run.dataset(video={"num_frames": 5, "is_i2v": False})],
    )
    assert "conditioning_latents" not in off.load_batch([0, 1])


def test_an_undecodable_video_is_skipped_once(tmp_path):
    _videos(tmp_path / "videos", [(f"v{i}.mp4", 9, (32, 32), 24) for i in range(3)])
    broken = tmp_path / "videos" / "v0.mp4"
    broken.write_bytes(broken.read_bytes()[: len(broken.read_bytes()) // 3])
    run = VideoRun(tmp_path)
    data, _ = run.prepare(train_batch_size=1)
    assert run.skipped().count("v0.mp4") == 1
    assert all(Path(data.plans[i].path).name != "v0.mp4" for batch in data.sampler for i in batch)
