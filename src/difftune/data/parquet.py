"""caption_strategy parquet: captions from a table of file identifiers and captions, read with pyarrow.

The table is the dataset's `parquet` block `path` (a .parquet or .jsonl file), else its
metadata_file, else metadata.parquet in the dataset folder. Rows map the `filename_column` (default
"id") to the `caption_column` (default "caption"; a list value gives several captions), with
`fallback_caption_column` where the caption is empty.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difftune.data.errors import DataError

if TYPE_CHECKING:
    from difftune.config.schema import DatasetConfig

DEFAULT_FILENAME_COLUMN = "id"
DEFAULT_CAPTION_COLUMN = "caption"


def read_parquet_captions(dataset: DatasetConfig, root: Path) -> dict[str, list[str]]:
    """{identifier: captions}, identifiers as the table holds them (with or without an extension)."""
    block = dataset.parquet
    name_column = (block and block.filename_column) or DEFAULT_FILENAME_COLUMN
    caption_column = (block and block.caption_column) or DEFAULT_CAPTION_COLUMN
    fallback_column = block.fallback_caption_column if block else None
    path = _table_file(dataset, root)
    rows = _rows(path, dataset.id)
    if rows and name_column not in rows[0]:
        raise DataError(
            f"dataset '{dataset.id}': {path} has no column '{name_column}' (columns: {', '.join(sorted(rows[0]))}); "
            "set parquet.filename_column (or parquet_filename_column) to the column of file names"
        )
    if rows and caption_column not in rows[0]:
        raise DataError(
            f"dataset '{dataset.id}': {path} has no column '{caption_column}' (columns: "
            f"{', '.join(sorted(rows[0]))}); set parquet.caption_column (or parquet_caption_column)"
        )
    table: dict[str, list[str]] = {}
    for row in rows:
        identifier = row.get(name_column)
        if identifier is None:
            continue
        captions = _captions(row.get(caption_column)) or _captions(
            row.get(fallback_column) if fallback_column else None
        )
        if not captions:
            continue
        # with or without its extension: captions.load_captions looks both up
        table[Path(str(identifier)).as_posix().removeprefix("./")] = captions
    return table


def _captions(value: Any) -> list[str]:
    values = value if isinstance(value, (list, tuple)) else [value]
    return [str(v).strip() for v in values if v is not None and str(v).strip()]


def _table_file(dataset: DatasetConfig, root: Path) -> Path:
    given = (dataset.parquet.path if dataset.parquet else None) or dataset.metadata_file
    if given is None:
        default = root / "metadata.parquet"
        if default.is_file():
            return default
        raise DataError(
            f"dataset '{dataset.id}': caption_strategy parquet needs a table; set parquet.path (a .parquet "
            f"or .jsonl file) or put metadata.parquet in {root}"
        )
    candidate = Path(given).expanduser()
    for path in (candidate, root / candidate):
        if path.is_file():
            return path
    raise DataError(
        f"dataset '{dataset.id}': parquet table {given} not found (looked in the working folder and in {root}); "
        "fix parquet.path"
    )


def _rows(path: Path, dataset_id: str) -> list[dict[str, Any]]:
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as error:
                    raise DataError(
                        f"{path} line {number} is not valid JSON ({error}); fix or remove it"
                    ) from None
        return rows
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise DataError(
            f"dataset '{dataset_id}': {path} is not a readable parquet file ({type(error).__name__}: {error}); "
            "fix or replace it"
        ) from None
