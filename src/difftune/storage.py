"""Writing files that must be whole: safetensors and JSON writers that name a full disk as such.

Checkpoints and caches write through `write_tensors` and `write_json`. A full disk surfaces as an
OSError with errno ENOSPC, which `is_disk_full` recognises (safetensors reports it as its own error
type whose text carries the OS error), so callers can say "no space left on device" instead of
passing on a library's internal message.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# How the safetensors writer spells ENOSPC inside its own error type (a Rust io::Error in Debug form).
_DISK_FULL_TEXT = ("No space left on device", "StorageFull", "os error 28", "code: 28")


class DiskFull(OSError):
    """No space left on device; the message says what was being written and about how much it needs."""

    def __init__(self, message: str, size_bytes: int = 0):
        super().__init__(errno.ENOSPC, message)
        self.message = message
        self.size_bytes = size_bytes

    def __str__(self) -> str:
        return self.message


def is_disk_full(error: BaseException) -> bool:
    """Whether an error from writing a file means the disk (or quota) is full."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(text in str(error) for text in _DISK_FULL_TEXT)


def write_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Save CPU tensors as a safetensors file; a full disk raises OSError(ENOSPC)."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except OSError:
        raise
    except Exception as error:  # safetensors' own error type
        if is_disk_full(error):
            raise OSError(errno.ENOSPC, f"No space left on device: {path}") from error
        raise


def write_json(path: Path, value: Any) -> None:
    """Write JSON text (Infinity and NaN allowed, as Python's json reads them back)."""
    Path(path).write_text(json.dumps(value, indent=1))


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def free_bytes(folder: Path) -> int | None:
    """Free bytes on the disk holding `folder` (or its nearest existing parent); None if unknown."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def megabytes(size_bytes: int) -> str:
    """A byte count as whole megabytes for messages ('about 12 MB'), at least 1."""
    return f"{max(1, round(size_bytes / 1e6))} MB"
