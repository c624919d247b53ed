from pathlib import Path

import pytest
import torch

from difftune.cache.text import CacheMiss, TextEmbedCache


def _embed(value: float) -> dict[str, torch.Tensor]:
    return {"prompt_embeds": torch.full((3, 4), value), "pooled": torch.arange(4.0) + value}


def test_roundtrip_and_missing(tmp_path):
    cache = TextEmbedCache(tmp_path, "model-a", write_batch_size=2)
    assert cache.missing(["x", "y", "x", ""]) == ["x", "y", ""]
    progress = []
    cache.write(
        ["x", "y", ""], [_embed(1), _embed(2), _embed(0)], progress=lambda done, total: progress.append(done)
    )
    assert progress == [2, 3]
    assert cache.missing(["x", "y", "", "z"]) == ["z"]
    loaded = cache.load("y")
    assert torch.equal(loaded["prompt_embeds"], torch.full((3, 4), 2.0)) and torch.equal(
        loaded["pooled"], torch.arange(4.0) + 2
    )
    assert len(list(tmp_path.glob("*.safetensors"))) == 3 and not list(tmp_path.glob(".*tmp*"))


def test_another_identity_does_not_see_the_entries(tmp_path):
    TextEmbedCache(tmp_path, "model-a").write(["x"], [_embed(1)])
    other = TextEmbedCache(tmp_path, "model-b")
    assert other.missing(["x"]) == ["x"]
    with pytest.raises(CacheMiss):
        other.load("x")


def test_truncated_file_is_deleted_and_reported_missing(tmp_path):
    cache = TextEmbedCache(tmp_path, "model-a")
    cache.write(["x", "y"], [_embed(1), _embed(2)])
    path = cache.path_for("x")
    path.write_bytes(path.read_bytes()[:-5])
    assert cache.missing(["x", "y"]) == ["x"] and not path.exists()

    cache.write(["x"], [_embed(1)])
    cache.path_for("y").write_bytes(b"\x00" * 3)
    with pytest.raises(CacheMiss):
        cache.load("y")
    assert not cache.path_for("y").exists() and torch.equal(cache.load("x")["pooled"], torch.arange(4.0) + 1)


def test_entry_whose_metadata_names_another_prompt_is_rejected(tmp_path):
    cache = TextEmbedCache(tmp_path, "model-a")
    cache.write(["x", "y"], [_embed(1), _embed(2)])
    cache.path_for("y").write_bytes(cache.path_for("x").read_bytes())  # right name, wrong content
    assert cache.missing(["y"]) == ["y"] and not cache.path_for("y").exists()


def test_a_full_disk_names_the_entry_and_the_setting_and_leaves_no_partial_file(tmp_path, monkeypatch):
    import errno

    from difftune.storage import DiskFull

    def full(tensors, filename, metadata=None):  # safetensors' writer and its error text
        Path(filename).write_bytes(b"part")
        raise RuntimeError('IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(DiskFull) as error:
        TextEmbedCache(tmp_path, "model-a").write(["x"], [_embed(1)])
    assert error.value.errno == errno.ENOSPC
    assert "no space left on device while writing the cache entry" in str(error.value)
    assert "cache_dir of the text_embeds dataset" in str(error.value)
    assert list(tmp_path.iterdir()) == []
