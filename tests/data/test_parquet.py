"""caption_strategy parquet: captions from a parquet table, with the original tool's column keys."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from difftune.config import load_config
from difftune.config.schema import DatasetConfig
from difftune.data.captions import load_captions
from difftune.data.discovery import discover
from difftune.data.errors import DataError
from tests.config.helpers import TEXT, write_config
from tests.data.fakes import save_image


def _folder(tmp_path):
    folder = tmp_path / "photos"
    for name in ("1001.png", "1002.jpg", "1003.png"):
        save_image(folder / name, (32, 32))
    table = pa.table(
        {
            "id": [1001, 1002, 1003],
            "cogvlm_caption": ["a red square", "", None],
            "tags": ["red", "square, red", None],
        }
    )
    pq.write_table(table, folder / "photos.parquet")
    return folder


def _captions(folder, **parquet):
    dataset = DatasetConfig(
        id="photos",
        instance_data_dir=str(folder),
        caption_strategy="parquet",
        parquet={"path": "photos.parquet", **parquet},
    )
    found = discover(dataset, folder.parent / "vae")
    captions = load_captions(dataset, found.samples, folder)
    return {s.path.name: c for s, c in zip(found.samples, captions.per_sample)}, captions


def test_captions_come_from_the_named_columns_with_the_fallback(tmp_path):
    folder = _folder(tmp_path)
    by_name, captions = _captions(folder, caption_column="cogvlm_caption", fallback_caption_column="tags")
    assert by_name["1001.png"] == ["a red square"]
    assert by_name["1002.jpg"] == ["square, red"]  # empty caption: the fallback column
    assert by_name["1003.png"] == ["1003"]  # no caption at all: the file name, reported
    assert [p.name for p in captions.fallbacks] == ["1003.png"]


def test_a_missing_column_names_the_file_and_the_key_to_set(tmp_path):
    folder = _folder(tmp_path)
    with pytest.raises(DataError, match="has no column 'caption' .* set parquet.caption_column"):
        _captions(folder)


def test_top_level_column_keys_are_the_defaults_of_parquet_blocks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = _folder(tmp_path)
    dataset = {"id": "photos", "instance_data_dir": str(folder), "caption_strategy": "parquet"}
    dataset["parquet"] = {"path": "photos.parquet", "caption_column": "tags"}
    config = {
        "model_family": "sdxl",
        "parquet_caption_column": "cogvlm_caption",
        "parquet_filename_column": "id",
    }
    loaded = load_config(write_config(tmp_path, config, [dataset, TEXT]))
    block = loaded.datasets[0].parquet
    assert (block.filename_column, block.caption_column) == ("id", "tags")  # the block's own wins
    json_rows = folder / "rows.jsonl"
    json_rows.write_text(json.dumps({"id": "1001.png", "caption": "from json lines"}) + "\n")
    by_name, _ = _captions(folder, path="rows.jsonl", identifier_includes_extension=True)
    assert by_name["1001.png"] == ["from json lines"]
