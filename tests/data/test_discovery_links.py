"""Symbolic links and odd names in a dataset folder: each real file once, nothing outside the folder."""

import os

import pytest

from difftune.config.schema import DatasetConfig
from difftune.data.discovery import discover
from tests.data.fakes import save_image
from tests.timeout import run_within


def _discover_within(seconds, dataset, metadata_dir):
    return run_within(seconds, discover, dataset, metadata_dir)


def _dataset(folder, **kwargs) -> DatasetConfig:
    return DatasetConfig(id="photos", instance_data_dir=str(folder), **kwargs)


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "data"
    save_image(folder / "a.png", (32, 32))
    save_image(folder / "sub" / "b.png", (32, 48))
    return folder


def _reasons(found):
    return {path.name: reason for path, reason in found.skipped}


def test_a_link_to_the_dataset_folder_itself_adds_nothing(tmp_path, data):
    (data / "self").symlink_to(".")
    (data / "sub" / "up").symlink_to("..")
    found = _discover_within(10, _dataset(data), tmp_path / "meta")
    assert [s.relative_path for s in found.samples] == ["a.png", "sub/b.png"]
    assert "already in the dataset" in _reasons(found)["self"]
    assert "already in the dataset" in _reasons(found)["up"]


def test_a_loop_of_two_links_finishes_and_is_reported(tmp_path, data):
    (data / "one").symlink_to("two")
    (data / "two").symlink_to("one")
    (data / "sub" / "x").mkdir()
    (data / "sub" / "x" / "to_y").symlink_to("../y")
    (data / "sub" / "y").mkdir()
    (data / "sub" / "y" / "to_x").symlink_to("../x")
    save_image(data / "sub" / "y" / "c.png", (32, 32))
    found = _discover_within(10, _dataset(data), tmp_path / "meta")
    assert [s.relative_path for s in found.samples] == ["a.png", "sub/b.png", "sub/y/c.png"]
    reasons = _reasons(found)
    assert "broken symbolic link" in reasons["one"] and "broken symbolic link" in reasons["two"]
    assert "already in the dataset as 'sub/y'" in reasons["to_y"]


def test_a_link_to_the_filesystem_root_is_left_out_at_once(tmp_path, data):
    (data / "everything").symlink_to("/")
    found = _discover_within(5, _dataset(data), tmp_path / "meta")
    assert [s.relative_path for s in found.samples] == ["a.png", "sub/b.png"]
    reason = _reasons(found)["everything"]
    assert "outside the dataset folder" in reason and "follow_symlinks_outside_root" in reason


def test_links_outside_the_folder_are_followed_when_the_dataset_asks(tmp_path, data):
    save_image(tmp_path / "elsewhere" / "d.png", (32, 32))
    save_image(tmp_path / "lone.png", (16, 16))
    (data / "more").symlink_to(tmp_path / "elsewhere")
    (data / "lone.png").symlink_to(tmp_path / "lone.png")
    kept_in = _discover_within(10, _dataset(data), tmp_path / "meta")
    assert [s.relative_path for s in kept_in.samples] == ["a.png", "sub/b.png"]
    assert set(_reasons(kept_in)) == {"more", "lone.png"}
    followed = _discover_within(10, _dataset(data, follow_symlinks_outside_root=True), tmp_path / "meta2")
    assert [s.relative_path for s in followed.samples] == ["a.png", "lone.png", "more/d.png", "sub/b.png"]
    assert followed.skipped == []


def test_a_link_to_a_file_already_listed_is_left_out(tmp_path, data):
    (data / "copy.png").symlink_to("sub/b.png")
    (data / "sub" / "folder_link").symlink_to(".")
    found = _discover_within(10, _dataset(data), tmp_path / "meta")
    assert [s.relative_path for s in found.samples] == ["a.png", "sub/b.png"]
    assert "already in the dataset as 'sub/b.png'" in _reasons(found)["copy.png"]


def test_a_link_inside_the_folder_to_a_folder_not_walked_otherwise_is_followed(tmp_path, data):
    save_image(data / ".hidden" / "h.png", (32, 32))
    (data / "shown").symlink_to(".hidden")
    found = _discover_within(10, _dataset(data), tmp_path / "meta")
    assert [s.relative_path for s in found.samples] == ["a.png", "shown/h.png", "sub/b.png"]


def test_a_file_name_that_is_not_utf8_is_skipped_and_reported(tmp_path, data):
    name = os.fsdecode(b"caf\xe9.png")
    save_image(data / name, (32, 32))
    found = _discover_within(10, _dataset(data), tmp_path / "meta")
    assert [s.relative_path for s in found.samples] == ["a.png", "sub/b.png"]
    [(path, reason)] = found.skipped
    assert str(path).endswith("caf\\xe9.png") and "not valid UTF-8" in reason
    str(path).encode("utf-8")  # reported paths can be written to events.jsonl


def test_a_pipe_named_like_an_image_is_not_opened(tmp_path, data):
    os.mkfifo(data / "stuck.png")
    found = _discover_within(10, _dataset(data), tmp_path / "meta")
    assert [s.relative_path for s in found.samples] == ["a.png", "sub/b.png"]
