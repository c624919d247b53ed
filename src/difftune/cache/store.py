"""Safetensors entry files shared by the caches: atomic writes, cheap checks, verified reads.

An entry is one .safetensors file whose string metadata names what it holds. A file that is
truncated, unparsable or whose metadata does not match what was asked for is deleted and treated as
missing: a bad entry is rebuilt, never returned.
"""

from __future__ import annotations

import io
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from difftune.storage import DiskFull, is_disk_full, megabytes, write_tensors


class CacheMiss(KeyError):
    """The entry is not in the cache (or was corrupt and has been deleted)."""


# what a damaged or foreign file raises while its header is parsed
_DAMAGED = (OSError, ValueError, struct.error, KeyError, TypeError, IndexError, AttributeError)


def write_entry(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write tensors + metadata to path via a temporary file and os.replace (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    contiguous = {key: value.detach().to("cpu").contiguous().clone() for key, value in tensors.items()}
    try:
        write_tensors(temporary, contiguous, metadata)
        os.replace(temporary, path)
    except OSError as error:
        if isinstance(error, DiskFull) or not is_disk_full(error):
            raise
        size = sum(t.numel() * t.element_size() for t in contiguous.values())
        raise DiskFull(
            f"no space left on device while writing the cache entry {path} (each entry needs about "
            f"{megabytes(size)}); free some space, or point the cache (cache_dir_vae, or the cache_dir "
            "of the text_embeds dataset) at a larger disk",
            size,
        ) from None
    finally:
        temporary.unlink(missing_ok=True)


def header_matches(path: Path, expected: dict[str, str]) -> bool:
    """Whether path holds a complete safetensors file whose metadata includes `expected`.

    Reads only the header; a bad file is deleted. Completeness = the file is as long as the header says.
    """
    metadata = _read_header(path)
    if metadata is None:
        return False
    if any(metadata.get(key) != value for key, value in expected.items()):
        path.unlink(missing_ok=True)
        return False
    return True


def read_entry(path: Path, expected: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a verified entry; raises CacheMiss (after deleting a bad file) otherwise.

    The file is opened and read once: the header check and the tensors come from the same bytes.
    """
    from safetensors.torch import load as load_tensors

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CacheMiss(str(path)) from None
    except OSError as error:
        path.unlink(missing_ok=True)
        raise CacheMiss(str(path)) from error
    try:
        metadata = _header_metadata(io.BytesIO(data).read, len(data))
    except _DAMAGED as error:
        path.unlink(missing_ok=True)
        raise CacheMiss(str(path)) from error
    if any(metadata.get(key) != value for key, value in expected.items()):
        path.unlink(missing_ok=True)
        raise CacheMiss(str(path))
    try:
        tensors = load_tensors(data)
    except Exception as error:  # safetensors raises its own error types for damaged files
        path.unlink(missing_ok=True)
        raise CacheMiss(str(path)) from error
    return tensors, metadata


def _read_header(path: Path) -> dict[str, str] | None:
    """The metadata of a complete file, or None (and the file deleted) when it is damaged or absent."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            return _header_metadata(handle.read, size)
    except FileNotFoundError:
        return None
    except _DAMAGED:
        path.unlink(missing_ok=True)
        return None


def _header_metadata(read: Callable[[int], bytes], size: int) -> dict[str, str]:
    """String metadata of a safetensors file of `size` bytes whose start read(n) returns; raises when damaged.

    Complete = as long as the header says (8-byte length, JSON header, then the tensors' bytes).
    """
    (header_length,) = struct.unpack("<Q", read(8))
    if header_length <= 0 or 8 + header_length > size:
        raise ValueError("header longer than the file")
    header = json.loads(read(header_length))
    end = max((info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"), default=0)
    if 8 + header_length + end != size:
        raise ValueError("file shorter or longer than its header says")
    metadata = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()}
