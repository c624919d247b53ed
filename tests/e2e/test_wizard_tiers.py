"""Every memory tier the wizard writes trains, for every family, through `difftune train`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from difftune import cli
from difftune.configure import VRAM_TIERS_GB, build_files
from difftune.families import registry

FAMILIES = ("sdxl", "kandinsky5-image", "kandinsky5-video")  # each with its default flavour


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    from difftune.testing.images import make_image_dataset
    from difftune.testing.videos import make_video_dataset

    root = tmp_path_factory.mktemp("data")
    make_image_dataset(root / "images", n=2, seed=0)
    make_video_dataset(root / "videos", n=2, frames=(9, 9), sizes=((64, 48),), fps_choices=(24,), seed=0)
    return {"image": root / "images", "video": root / "videos"}


def _wizard_run(workdir: Path, family: str, tier: int, model: Path, data: Path) -> Path:
    """The wizard's files for `family` at `tier`, shrunk to a one-step run of the tiny model."""
    answers = {
        "model_family": family,
        "model_flavour": registry.spec(family).default_flavour,
        "model_type": "lora",
        "output_dir": str(workdir / "out"),
        "max_train_steps": 1,
        "validation_prompt": "a red square",
        "validation_resolution": "64x64",
        "vram_tier": tier,
        "dataset_folder": str(data),
        "caption_strategy": "textfile",
        "resolution": 64,
    }
    config, backends = build_files(answers)
    # only the run's size changes: the memory settings stay as the wizard wrote them
    config |= {
        "pretrained_model_name_or_path": str(model),
        "data_backend_config": str(workdir / "multidatabackend.json"),
        "lora_rank": 4,
        "validation_steps": 0,
        "checkpointing_steps": 0,
        "report_to": "none",
    }
    dataset, text = backends
    dataset["cache_dir_vae"] = str(workdir / "cache" / "vae")
    text["cache_dir"] = str(workdir / "cache" / "text")
    if "video" in dataset:
        dataset["video"] = {**dataset["video"], "num_frames": 5, "min_frames": 5}
    (workdir / "multidatabackend.json").write_text(json.dumps(backends))
    path = workdir / "config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("tier", VRAM_TIERS_GB)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_wizard_tier_trains_to_a_saved_adapter(tmp_path, tiny_model, datasets, family, tier):
    data = datasets["video" if family == "kandinsky5-video" else "image"]
    config = _wizard_run(tmp_path, family, tier, tiny_model(family), data)

    assert cli.main(["train", "--config", str(config)]) == 0

    weights = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    assert any("lora_B" in key and value.abs().sum() > 0 for key, value in weights.items())
