"""crop_style random draws a new crop window each epoch (vae_cache_clear_each_epoch); face is refused."""

from pathlib import Path

import pytest
import torch

from difftune.config.schema import DatasetConfig, TrainConfig
from difftune.data.pipeline import prepare_training_data
from tests.data.fakes import FakeFamily, fake_components


def _gradients(folder: Path, n=4) -> None:
    """Wide images whose colour changes along x, so every crop window holds other pixels."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = Image.new("RGB", (128, 32))
        image.putdata([(x * 2, (x * 7 + i * 40) % 256, 255 - x * 2) for _y in range(32) for x in range(128)])
        image.save(folder / f"g{i}.png")


def _prepare(tmp_path: Path, **dataset):
    _gradients(tmp_path / "data")
    settings = dict(
        id="wide",
        instance_data_dir=str(tmp_path / "data"),
        resolution=32,
        resolution_type="pixel",
        crop=True,
        crop_aspect="square",
        crop_style="random",
        cache_dir_vae=str(tmp_path / "vae"),
    )
    config = TrainConfig(model_family="fake", train_batch_size=2, seed=2)
    data = prepare_training_data(
        config,
        [DatasetConfig(**{**settings, **dataset})],
        tmp_path / "text",
        FakeFamily(config),
        fake_components(),
        "cpu",
        lambda kind, payload: None,
    )
    return data


def _epoch(data, epoch: int):
    batch = data.load_batch([0, 1, 2, 3], position=(epoch, 0))
    return batch["latents"], batch["crop_coords"]


def test_a_random_crop_differs_between_epochs_and_repeats_in_a_resumed_run(tmp_path):
    data = _prepare(tmp_path)
    latents_0, crops_0 = _epoch(data, 0)
    latents_1, crops_1 = _epoch(data, 1)
    assert not torch.equal(crops_0, crops_1)  # SDXL's crop_coords follow the window
    moved = (crops_0 != crops_1).any(dim=1)
    assert not torch.allclose(latents_0[moved], latents_1[moved])
    # the same epoch gives the same windows and latents again (a resumed run)
    again_1, again_crops_1 = _epoch(_prepare(tmp_path), 1)
    assert torch.equal(again_crops_1, crops_1) and torch.equal(again_1, latents_1)
    torch.testing.assert_close(_epoch(data, 0)[0], latents_0)


def test_the_cache_keeps_the_crops_of_the_last_two_epochs(tmp_path):
    data = _prepare(tmp_path)
    for epoch in range(5):
        _epoch(data, epoch)
    assert len(list((tmp_path / "vae").glob("*.safetensors"))) <= 2 * 4


def test_vae_cache_clear_each_epoch_false_keeps_the_first_crop(tmp_path):
    data = _prepare(tmp_path, vae_cache_clear_each_epoch=False)
    latents_0, crops_0 = _epoch(data, 0)
    latents_3, crops_3 = _epoch(data, 3)
    assert torch.equal(crops_0, crops_3) and torch.equal(latents_0, latents_3)


def test_face_crops_are_refused_with_what_to_use():
    with pytest.raises(ValueError, match="crop_style face .* is not built; use random, center or corner"):
        DatasetConfig(id="faces", instance_data_dir="x", crop=True, crop_style="face")


def test_new_crops_each_epoch_need_the_vae_encoder_that_crepa_can_drop(tmp_path, monkeypatch):
    from difftune.config import ConfigError, load_config
    from tests.config.helpers import IMAGES, TEXT, write_config

    monkeypatch.chdir(tmp_path)
    config = {"model_family": "kandinsky5-video", "crepa_enabled": True, "crepa_drop_vae_encoder": True}
    cropped = {**IMAGES, "crop": True, "crop_style": "random"}
    with pytest.raises(ConfigError, match="crepa_drop_vae_encoder removes it"):
        load_config(write_config(tmp_path, config, [cropped, TEXT]))
    fixed = {**cropped, "vae_cache_clear_each_epoch": False}
    assert load_config(write_config(tmp_path, config, [fixed, TEXT])).datasets[0].crop
