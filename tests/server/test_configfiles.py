"""Saving config files from the web UI: validated first, written atomically, only what loads back."""

import errno
import json
import os

import pytest

from difftune.server import configfiles
from difftune.server.configfiles import save_config_file
from difftune.server.forms import validate_datasets


def files_in(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("number", ["1e400", "-1e400", "NaN", "Infinity", "-Infinity"])
def test_dataset_list_with_a_non_finite_number_refused_and_kept(make_client, workdir, number):
    path = workdir / "config" / "multidatabackend.json"
    before, names = path.read_text(), files_in(path.parent)
    body = f'[{{"id": "cats", "instance_data_dir": "datasets/cats", "resolution": {number}}}]'
    response = make_client().put("/api/datasets", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    error = response.json()["detail"][0]
    assert error["key"] == "0.resolution" and "finite number" in error["message"]
    assert path.read_text() == before and files_in(path.parent) == names


def test_config_with_an_overflowing_number_refused_and_kept(make_client, workdir):
    path = workdir / "config" / "config.json"
    before = path.read_text()
    body = '{"model_family": "sdxl", "learning_rate": 1e400}'
    response = make_client().put("/api/config", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["key"] == "learning_rate"
    assert path.read_text() == before


def test_deeply_nested_body_is_a_clear_400(make_client, workdir):
    body = "[" * 100_000 + "]" * 100_000
    response = make_client().put("/api/datasets", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "nested too deeply" in response.json()["detail"]


def test_hand_written_infinity_in_a_file_named_on_read(make_client, workdir):
    (workdir / "config" / "multidatabackend.json").write_text('[{"id": "a", "resolution": Infinity}]')
    response = make_client().get("/api/datasets")
    assert response.status_code == 422
    assert "config/multidatabackend.json: '0.resolution' is inf" in response.json()["detail"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(make_client, workdir, monkeypatch):
    path = workdir / "config" / "multidatabackend.json"
    before, names = path.read_text(), files_in(path.parent)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(configfiles.os, "fsync", disk_full)
    good = [{"id": "cats", "instance_data_dir": "datasets/cats", "resolution": 512}]
    response = make_client().put("/api/datasets", json=good)
    assert response.status_code == 507
    assert "could not write multidatabackend.json (No space left on device)" in response.json()["detail"]
    assert path.read_text() == before and files_in(path.parent) == names


def test_saved_file_keeps_its_permissions_and_loads_back(make_client, workdir):
    path = workdir / "config" / "multidatabackend.json"
    path.chmod(0o640)
    good = [{"id": "cats", "instance_data_dir": "datasets/cats", "resolution": 512}]
    assert make_client().put("/api/datasets", json=good).status_code == 200
    assert path.stat().st_mode & 0o777 == 0o640
    assert validate_datasets(json.loads(path.read_text())) == (
        [{"id": "cats", "instance_data_dir": "datasets/cats", "resolution": 512.0}],
        [],
    )


def test_what_would_not_load_back_unchanged_is_not_written(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{}\n")

    def drifting(data):  # a validator that gives back something else than it was given
        return {**data, "extra": 1}, []

    errors = save_config_file(path, {"a": 1}, drifting)
    assert errors and "would not load back as given" in errors[0]["message"]
    assert path.read_text() == "{}\n"
    assert save_config_file(path, {"a": 1}, lambda data: (data, [])) == []
    assert json.loads(path.read_text()) == {"a": 1}
