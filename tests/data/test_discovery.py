import os

import PIL.Image
import PIL.ImageFile
import pytest

from difftune.config.schema import DatasetConfig
from difftune.data.discovery import discover, metadata_path, read_image_size
from tests.data.fakes import save_image


def _dataset(folder, **kwargs) -> DatasetConfig:
    return DatasetConfig(id="photos", instance_data_dir=str(folder), **kwargs)


@pytest.fixture
def counted_opens(monkeypatch):
    """Counts PIL.Image.open calls and fails the test if any image is decoded."""
    opened = []
    real_open = PIL.Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(str(fp))
        return real_open(fp, *args, **kwargs)

    def no_decode(self, *args, **kwargs):
        raise AssertionError("discovery decoded pixels; it must read headers only")

    monkeypatch.setattr(PIL.Image, "open", counting_open)
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", no_decode)
    return opened


def test_lists_images_recursively_with_sizes_from_headers(tmp_path, counted_opens):
    data = tmp_path / "data"
    save_image(data / "a.png", (40, 30))
    save_image(data / "sub" / "b.JPG", (20, 50))
    save_image(data / "sub" / "deeper" / "c.webp", (33, 17))
    (data / "a.txt").write_text("caption")
    (data / "notes.md").write_text("x")
    found = discover(_dataset(data), tmp_path / "meta")
    assert [(s.relative_path, s.size) for s in found.samples] == [
        ("a.png", (40, 30)),
        ("sub/b.JPG", (20, 50)),
        ("sub/deeper/c.webp", (33, 17)),
    ]
    assert found.skipped == []
    assert found.headers_read == 3 and len(counted_opens) == 3
    assert metadata_path(_dataset(data), tmp_path / "meta").is_file()


def test_exif_orientation_swaps_the_size(tmp_path):
    path = save_image(tmp_path / "data" / "rotated.jpg", (60, 20), exif_orientation=6)
    assert read_image_size(path) == (20, 60)
    found = discover(_dataset(tmp_path / "data"), tmp_path / "meta")
    assert found.samples[0].size == (20, 60)


def test_rediscovery_reads_only_changed_and_new_files_and_drops_deleted(tmp_path, counted_opens):
    data = tmp_path / "data"
    for name in ("a", "b", "c"):
        save_image(data / f"{name}.png", (32, 32))
    meta = tmp_path / "meta"
    discover(_dataset(data), meta)
    counted_opens.clear()

    again = discover(_dataset(data), meta)
    assert again.headers_read == 0 and counted_opens == []
    assert len(again.samples) == 3

    save_image(data / "b.png", (48, 16))  # same name, new content and size
    stat = (data / "b.png").stat()
    os.utime(data / "b.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    save_image(data / "d.png", (16, 16))
    (data / "c.png").unlink()
    third = discover(_dataset(data), meta)
    assert sorted(os.path.basename(p) for p in counted_opens) == ["b.png", "d.png"]
    assert {s.relative_path: s.size for s in third.samples} == {
        "a.png": (32, 32),
        "b.png": (48, 16),
        "d.png": (16, 16),
    }


def test_corrupt_header_is_skipped_with_reason_and_not_reread(tmp_path, counted_opens):
    data = tmp_path / "data"
    save_image(data / "good.png", (32, 32))
    (data / "broken.jpg").write_bytes(b"not an image at all")
    found = discover(_dataset(data), tmp_path / "meta")
    assert [s.relative_path for s in found.samples] == ["good.png"]
    assert len(found.skipped) == 1
    path, reason = found.skipped[0]
    assert path == data / "broken.jpg" and "unreadable image header" in reason
    counted_opens.clear()
    again = discover(_dataset(data), tmp_path / "meta")
    assert counted_opens == [] and again.skipped == found.skipped


def test_skip_file_discovery_metadata_reuses_the_cached_list(tmp_path):
    data = tmp_path / "data"
    save_image(data / "a.png", (32, 32))
    discover(_dataset(data), tmp_path / "meta")
    save_image(data / "new.png", (32, 32))
    cached = discover(_dataset(data, skip_file_discovery="metadata vae"), tmp_path / "meta")
    assert [s.relative_path for s in cached.samples] == ["a.png"]
    fresh = discover(_dataset(data), tmp_path / "meta")
    assert [s.relative_path for s in fresh.samples] == ["a.png", "new.png"]


def test_missing_folder_names_the_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset 'photos'.*instance_data_dir"):
        discover(_dataset(tmp_path / "nope"), tmp_path / "meta")
