import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    from difftune.testing.sdxl import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "sdxl")


@pytest.fixture(scope="session")
def tiny_k5_image(tmp_path_factory) -> Path:
    from difftune.testing.kandinsky5 import build_tiny_kandinsky5_image

    return build_tiny_kandinsky5_image(tmp_path_factory.mktemp("models") / "k5-image", seed=0)


@pytest.fixture(scope="session")
def tiny_k5_video(tmp_path_factory) -> Path:
    from difftune.testing.kandinsky5_video import build_tiny_kandinsky5_video

    return build_tiny_kandinsky5_video(tmp_path_factory.mktemp("models") / "k5-video", seed=0)


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    from difftune.testing.images import make_image_dataset

    folder = tmp_path / "images"
    make_image_dataset(folder, n=6, seed=0)
    return folder


def write_run(
    workdir: Path, model_dir: Path, data_dir: Path, extra_backends: list[dict] | None = None, **overrides
) -> Path:
    """Write config.json + multidatabackend.json the way a user would; returns config.json.

    extra_backends are more multidatabackend.json entries (e.g. a conditioning dataset).
    """
    dataset = {
        "id": "images",
        "type": "local",
        "instance_data_dir": str(data_dir),
        "caption_strategy": "textfile",
        "resolution": 64,
        "resolution_type": "pixel_area",
        "crop": True,
        "crop_aspect": "square",
        "crop_style": "center",
        "cache_dir_vae": str(workdir / "cache" / "vae"),
        "repeats": 1,
    }
    dataset.update(overrides.pop("dataset", {}))
    backends = [
        dataset,
        {
            "id": "text",
            "type": "local",
            "dataset_type": "text_embeds",
            "default": True,
            "cache_dir": str(workdir / "cache" / "text"),
        },
    ]
    backends += extra_backends or []
    config = {
        "model_type": "lora",
        "model_family": "sdxl",
        "pretrained_model_name_or_path": str(model_dir),
        "output_dir": str(workdir / "out"),
        "data_backend_config": str(workdir / "multidatabackend.json"),
        "train_batch_size": 2,
        "learning_rate": 1e-3,
        "optimizer": "adamw",
        "max_train_steps": 4,
        "checkpointing_steps": 2,
        "validation_steps": 0,
        "validation_prompt": "a red circle",
        "validation_resolution": "64x64",
        "validation_num_inference_steps": 2,
        "mixed_precision": "no",
        "lora_rank": 4,
        "seed": 1,
        "report_to": "none",
        "gradient_checkpointing": False,
    }
    config.update(overrides)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "multidatabackend.json").write_text(json.dumps(backends))
    path = workdir / "config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture()
def video_folder(tmp_path) -> Path:
    from difftune.testing.videos import make_video_dataset

    folder = tmp_path / "videos"
    make_video_dataset(folder, n=4, frames=(9, 12), sizes=((64, 48), (48, 64)), fps_choices=(24,), seed=0)
    return folder


def video_dataset(folder: Path) -> dict:
    """The multidatabackend.json fields of a 5-frame video dataset in `folder`."""
    return {
        "instance_data_dir": str(folder),
        "dataset_type": "video",
        "video": {"num_frames": 5, "min_frames": 5, "frame_rate": 24},
    }
