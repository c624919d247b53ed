"""End to end: a damaged latest checkpoint and a full disk, through the training command."""

import errno

import pytest
import torch
from safetensors.torch import load_file

from difftune.cli import main
from difftune.config import load_config
from difftune.events import read_events
from difftune.testing.runs import write_tiny_run
from difftune.training import state_files
from difftune.training.loop import train


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_resumes_from_the_one_before_with_the_same_weights(
    tmp_path, tiny_sdxl, image_folder
):
    common = dict(max_train_steps=6, checkpointing_steps=2, learning_rate=2e-3)
    whole = train(load_config(write_tiny_run(tmp_path / "whole", tiny_sdxl, image_folder, **common)))

    split_config = write_tiny_run(tmp_path / "split", tiny_sdxl, image_folder, **common)
    train(load_config(split_config), stop_after_steps=4)
    damaged = tmp_path / "split" / "out" / "checkpoint-4" / "trainable.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-4:] = b"\x00\x00\xc0\x7f"  # the last weight becomes NaN, the file keeps its size
    damaged.write_bytes(bytes(data))
    resumed = train(load_config(split_config, {"resume_from_checkpoint": "latest"}))

    events = tmp_path / "split" / "out" / "events.jsonl"
    warnings = [e["message"] for e in read_events(events, "warning")]
    assert any("checkpoint-4" in m and "sha256" in m for m in warnings)
    logs = [e["message"] for e in read_events(events, "log") if "resumed from" in e["message"]]
    assert logs and "checkpoint-2" in logs[-1]
    a, b = load_file(str(whole.lora_path)), load_file(str(resumed.lora_path))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def _disk_full(path, tensors, metadata=None):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_stops_training_with_a_message_or_skips_the_checkpoint_when_asked(
    tmp_path, tiny_sdxl, image_folder, monkeypatch, capsys
):
    monkeypatch.setattr(state_files, "write_tensors", _disk_full)
    stopping = write_tiny_run(
        tmp_path / "stop", tiny_sdxl, image_folder, max_train_steps=2, checkpointing_steps=1
    )
    assert main(["train", "--config", str(stopping)]) == 2
    err = capsys.readouterr().err
    assert (
        "no space left on device while writing checkpoint 1" in err and "skip_checkpoint_on_disk_full" in err
    )
    assert "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "stop" / "out").iterdir() if "checkpoint" in p.name) == []

    going_on = write_tiny_run(
        tmp_path / "skip",
        tiny_sdxl,
        image_folder,
        max_train_steps=2,
        checkpointing_steps=1,
        skip_checkpoint_on_disk_full=True,
    )
    assert main(["train", "--config", str(going_on)]) == 0
    out = tmp_path / "skip" / "out"
    warnings = [e["message"] for e in read_events(out / "events.jsonl", "warning")]
    assert sum("training goes on without this checkpoint" in m for m in warnings) == 2
    assert (out / "pytorch_lora_weights.safetensors").exists()
    assert not [p for p in out.iterdir() if "checkpoint" in p.name]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "kandinsky5-image"])
def test_a_run_killed_while_caching_latents_ends_with_the_weights_of_an_uninterrupted_one(
    tmp_path, family, image_folder, monkeypatch, request
):
    from difftune.cache.latents import LatentCache

    model = request.getfixturevalue({"sdxl": "tiny_sdxl", "kandinsky5-image": "tiny_k5_image"}[family])
    common = dict(
        model_family=family,
        max_train_steps=3,
        checkpointing_steps=0,
        vae_batch_size=2,
        learning_rate=2e-3,
        validation_disable=True,
    )
    whole = train(load_config(write_tiny_run(tmp_path / "whole", model, image_folder, **common)))

    split_config = write_tiny_run(tmp_path / "split", model, image_folder, **common)
    real_write, written = LatentCache.write, []

    def killed_after_three_entries(self, plans, latents, progress=None):
        if len(written) == 3:  # in the middle of the second group of two
            raise KeyboardInterrupt
        written.append(plans[0])
        real_write(self, plans, latents, progress)

    monkeypatch.setattr(LatentCache, "write", killed_after_three_entries)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(split_config))
    monkeypatch.setattr(LatentCache, "write", real_write)
    assert len(list((tmp_path / "split" / "cache" / "vae").glob("*.safetensors"))) == 3
    resumed = train(load_config(split_config, {"resume_from_checkpoint": "latest"}))

    a, b = load_file(str(whole.lora_path)), load_file(str(resumed.lora_path))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_resuming_with_only_damaged_checkpoints_ends_in_one_message(
    tmp_path, tiny_sdxl, image_folder, capsys
):
    config = write_tiny_run(tmp_path, tiny_sdxl, image_folder, max_train_steps=1, checkpointing_steps=1)
    assert main(["train", "--config", str(config)]) == 0
    (tmp_path / "out" / "checkpoint-1" / "optimizer.json").write_text("garbage")
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--resume_from_checkpoint", "latest"]) == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint to resume from" in err and "checkpoint-1: optimizer.json is 7 bytes" in err
    assert "Traceback" not in err
    loads = [e for e in read_events(tmp_path / "out" / "events.jsonl", "log") if "loading" in e["message"]]
    assert len(loads) == 1  # the first run's: the resume stopped before loading the model
