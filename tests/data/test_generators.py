"""Conditioning generators: a dataset's `conditioning: {type: canny}` makes, caches and links edge maps."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difftune.config.schema import DatasetConfig, TrainConfig
from difftune.data.pipeline import prepare_training_data
from tests.data.fakes import FakeFamily, fake_components


def _squares(folder: Path, n=2) -> None:
    """Grey 64x64 images with a white square; a .txt caption each."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = Image.new("RGB", (64, 64), (60, 60, 60))
        image.paste((250, 250, 250), (16 + i, 16, 48, 48))
        image.save(folder / f"sq{i}.png")
        (folder / f"sq{i}.txt").write_text(f"a white square {i}")


def _prepare(tmp_path: Path, **conditioning):
    dataset = DatasetConfig(
        id="shapes",
        instance_data_dir=str(tmp_path / "shapes"),
        caption_strategy="textfile",
        resolution=64,
        resolution_type="pixel",
        cache_dir_vae=str(tmp_path / "vae" / "shapes"),
        conditioning={
            "type": "canny",
            "params": {"low_threshold": 50, "high_threshold": 150},
            **conditioning,
        },
    )
    config = TrainConfig(model_family="fake", train_batch_size=2, seed=1)
    events: list = []
    data = prepare_training_data(
        config,
        [dataset],
        tmp_path / "text",
        FakeFamily(config),
        fake_components(),
        "cpu",
        lambda kind, payload: events.append((kind, payload)),
    )
    return data, events


def test_canny_edge_maps_are_made_cached_and_paired(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _squares(tmp_path / "shapes")
    data, _ = _prepare(tmp_path)
    folder = tmp_path / "cache" / "conditioning" / "shapes_conditioning_canny"
    edges = np.asarray(Image.open(folder / "sq0.png").convert("L"))
    # white on the square's border, black in the flat inside and outside
    assert (edges[14:19, 24:40] == 255).any(axis=0).all()  # along the whole top edge
    assert edges[28:36, 28:36].max() == 0 and edges[0:8, 0:8].max() == 0
    paired = {Path(data.plans[i].path).name: Path(p.path).name for i, p in data.conditioning_plans.items()}
    assert paired == {"sq0.png": "sq0.png", "sq1.png": "sq1.png"}
    batch = data.load_batch([0, 1])
    assert batch["conditioning_latents"].shape == batch["latents"].shape
    assert sorted(batch["captions"]) == ["a white square 0", "a white square 1"]

    # a second run makes nothing again; a changed image or threshold makes its maps again
    mtime = (folder / "sq0.png").stat().st_mtime_ns
    _, events = _prepare(tmp_path)
    assert (folder / "sq0.png").stat().st_mtime_ns == mtime
    assert any("0 edge map(s) made" in p.get("message", "") for kind, p in events if kind == "log")
    os.utime(tmp_path / "shapes" / "sq1.png", ns=(10, 10))
    _, events = _prepare(tmp_path)
    assert any("1 edge map(s) made" in p.get("message", "") for kind, p in events if kind == "log")
    _, events = _prepare(tmp_path, params={"low_threshold": 20, "high_threshold": 90})
    assert any("2 edge map(s) made" in p.get("message", "") for kind, p in events if kind == "log")


def test_captions_of_the_block_replace_those_of_the_paired_samples(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _squares(tmp_path / "shapes")
    data, _ = _prepare(tmp_path, captions=["follow the edges"])
    assert data.captions == [["follow the edges"], ["follow the edges"]]


def test_generators_difftune_does_not_have_are_refused_with_what_to_do():
    with pytest.raises(
        ValueError, match="conditioning type 'superresolution' is not built .* conditioning_data"
    ):
        DatasetConfig(
            id="x", instance_data_dir="x", conditioning={"type": "superresolution", "blur_radius": 2}
        )


def test_the_original_tools_canny_example_entry_loads(tmp_path, monkeypatch):
    from difftune.config import ConfigError, load_config
    from tests.config.helpers import TEXT, write_config

    monkeypatch.chdir(tmp_path)
    entry = {
        "id": "domokun",
        "type": "huggingface",
        "dataset_name": "RareConcepts/Domokun",
        "metadata_backend": "huggingface",
        "caption_strategy": "instanceprompt",
        "instance_prompt": "a domokun",
        "conditioning": {
            "type": "canny",
            "conditioning_type": "reference_strict",
            "params": {"low_threshold": 100, "high_threshold": 200},
            "captions": ["a domokun, matching the reference edge structure"],
        },
    }
    loaded = load_config(write_config(tmp_path, {"model_family": "sdxl"}, [entry, TEXT]))
    assert loaded.datasets[0].conditioning[0].thresholds() == (100.0, 200.0)
    entry["conditioning"] = {"type": "jpeg_artifacts", "quality_range": [10, 30]}
    with pytest.raises(ConfigError, match="conditioning type 'jpeg_artifacts' is not built"):
        load_config(write_config(tmp_path, {"model_family": "sdxl"}, [entry, TEXT]))
