import json
import sys
from pathlib import Path

import pytest
from PIL import Image

FAKE_TRAINER = Path(__file__).with_name("fake_trainer.py")


def fake_train_command(config_path: Path, resume: bool) -> list[str]:
    """The train command the tests inject: the fake trainer, with the same arguments as the real one."""
    return [sys.executable, str(FAKE_TRAINER), str(config_path)] + (
        ["--resume_from_checkpoint", "latest"] if resume else []
    )


@pytest.fixture()
def train_command():
    return fake_train_command


@pytest.fixture()
def workdir(tmp_path) -> Path:
    """A working folder with a small image dataset, config/config.json and config/multidatabackend.json."""
    data = tmp_path / "datasets" / "cats"
    (data / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 48), (10, 120, 200)).save(data / "cat1.png")
    (data / "cat1.txt").write_text("a blue cat")
    Image.new("RGB", (40, 40), (0, 200, 0)).save(data / "sub" / "cat2.jpg")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.json").write_text(
        json.dumps({"model_family": "sdxl", "model_type": "lora", "output_dir": "out", "max_train_steps": 3})
    )
    (tmp_path / "config" / "multidatabackend.json").write_text(
        json.dumps(
            [
                {
                    "id": "cats",
                    "type": "local",
                    "instance_data_dir": "datasets/cats",
                    "caption_strategy": "textfile",
                },
                {
                    "id": "text-embeds",
                    "type": "local",
                    "dataset_type": "text_embeds",
                    "default": True,
                    "cache_dir": "cache/text",
                },
            ]
        )
    )
    return tmp_path


@pytest.fixture()
def make_client(workdir):
    """make_client(token=None, **create_app kwargs) -> TestClient talking to 127.0.0.1."""
    from fastapi.testclient import TestClient

    from difftune.server.app import create_app

    clients = []

    def make(token=None, **kwargs):
        kwargs.setdefault("train_command", fake_train_command)
        kwargs.setdefault("poll_seconds", 0.05)
        app = create_app(workdir, token, **kwargs)
        client = TestClient(app, base_url="http://127.0.0.1:8001")
        clients.append(app)
        return client

    yield make
    for app in clients:
        app.state.runner.stop(grace_seconds=2)
