"""type huggingface datasets: the rows of a `datasets` dataset, written once into a local folder.

`dataset_name` is a Hub dataset id (loaded with `datasets.load_dataset`, `split`, `revision`) or a
folder written by `save_to_disk`. Each row becomes `<row number, 8 digits>.<ext>` (the image's, or for
a video dataset the `video_column` clip's, own bytes, not re-encoded) and a `.txt` beside it with its captions, one per line: `caption_column` (a
name, a list of names, or "a.b" for a nested value; default "caption", else "text"), or
`fallback_caption_column` where those are empty. A file is rewritten only when its content changed,
so the latent and text caches stay valid; files of rows that are gone are removed. The folder is
`instance_data_dir` when set, else cache/huggingface/<id>; from there on the dataset is a local
textfile dataset (captions, buckets, conditioning and caches as for any other).
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difftune.data.errors import DataError

if TYPE_CHECKING:
    from difftune.config.schema import DatasetConfig

Events = Callable[[str, dict[str, Any]], None]
_ROW_FILE = re.compile(r"^\d{8}\.[A-Za-z0-9]+$")
_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tiff"}


def export_folder(dataset: DatasetConfig) -> Path:
    """Where a huggingface dataset's rows are written."""
    return Path(dataset.instance_data_dir or Path("cache/huggingface") / dataset.id).expanduser()


def as_local(dataset: DatasetConfig, events: Events) -> DatasetConfig:
    """Write the dataset's rows into its export folder; the same dataset as a local textfile dataset there."""
    rows = _load(dataset)
    video = dataset.dataset_type == "video"
    block = dataset.huggingface
    if video:
        image_column = (block and block.video_column) or dataset.video_column
    else:
        image_column = (block and block.image_column) or dataset.image_column
    caption_columns = _caption_columns(dataset, rows.column_names)
    fallback = (dataset.huggingface and dataset.huggingface.fallback_caption_column) or (
        dataset.fallback_caption_column
    )
    if image_column not in rows.column_names:
        raise DataError(
            f"dataset '{dataset.id}': {dataset.dataset_name} has no column '{image_column}' (columns: "
            f"{', '.join(rows.column_names)}); set {'video' if video else 'image'}_column to the column of "
            f"{'videos' if video else 'images'}"
        )
    from datasets import Image, Video

    rows = rows.cast_column(image_column, Video(decode=False) if video else Image(decode=False))
    folder = export_folder(dataset)
    folder.mkdir(parents=True, exist_ok=True)
    written: set[str] = set()
    changed = 0
    for number, row in enumerate(rows):
        data = _file_bytes(row[image_column], dataset, number)
        stem = f"{number:08d}"
        name = stem + (_video_extension(row[image_column]) if video else _extension(row[image_column], data))
        captions = [c for column in caption_columns for c in _texts(_nested(row, column))]
        if not captions and fallback:
            captions = _texts(_nested(row, fallback))
        changed += _write_if_changed(folder / name, data)
        written.add(name)
        if captions:
            changed += _write_if_changed(folder / f"{stem}.txt", "\n".join(captions).encode())
            written.add(f"{stem}.txt")
    for stale in folder.iterdir():
        if _ROW_FILE.match(stale.name) and stale.name not in written:
            stale.unlink()
    events(
        "log",
        {
            "message": f"dataset '{dataset.id}': {len(rows)} rows of {dataset.dataset_name} in {folder} ({changed} files written)"
        },
    )
    strategy = "textfile" if dataset.caption_strategy == "huggingface" else dataset.caption_strategy
    return dataset.model_copy(
        update={"type": "local", "instance_data_dir": str(folder), "caption_strategy": strategy}
    )


def _load(dataset: DatasetConfig):
    """The split as a datasets.Dataset; DataError naming dataset_name and the fix when it cannot be had."""
    import datasets

    name = str(dataset.dataset_name)
    source = Path(name).expanduser()
    saved = source.is_dir() and any(
        (source / marker).is_file() for marker in ("dataset_dict.json", "state.json", "dataset_info.json")
    )
    try:
        if saved:
            loaded = datasets.load_from_disk(str(source))
        else:
            loaded = datasets.load_dataset(name, split=dataset.split, revision=dataset.revision)
    except Exception as error:  # datasets raises many kinds (FileNotFoundError, ConnectionError, ...)
        raise DataError(
            f"dataset '{dataset.id}': dataset_name '{name}' could not be loaded ({type(error).__name__}: "
            f"{error}); give a Hub dataset id that this machine can download, or a folder written by "
            "datasets' save_to_disk (where the Hub is reachable: load_dataset(...).save_to_disk(DIR))"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if dataset.split not in loaded:
            raise DataError(
                f"dataset '{dataset.id}': {name} has no split '{dataset.split}' (splits: "
                f"{', '.join(loaded)}); set split to one of them"
            )
        loaded = loaded[dataset.split]
    return loaded


def _caption_columns(dataset: DatasetConfig, columns: list[str]) -> list[str]:
    given = (dataset.huggingface and dataset.huggingface.caption_column) or dataset.caption_column
    if given is None:
        return [next((c for c in ("caption", "text") if c in columns), "caption")]
    return [given] if isinstance(given, str) else list(given)


def _nested(row: dict[str, Any], column: str) -> Any:
    """row["a.b"], else row["a"]["b"] (the original tool's nested column names)."""
    if column in row:
        return row[column]
    value: Any = row
    for part in column.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _texts(value: Any) -> list[str]:
    values = value if isinstance(value, (list, tuple)) else [value]
    return [str(v).strip() for v in values if v is not None and str(v).strip()]


def _file_bytes(value: Any, dataset: DatasetConfig, number: int) -> bytes:
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path") and Path(value["path"]).is_file():
            return Path(value["path"]).read_bytes()
    raise DataError(
        f"dataset '{dataset.id}': row {number} of {dataset.dataset_name} has nothing in its image (video) "
        "column; remove the row or fix the column"
    )


def _extension(value: dict[str, Any], data: bytes) -> str:
    """The image's own extension: from its path, else from its format."""
    suffix = Path(str(value.get("path") or "")).suffix.lower()
    if suffix in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"):
        return suffix
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return _FORMATS.get(image.format or "", ".png")
    except OSError:
        return ".png"  # unreadable: discovery reports it as a skipped file


def _video_extension(value: dict[str, Any]) -> str:
    """The video's own extension from its path, else .mp4 (PyAV reads the container from the bytes)."""
    from difftune.data.discovery import VIDEO_EXTENSIONS

    suffix = Path(str(value.get("path") or "")).suffix.lower()
    return suffix if suffix in VIDEO_EXTENSIONS else ".mp4"


def _write_if_changed(path: Path, data: bytes) -> int:
    """Write data unless the file holds it already (its mtime, part of the cache keys, then stays); 1 if written."""
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return 0
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)
    return 1
