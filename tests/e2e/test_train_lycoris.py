"""End to end: LoKr, LoHa and LoCon config files in the original tool's format train every family."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from difftune.config import load_config
from difftune.families import registry
from difftune.testing.runs import write_tiny_run
from difftune.training.loop import train

TARGETS = {
    "sdxl": ["Attention", "FeedForward"],
    "kandinsky5-image": ["Kandinsky5Attention", "Kandinsky5FeedForward"],
    "kandinsky5-video": ["Kandinsky5Attention", "Kandinsky5FeedForward"],
}
# The original tool's example files, each with the family's class names.
CONFIGS = {
    "lokr": {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 10},
    "loha": {"algo": "loha", "multiplier": 1.0, "linear_dim": 4, "linear_alpha": 2},
    "locon": {"algo": "locon", "multiplier": 1.0, "linear_dim": 4, "linear_alpha": 4},
}
# The weights each algorithm starts at zero (so the adapter starts as the base model): training moves them.
ZERO_STARTED = {"lokr": ".lokr_w2", "loha": ".hada_w2_a", "locon": ".lora_up.weight", "full": ".diff"}
RUN = {
    "model_type": "lora",
    "lora_type": "lycoris",
    "max_train_steps": 3,
    "checkpointing_steps": 0,
    "learning_rate": 1e-3,
    "validation_resolution": "64x64",
    "validation_num_inference_steps": 2,
}


def write_lycoris_run(tmp_path, family, algo, model, media, **overrides):
    targets = TARGETS[family]
    preset = {"target_module": targets}
    if algo == "lokr":
        preset["module_algo_map"] = {targets[0]: {"factor": 10}, targets[1]: {"factor": 4}}
    settings = CONFIGS.get(algo, {"algo": algo, "multiplier": 1.0, "linear_dim": 4, "linear_alpha": 1})
    lycoris = tmp_path / "config" / "lycoris_config.json"
    lycoris.parent.mkdir(parents=True, exist_ok=True)
    lycoris.write_text(json.dumps({**settings, "apply_preset": preset}, indent=4))
    settings = {**RUN, "model_family": family, "lycoris_config": str(lycoris), **overrides}
    if registry.spec(family).is_video:
        settings["train_batch_size"] = 1
    return write_tiny_run(tmp_path, model, media, **settings)


def assert_trained(path, algo):
    weights = load_file(str(path))
    assert weights and all(key.startswith("lycoris_") for key in weights)
    moved = [value for key, value in weights.items() if key.endswith(ZERO_STARTED[algo])]
    assert moved and any(value.abs().max() > 0 for value in moved)
    return weights


@pytest.mark.parametrize("algo", [*CONFIGS, "full"])
def test_sdxl_trains_with_each_lycoris_config(tmp_path, tiny_sdxl, image_folder, algo):
    result = train(load_config(write_lycoris_run(tmp_path, "sdxl", algo, tiny_sdxl, image_folder)))
    assert result.global_step == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert_trained(result.lora_path, algo)
    assert [p.suffix for p in result.validation_paths] == [".png"]  # validation ran with the adapter


def train_in_own_process(config) -> None:
    """`difftune train --config PATH` in a process of its own: accelerate keeps one mixed precision per
    process, and the other runs of this session use mixed_precision no."""
    done = subprocess.run(
        [sys.executable, "-m", "difftune", "train", "--config", str(config)],
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]


def test_full_weights_train_in_bf16_and_validate(tmp_path, tiny_sdxl, image_folder):
    config = write_lycoris_run(tmp_path, "sdxl", "full", tiny_sdxl, image_folder, mixed_precision="bf16")
    train_in_own_process(config)
    assert_trained(tmp_path / "out" / "pytorch_lora_weights.safetensors", "full")
    assert [p.name for p in (tmp_path / "out" / "validation" / "3").iterdir()] == ["validation-64x64.png"]


@pytest.mark.slow
@pytest.mark.parametrize("algo", list(CONFIGS))
def test_kandinsky5_image_trains_with_each_lycoris_config(tmp_path, tiny_k5_image, image_folder, algo):
    config = write_lycoris_run(tmp_path, "kandinsky5-image", algo, tiny_k5_image, image_folder)
    result = train(load_config(config))
    assert result.global_step == 3
    assert_trained(result.lora_path, algo)
    assert [p.suffix for p in result.validation_paths] == [".png"]


@pytest.mark.slow
@pytest.mark.parametrize("algo", list(CONFIGS))
def test_kandinsky5_video_trains_with_each_lycoris_config(tmp_path, tiny_k5_video, video_folder, algo):
    config = write_lycoris_run(tmp_path, "kandinsky5-video", algo, tiny_k5_video, video_folder)
    result = train(load_config(config))
    assert result.global_step == 3
    assert_trained(result.lora_path, algo)
    assert [p.suffix for p in result.validation_paths] == [".mp4"]


@pytest.mark.slow
def test_interrupted_lycoris_run_resumes_to_the_weights_of_an_uninterrupted_one(
    tmp_path, tiny_sdxl, image_folder
):
    common = dict(max_train_steps=6, checkpointing_steps=3, validation_disable=True, use_ema=True)
    whole = train(
        load_config(write_lycoris_run(tmp_path / "whole", "sdxl", "lokr", tiny_sdxl, image_folder, **common))
    )
    split = write_lycoris_run(tmp_path / "split", "sdxl", "lokr", tiny_sdxl, image_folder, **common)
    assert train(load_config(split), stop_after_steps=4).interrupted
    resumed = train(load_config(split, {"resume_from_checkpoint": "latest"}))
    for name in ("pytorch_lora_weights.safetensors", "ema/pytorch_lora_weights.safetensors"):
        a = load_file(str(whole.output_dir / name))
        b = load_file(str(resumed.output_dir / name))
        assert a.keys() == b.keys() and all(key.startswith("lycoris_") for key in a)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    final, averaged = (
        load_file(str(whole.output_dir / n))
        for n in ("pytorch_lora_weights.safetensors", "ema/pytorch_lora_weights.safetensors")
    )
    assert any(not torch.equal(final[key], averaged[key]) for key in final)


@pytest.mark.slow
def test_two_processes_train_the_lycoris_weights_of_one_process_with_the_global_batch(
    tmp_path, tiny_sdxl, image_folder
):
    from .test_multiprocess import assert_same_weights, torchrun

    # adam_epsilon far above the gradients makes each step linear in them (see test_multiprocess)
    common = dict(max_train_steps=3, validation_disable=True, optimizer="adamw", adam_epsilon=1.0)
    one = train(
        load_config(
            write_lycoris_run(
                tmp_path / "one", "sdxl", "loha", tiny_sdxl, image_folder, train_batch_size=2, **common
            )
        )
    )
    two = write_lycoris_run(
        tmp_path / "two", "sdxl", "loha", tiny_sdxl, image_folder, train_batch_size=1, **common
    )
    torchrun(two)
    assert_same_weights(
        load_file(str(one.lora_path)),
        load_file(str(tmp_path / "two" / "out" / "pytorch_lora_weights.safetensors")),
    )


@pytest.mark.slow
@pytest.mark.parametrize("family", list(TARGETS))
def test_the_wizards_lycoris_files_train_at_its_lowest_memory_tier(tmp_path, request, family):
    """The wizard's LyCORIS choice with its 12 GB settings (quantised base, group offload for Kandinsky 5)."""
    from difftune.configure import VRAM_TIERS_GB, build_files, lycoris_file

    model = request.getfixturevalue(
        {"sdxl": "tiny_sdxl"}.get(family, family.replace("kandinsky5-", "tiny_k5_"))
    )
    media = request.getfixturevalue("video_folder" if family == "kandinsky5-video" else "image_folder")
    answers = {
        "model_family": family,
        "model_flavour": None,
        "model_type": "lycoris",
        "output_dir": str(tmp_path / "out"),
        "max_train_steps": 2,
        "validation_prompt": "a red square",
        "validation_resolution": "64x64",
        "vram_tier": VRAM_TIERS_GB[0],
        "dataset_folder": str(media),
        "caption_strategy": "textfile",
        "resolution": 64,
    }
    config, (dataset, text) = build_files(answers)
    lycoris = tmp_path / "lycoris_config.json"
    lycoris.write_text(json.dumps(lycoris_file(family)))
    config |= {
        "pretrained_model_name_or_path": str(model),
        "data_backend_config": str(tmp_path / "multidatabackend.json"),
        "lycoris_config": str(lycoris),
        "validation_steps": 0,
        "checkpointing_steps": 0,
        "report_to": "none",
    }
    config.pop("model_flavour")
    dataset["cache_dir_vae"] = str(tmp_path / "cache" / "vae")
    text["cache_dir"] = str(tmp_path / "cache" / "text")
    if "video" in dataset:
        dataset["video"] = {**dataset["video"], "num_frames": 5, "min_frames": 5}
    (tmp_path / "multidatabackend.json").write_text(json.dumps([dataset, text]))
    (tmp_path / "config.json").write_text(json.dumps(config))

    train_in_own_process(tmp_path / "config.json")  # the wizard writes mixed_precision bf16
    assert_trained(tmp_path / "out" / "pytorch_lora_weights.safetensors", "lokr")


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["lokr"])
def test_fsdp2_saves_the_lycoris_file_of_one_process(tmp_path, tiny_sdxl, image_folder, algo):
    from .test_multiprocess import torchrun

    common = dict(max_train_steps=2, validation_disable=True)
    one = train(
        load_config(
            write_lycoris_run(
                tmp_path / "one", "sdxl", algo, tiny_sdxl, image_folder, train_batch_size=2, **common
            )
        )
    )
    two = write_lycoris_run(
        tmp_path / "two",
        "sdxl",
        algo,
        tiny_sdxl,
        image_folder,
        train_batch_size=1,
        fsdp_enable=True,
        **common,
    )
    torchrun(two)
    saved = load_file(str(tmp_path / "two" / "out" / "pytorch_lora_weights.safetensors"))
    reference = load_file(str(one.lora_path))
    assert saved.keys() == reference.keys()
    # Adam moves every weight by up to lr (1e-3) a step, whatever the gradient's size, so a weight whose
    # gradient is at rounding level may differ by a small share of lr between reduction orders
    for key in reference:
        torch.testing.assert_close(saved[key], reference[key], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_validation_lycoris_strength_changes_the_samples_not_the_weights(tmp_path, tiny_sdxl, image_folder):
    import numpy as np
    from PIL import Image

    runs = {
        strength: train(
            load_config(
                write_lycoris_run(
                    tmp_path / str(strength),
                    "sdxl",
                    "locon",
                    tiny_sdxl,
                    image_folder,
                    validation_lycoris_strength=strength,
                    learning_rate=1e-2,
                )
            )
        )
        for strength in (0.0, 1.0)
    }
    weights = [load_file(str(run.lora_path)) for run in runs.values()]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    off, on = (np.asarray(Image.open(run.validation_paths[0]), dtype=np.int16) for run in runs.values())
    assert np.abs(off - on).max() > 8


def test_targets_of_another_family_stop_the_run_before_the_caches_are_filled(
    tmp_path, tiny_sdxl, image_folder
):
    from difftune.config import ConfigError

    config = write_lycoris_run(tmp_path, "sdxl", "loha", tiny_sdxl, image_folder)
    lycoris = tmp_path / "config" / "lycoris_config.json"
    settings = json.loads(lycoris.read_text())
    settings["apply_preset"]["target_module"] = TARGETS["kandinsky5-image"]
    lycoris.write_text(json.dumps(settings))
    with pytest.raises(ConfigError) as error:
        train(load_config(config))
    assert str(lycoris) in str(error.value) and "Attention" in str(error.value)
    assert not (tmp_path / "cache").exists() or not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))
