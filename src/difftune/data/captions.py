"""Captions of a dataset's samples, by the dataset's caption_strategy.

Strategies: textfile (a sibling .txt; each non-empty line is one caption), filename (the file's stem,
underscores to spaces, trailing counters such as "-1", "_3" or "(2)" removed), instanceprompt,
jsonl / csv (metadata_file with a file_name column and a caption or text column). A sample may have
several captions; `pick_caption` chooses one per epoch, the same one for the same (seed, epoch, path).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difftune.data.errors import DataError

if TYPE_CHECKING:
    from difftune.config.schema import CaptionShuffle, DatasetConfig
    from difftune.data.discovery import SampleInfo

_TRAILING_COUNTER = re.compile(r"(?:\s*\(\d+\)|[-_]\d+)$")
_CAPTION_COLUMNS = ("caption", "text")


@dataclass
class Captions:
    """Captions per sample (aligned with the samples given), and the samples that fell back to the filename."""

    per_sample: list[list[str] | None]  # None: the sample's caption file is unreadable (see `unreadable`)
    fallbacks: list[Path] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # (caption file, reason)

    def fallback_message(self, dataset_id: str, strategy: str) -> str | None:
        """One line for the event bus when some samples had no caption of their own, else None."""
        if not self.fallbacks:
            return None
        examples = ", ".join(p.name for p in self.fallbacks[:3])
        more = f" and {len(self.fallbacks) - 3} more" if len(self.fallbacks) > 3 else ""
        source = ".txt file" if strategy == "textfile" else "row in the metadata file"
        return (
            f"dataset '{dataset_id}': {len(self.fallbacks)} of {len(self.per_sample)} file(s) have no "
            f"{source} ({examples}{more}); their file names are used as their captions"
        )


def caption_from_filename(path: str | Path) -> str:
    """'a_red_ball-2.jpg' -> 'a red ball': the stem, trailing counters removed, underscores as spaces."""
    stem = Path(path).stem.strip()
    previous = None
    while previous != stem:
        previous = stem
        stripped = _TRAILING_COUNTER.sub("", stem).strip()
        stem = stripped or stem  # a name that is only a counter stays as it is
    return re.sub(r"\s+", " ", stem.replace("_", " ")).strip()


class UnreadableCaption(ValueError):
    """A caption file that is not text: undecodable bytes or control characters such as NUL."""


_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")


def read_textfile(path: Path) -> list[str] | None:
    """The non-empty lines of the .txt beside path, or None when there is none (or it holds no text).

    UTF-8, or UTF-16 with a byte-order mark; anything else raises UnreadableCaption, so that a binary
    file is never trained on as a caption.
    """
    caption_file = path.with_suffix(".txt")
    if not caption_file.is_file():
        return None
    raw = caption_file.read_bytes()
    encoding = next((name for bom, name in _BOMS if raw.startswith(bom)), "utf-8")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as error:
        raise UnreadableCaption(
            f"caption file {caption_file.name} is not UTF-8 text (undecodable byte at offset {error.start}); "
            "save it as UTF-8 or remove it"
        ) from None
    control = _CONTROL.search(text)
    if control:
        raise UnreadableCaption(
            f"caption file {caption_file.name} holds binary data (control character "
            f"{control.group()!r} at character {control.start()}); save it as plain text or remove it"
        )
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    return lines or None


def load_captions(
    dataset: DatasetConfig, samples: Sequence[SampleInfo], root: Path, seed: int = 0
) -> Captions:
    """Captions of each sample as the dataset's caption_strategy says.

    only_instance_prompt replaces them with instance_prompt; caption_shuffle adds shuffled variants
    (from its own seed, else `seed`); prepend_instance_prompt then puts instance_prompt in front.
    """
    strategy = "instanceprompt" if dataset.only_instance_prompt else dataset.caption_strategy
    result = Captions(per_sample=[])
    table = _read_metadata_table(dataset, root) if strategy in ("jsonl", "csv", "parquet") else {}
    shuffle = dataset.caption_shuffle if dataset.caption_shuffle and dataset.caption_shuffle.enable else None
    for sample in samples:
        if strategy == "instanceprompt":
            captions = [dataset.instance_prompt or ""]
        elif strategy == "filename":
            captions = [caption_from_filename(sample.path)]
        else:
            try:
                found = read_textfile(sample.path) if strategy == "textfile" else _lookup(table, sample)
            except UnreadableCaption as error:
                result.unreadable.append((sample.path.with_suffix(".txt"), str(error)))
                result.per_sample.append(None)
                continue
            if found is None:
                result.fallbacks.append(sample.path)
                found = [caption_from_filename(sample.path)]
            captions = found
        if shuffle is not None and strategy != "instanceprompt":
            shuffle_seed = shuffle.seed if shuffle.seed is not None else seed
            captions = [
                v for c in captions for v in shuffled_variants(c, shuffle, shuffle_seed, sample.relative_path)
            ]
        if dataset.prepend_instance_prompt and dataset.instance_prompt and strategy != "instanceprompt":
            captions = [f"{dataset.instance_prompt} {caption}".strip() for caption in captions]
        result.per_sample.append(captions)
    return result


_SEPARATORS = {"comma": (",", ", "), "space": (" ", " "), "period": (".", ". ")}


def shuffled_variants(caption: str, shuffle: CaptionShuffle, seed: int, relative_path: str) -> list[str]:
    """The caption (with include_original) and `count` variants with the tags after `position_start` shuffled.

    Each variant's order comes from a hash of (seed, path, caption, variant number): the same on every
    run and every process.
    """
    split, join = _SEPARATORS[shuffle.split_on]
    tags = [tag.strip() for tag in caption.split(split) if tag.strip()]
    kept, rest = tags[: shuffle.position_start], tags[shuffle.position_start :]
    variants = [caption] if shuffle.include_original else []
    for number in range(shuffle.count):
        digest = hashlib.sha256(f"{seed}:{relative_path}:{caption}:{number}".encode()).digest()
        order = random.Random(int.from_bytes(digest[:8], "big")).sample(rest, len(rest))
        variants.append(join.join(kept + order))
    return variants


def pick_caption(captions: Sequence[str], seed: int, epoch: int, relative_path: str) -> str:
    """One of a sample's captions, chosen by (seed, epoch, path): stable across runs and resumes."""
    if len(captions) == 1:
        return captions[0]
    digest = hashlib.sha256(f"{seed}:{epoch}:{relative_path}".encode()).digest()
    return captions[int.from_bytes(digest[:8], "big") % len(captions)]


