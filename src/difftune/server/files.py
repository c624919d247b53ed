"""Files the web UI may read: paths confined to one root folder (a dataset's or the output folder).

A dataset folder may hold anything, so what comes from it is served only as what it claims to be by
its suffix: an image or video type, or plain text; anything else is a download. Nothing is ever
served as HTML, SVG or script, and every served file carries a sandboxing policy.
"""

from __future__ import annotations

import io
from pathlib import Path, PurePosixPath
from typing import Any

from fastapi import HTTPException
from fastapi.responses import FileResponse

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".webm", ".mkv", ".avi"}
# fixed here rather than taken from the system's mime table, which may map a suffix to anything
MEDIA_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".gif": "image/gif",
    ".mp4": "video/mp4",
    ".mov": "video/quicktime",
    ".webm": "video/webm",
    ".mkv": "video/x-matroska",
    ".avi": "video/x-msvideo",
}
# a served file opened on its own gets an opaque origin, no script and no sub-resources
USER_FILE_POLICY = "default-src 'none'; sandbox"


def media_kind(path: Path) -> str:
    """'image', 'video', 'text' or 'other', from the suffix."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    return "text" if suffix in (".txt", ".json", ".jsonl", ".csv") else "other"


def resolve_inside(root: Path, relative: str) -> Path:
    """`relative` resolved under `root`; 403 for absolute paths, `..` or a symlink that leads outside, 404 if absent."""
    if "\x00" in relative or "\\" in relative:
        raise HTTPException(403, f"path '{relative}' is not allowed: use forward slashes, no NUL bytes")
    parts = PurePosixPath(relative).parts
    if relative.startswith("/") or ".." in parts:
        raise HTTPException(
            403, f"path '{relative}' is not allowed: give a path inside the folder, without '..'"
        )
    try:
        base = root.resolve(strict=True)
    except FileNotFoundError:
        raise HTTPException(
            404, f"folder '{root}' does not exist; create it or fix the path in the config"
        ) from None
    target = (base / relative).resolve()
    if not target.is_relative_to(base):
        raise HTTPException(403, f"path '{relative}' leads outside '{root}' (through a symlink); not served")
    if not target.exists():
        raise HTTPException(404, f"'{relative}' does not exist in '{root}'")
    return target


def list_folder(root: Path, relative: str) -> dict[str, Any]:
    """Sub-folders and files of `relative` under `root`; entries whose target lies outside are left out."""
    folder = resolve_inside(root, relative)
    if not folder.is_dir():
        raise HTTPException(400, f"'{relative}' is a file, not a folder")
    base = root.resolve()
    dirs, files = [], []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name.lower()):
        real = entry.resolve()
        if not real.is_relative_to(base) or not real.exists():
            continue
        rel = real.relative_to(base).as_posix() if entry.is_symlink() else entry.relative_to(base).as_posix()
        if entry.is_dir():
            dirs.append({"name": entry.name, "path": rel})
            continue
        item = {"name": entry.name, "path": rel, "size": real.stat().st_size, "kind": media_kind(entry)}
        caption = entry.with_suffix(".txt")
        if (
            item["kind"] in ("image", "video")
            and caption.is_file()
            and caption.resolve().is_relative_to(base)
        ):
            item["caption"] = caption.read_text(encoding="utf-8", errors="replace")[:2000]
        files.append(item)
    here = folder.relative_to(base).as_posix()
    return {"path": "" if here == "." else here, "dirs": dirs, "files": files}


def user_file_response(path: Path) -> FileResponse:
    """`path` as an image or video of its suffix's type, as plain text, or else as a download."""
    headers = {"Content-Security-Policy": USER_FILE_POLICY}
    kind = media_kind(path)
    if kind in ("image", "video"):
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix.lower()], headers=headers)
    if kind == "text":
        return FileResponse(path, media_type="text/plain; charset=utf-8", headers=headers)
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=path.name,
        content_disposition_type="attachment",
        headers=headers,
    )


def thumbnail_png(path: Path, size: int) -> bytes:
    """A PNG no larger than size x size pixels of the image at `path`."""
    from PIL import Image, UnidentifiedImageError

    if media_kind(path) != "image":
        raise HTTPException(
            415, f"'{path.name}' is not an image; thumbnails are made for {sorted(IMAGE_SUFFIXES)}"
        )
    try:
        with Image.open(path) as image:
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
    except (UnidentifiedImageError, OSError) as exc:
        raise HTTPException(415, f"'{path.name}' could not be read as an image: {exc}") from None
    return buffer.getvalue()
