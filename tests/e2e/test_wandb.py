"""report_to wandb logs the run through wandb (offline mode: no network; wandb is in the test extra)."""

from difftune.config import load_config
from difftune.testing.runs import write_tiny_run
from difftune.training.loop import train


def test_report_to_wandb_writes_an_offline_run(tmp_path, tiny_sdxl, image_folder, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = write_tiny_run(
        tmp_path,
        tiny_sdxl,
        image_folder,
        max_train_steps=2,
        checkpointing_steps=0,
        report_to="wandb",
        tracker_project_name="difftune-test",
    )
    train(load_config(config))
    runs = list((tmp_path / "out" / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")) and list(runs[0].glob("*.wandb"))[0].stat().st_size > 0