def _lookup(table: dict[str, list[str]], sample: SampleInfo) -> list[str] | None:
    """By relative path or file name; then without the extension (parquet identifiers without one)."""
    relative = Path(sample.relative_path)
    for key in (sample.relative_path, sample.path.name, relative.with_suffix("").as_posix(), relative.stem):
        if key in table:
            return table[key]
    return None


def _metadata_file(dataset: DatasetConfig, root: Path) -> Path:
    if dataset.metadata_file:
        given = Path(dataset.metadata_file).expanduser()
        for candidate in (given, root / given):
            if candidate.is_file():
                return candidate
        raise DataError(
            f"dataset '{dataset.id}': metadata_file {given} not found (looked in the working folder and in "
            f"{root}); fix the path or use caption_strategy textfile"
        )
    default = (
        root / f"metadata.{'jsonl' if dataset.caption_strategy == 'jsonl' else dataset.caption_strategy}"
    )
    if default.is_file():
        return default
    raise DataError(
        f"dataset '{dataset.id}': caption_strategy {dataset.caption_strategy} needs metadata_file "
        f"(a file with file_name and caption columns); none given and {default} does not exist"
    )


def _read_metadata_table(dataset: DatasetConfig, root: Path) -> dict[str, list[str]]:
    """{file_name: captions} from a jsonl or csv file; file_name relative to the dataset folder or bare."""
    if dataset.caption_strategy == "parquet":
        from difftune.data.parquet import read_parquet_captions

        return read_parquet_captions(dataset, root)
    path = _metadata_file(dataset, root)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(
            f"dataset '{dataset.id}': metadata_file {path} is not UTF-8 text (undecodable byte at offset "
            f"{error.start}); save it as UTF-8 {dataset.caption_strategy}"
        ) from None
    rows: list[dict[str, Any]] = []
    if dataset.caption_strategy == "jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as error:
                raise DataError(
                    f"{path} line {number} is not valid JSON ({error}); fix or remove that line"
                ) from error
    else:
        try:
            rows = list(csv.DictReader(io.StringIO(text, newline="")))
        except csv.Error as error:
            raise DataError(f"{path} is not a readable CSV file ({error}); fix it or use jsonl") from None
    table: dict[str, list[str]] = {}
    for number, row in enumerate(rows, start=1):
        name = row.get("file_name") if isinstance(row, dict) else None
        column = next((c for c in _CAPTION_COLUMNS if isinstance(row, dict) and row.get(c) is not None), None)
        if not name or column is None:
            raise DataError(
                f"{path} row {number}: needs a file_name and a caption (or text) value; got keys "
                f"{sorted(row) if isinstance(row, dict) else type(row).__name__}"
            )
        value = row[column]
        captions = [str(v).strip() for v in value] if isinstance(value, list) else [str(value).strip()]
        captions = [c for c in captions if c]
        if captions:
            table[Path(str(name)).as_posix().removeprefix("./")] = captions
    return table
