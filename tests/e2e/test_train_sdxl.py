"""End to end: difftune trains the tiny SDXL through the same path as a real run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from difftune.cli import main
from difftune.config import load_config
from difftune.events import read_events
from difftune.testing.runs import write_tiny_run
from difftune.training.loop import train


def test_lora_run_writes_lora_validation_plot_and_checkpoints(tmp_path, tiny_sdxl, image_folder):
    config = write_tiny_run(
        tmp_path,
        tiny_sdxl,
        image_folder,
        max_train_steps=6,
        validation_steps=3,
        checkpointing_steps=3,
        checkpoints_total_limit=1,
        learning_rate=5e-3,
    )
    result = train(load_config(config))
    out = tmp_path / "out"
    assert result.global_step == 6
    weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert weights and all(k.startswith("unet.") for k in weights)
    assert any("lora_A" in k for k in weights) and any("lora_B" in k for k in weights)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]
    assert (out / "validation" / "3").is_dir() and (out / "validation" / "6").is_dir()
    assert all(p.suffix == ".png" and p.exists() for p in result.validation_paths)
    assert result.loss_plot and result.loss_plot.exists()
    resolved = json.loads((out / "config.resolved.json").read_text())
    assert resolved["train"]["lora_rank"] == 4 if "train" in resolved else resolved["lora_rank"] == 4
    progress = read_events(out / "events.jsonl", "progress")
    assert [e["step"] for e in progress] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "lr", "it_per_s", "eta_s"} <= set(e) for e in progress)
    assert sum(result.losses[-3:]) < sum(result.losses[:3])


def test_full_training_saves_a_unet_that_diffusers_loads(tmp_path, tiny_sdxl, image_folder):
    from diffusers import UNet2DConditionModel

    config = write_tiny_run(
        tmp_path, tiny_sdxl, image_folder, model_type="full", max_train_steps=2, learning_rate=1e-4
    )
    result = train(load_config(config))
    trained = UNet2DConditionModel.from_pretrained(result.model_path)
    original = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    changed = [
        n
        for (n, a), (_, b) in zip(trained.named_parameters(), original.named_parameters())
        if not torch.equal(a, b)
    ]
    assert len(changed) > 10


@pytest.mark.slow
def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, tiny_sdxl, image_folder):
    common = dict(max_train_steps=6, checkpointing_steps=3, gradient_accumulation_steps=2, learning_rate=2e-3)
    whole = train(load_config(write_tiny_run(tmp_path / "whole", tiny_sdxl, image_folder, **common)))

    split_config = write_tiny_run(tmp_path / "split", tiny_sdxl, image_folder, **common)
    first = train(load_config(split_config), stop_after_steps=4)
    assert first.interrupted and first.global_step == 4
    resumed = train(load_config(split_config, {"resume_from_checkpoint": "latest"}))
    assert resumed.global_step == 6
    a = load_file(str(whole.lora_path))
    b = load_file(str(resumed.lora_path))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert whole.losses[3:] == pytest.approx(resumed.losses, abs=1e-6)


def test_a_corrupt_image_is_skipped_and_reported_once(tmp_path, tiny_sdxl, image_folder):
    (image_folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (image_folder / "broken.txt").write_text("a broken picture")
    result = train(load_config(write_tiny_run(tmp_path, tiny_sdxl, image_folder, max_train_steps=2)))
    assert result.global_step == 2
    skipped = read_events(tmp_path / "out" / "events.jsonl", "skipped")
    assert sum("broken.png" in json.dumps(e) for e in skipped) == 1


def test_cli_train_reads_config_folder_and_reports_errors(
    tmp_path, tiny_sdxl, image_folder, monkeypatch, capsys
):
    write_tiny_run(tmp_path, tiny_sdxl, image_folder, max_train_steps=1, checkpointing_steps=0)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--learning_rate", "1e-4"]) == 0
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()

    assert main(["train", "--learning_rat", "1e-4"]) == 2
    assert "learning_rate" in capsys.readouterr().err

    assert main(["train", "--train_batch_size", "32"]) == 2
    err = capsys.readouterr().err
    assert "32" in err and "train_batch_size" in err


def test_a_failing_run_reports_the_error_as_an_event(tmp_path, tiny_sdxl, image_folder):
    from difftune.data.errors import DatasetTooSmall

    config = write_tiny_run(tmp_path, tiny_sdxl, image_folder, train_batch_size=64)
    with pytest.raises(DatasetTooSmall):
        train(load_config(config))
    errors = read_events(tmp_path / "out" / "events.jsonl", "error")
    assert len(errors) == 1 and "DatasetTooSmall" in errors[0]["message"] and "64" in errors[0]["message"]


def test_missing_folder_and_missing_model_give_clear_errors(tmp_path, tiny_sdxl, image_folder, capsys):
    config = write_tiny_run(tmp_path, tiny_sdxl, tmp_path / "nowhere")
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "dataset 'images'" in err and "nowhere" in err and "is not a folder" in err

    config = write_tiny_run(tmp_path, tmp_path / "no-model", image_folder)
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "could not load the sdxl model" in err and "no-model" in err and "diffusers layout" in err
