"""Find a dataset's media files and read their sizes from headers, with the results cached on disk.

The cache is one JSON file per dataset in `metadata_dir`, keyed by the path relative to the dataset
folder and holding (size_bytes, mtime_ns): a later discovery re-reads only new or changed files and
drops deleted ones. Sizes are (width, height) as displayed, i.e. after the EXIF orientation.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from difftune.config.schema import DatasetConfig

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v"})
_CACHE_VERSION = 1
# EXIF orientations 5..8 rotate by 90 or 270 degrees, so width and height swap
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class SampleInfo:
    """One discovered file: where it is, how big it is on disk and on screen, and (video) its length."""

    path: Path
    relative_path: str  # posix path relative to the dataset folder: the key of every cache
    width: int
    height: int
    size_bytes: int
    mtime_ns: int
    num_frames: int | None = None  # videos only
    fps: float | None = None  # videos only

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels, as displayed."""
        return (self.width, self.height)


@dataclass
class Discovery:
    """The usable files of one dataset, the files left out with the reason, and how many were read."""

    dataset_id: str
    root: Path
    samples: list[SampleInfo] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    headers_read: int = 0  # files whose headers were opened this time (0 when all came from the cache)


def skip_words(dataset: DatasetConfig) -> set[str]:
    """The words of skip_file_discovery ("vae aspect text metadata"), lower-case."""
    return set(dataset.skip_file_discovery.replace(",", " ").lower().split())


def metadata_path(dataset: DatasetConfig, metadata_dir: Path) -> Path:
    """Where the discovery cache of a dataset lives."""
    return Path(metadata_dir) / f"discovery-{dataset.id}.json"


def discover(dataset: DatasetConfig, metadata_dir: Path) -> Discovery:
    """List the dataset's images (videos for video datasets) with sizes read from headers only.

    With "metadata" or "aspect" in skip_file_discovery and a cache present, the cached list is used
    as it is, without listing the folder (for very large datasets known not to have changed).
    """
    if not dataset.instance_data_dir:
        raise ValueError(
            f"dataset '{dataset.id}' has no instance_data_dir; set it to the folder of its files"
        )
    root = Path(dataset.instance_data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset '{dataset.id}': instance_data_dir {root} is not a folder; fix the path in the dataset config"
        )
    is_video = dataset.dataset_type == "video"
    cache_file = metadata_path(dataset, metadata_dir)
    cached = _read_cache(cache_file, root)
    result = Discovery(dataset_id=dataset.id, root=root)

    if cached and skip_words(dataset) & {"metadata", "aspect"}:
        for relative, entry in sorted(cached.items()):
            _add(result, root, relative, entry)
        return result

    entries: dict[str, dict[str, Any]] = {}
    files, result.skipped = _list_files(
        root, VIDEO_EXTENSIONS if is_video else IMAGE_EXTENSIONS, dataset.follow_symlinks_outside_root
    )
    for relative, path, info in files:
        previous = cached.get(relative)
        if previous and previous["size_bytes"] == info.st_size and previous["mtime_ns"] == info.st_mtime_ns:
            entry = previous
        else:
            entry = {"size_bytes": info.st_size, "mtime_ns": info.st_mtime_ns}
            entry.update(_read_video_header(Path(path)) if is_video else _read_image_header(Path(path)))
            result.headers_read += 1
        entries[relative] = entry
        _add(result, root, relative, entry)
    if entries != cached:  # an unchanged folder costs no rewrite
        _write_cache(cache_file, root, entries)
    return result


def read_image_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed, from the header only (PIL opens lazily and decodes nothing)."""
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
        orientation = _orientation(image)
    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return int(width), int(height)


def _orientation(image) -> int:
    """The EXIF orientation from what the header gave (getexif() would decode a PNG to find late chunks)."""
    from PIL import Image

    raw = image.info.get("exif")
    if raw:
        exif = Image.Exif()
        exif.load(raw)
        return int(exif.get(_EXIF_ORIENTATION, 1))
    tags = getattr(image, "tag_v2", None)  # TIFF keeps it among its own tags
    return int(tags.get(_EXIF_ORIENTATION, 1)) if tags is not None else 1


def _read_image_header(path: Path) -> dict[str, Any]:
    try:
        width, height = read_image_size(path)
    except Exception as error:  # PIL raises many types for bad headers; any of them means "unreadable"
        return {"error": f"unreadable image header ({type(error).__name__}: {error})"}
    if width < 1 or height < 1:
        return {"error": f"image header gives an empty size {width}x{height}"}
    return {"width": width, "height": height}


def _read_video_header(path: Path) -> dict[str, Any]:
    from difftune.data.video import UnreadableVideo, probe_video

    try:
        info = probe_video(path)
    except (UnreadableVideo, OSError, ValueError) as error:
        return {"error": f"unreadable video ({error})"}
    return {"width": info.width, "height": info.height, "num_frames": info.num_frames, "fps": info.fps}


def _add(result: Discovery, root: Path, relative: str, entry: dict[str, Any]) -> None:
    path = root / relative
    if "error" in entry:
        result.skipped.append((path, entry["error"]))
        return
    result.samples.append(
        SampleInfo(
            path=path,
            relative_path=relative,
            width=entry["width"],
            height=entry["height"],
            size_bytes=entry["size_bytes"],
            mtime_ns=entry["mtime_ns"],
            num_frames=entry.get("num_frames"),
            fps=entry.get("fps"),
        )
    )


def list_media_files(root: Path, video: bool = False, follow_outside: bool = False) -> list[Path]:
    """The images (videos) under root that discovery would read, without opening any of them."""
    files, _ = _list_files(root, VIDEO_EXTENSIONS if video else IMAGE_EXTENSIONS, follow_outside)
    return [Path(path) for _, path, _ in files]


def _list_files(
    root: Path, extensions: frozenset[str], follow_outside: bool = False
) -> tuple[list[tuple[str, str, os.stat_result]], list[tuple[Path, str]]]:
    """(relative posix path, full path, stat) of the files under root whose suffix is in extensions,
    sorted by relative path, and the (path, reason) of every entry left out.

    Recursive, hidden files and folders left out. The folders themselves are walked first; then each
    symbolic link is followed at most once per real file or folder ((st_dev, st_ino)), so `self -> .`
    or a loop of links adds nothing, and a link whose target lies outside root is left out unless
    `follow_outside`. Names that are not valid UTF-8 are left out (their captions and cache keys
    could not be written). Plain strings rather than Path objects: on 100k files pathlib's parsing
    cost more than the stat calls.
    """
    top = str(root)
    real_top = os.path.realpath(top)
    top_stat = os.stat(top)
    seen: dict[tuple[int, int], str] = {(top_stat.st_dev, top_stat.st_ino): "."}
    found: list[tuple[str, str, os.stat_result]] = []
    skipped: list[tuple[Path, str]] = []
    links: list[tuple[str, str]] = []  # (relative, full) of every link met, followed after the folders

    def walk(folder: str, prefix: str) -> None:
        stack = [(folder, prefix)]
        while stack:
            current, current_prefix = stack.pop()
            try:
                with os.scandir(current) as listing:
                    entries = sorted(listing, key=lambda entry: entry.name)
            except OSError as error:
                skipped.append((_shown(current), f"folder cannot be read ({error.strerror})"))
                continue
            subfolders = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                relative = current_prefix + entry.name
                try:
                    if entry.is_symlink():
                        links.append((relative, entry.path))
                    elif entry.is_dir(follow_symlinks=False):
                        info = entry.stat(follow_symlinks=False)
                        if seen.setdefault((info.st_dev, info.st_ino), relative) == relative:
                            subfolders.append((entry.path, relative + "/"))
                    elif (
                        os.path.splitext(entry.name)[1].lower() in extensions
                        and entry.is_file(follow_symlinks=False)  # not a pipe or a device
                    ):
                        add_file(relative, entry.path, entry.stat(follow_symlinks=False))
                except OSError:  # vanished between listing and stat
                    continue
            stack.extend(reversed(subfolders))

    def add_file(relative: str, path: str, info: os.stat_result) -> None:
        if not _is_utf8(relative):
            skipped.append((_shown(path), "the file name is not valid UTF-8; rename the file"))
            return
        seen.setdefault((info.st_dev, info.st_ino), relative)
        found.append((relative, path, info))

    walk(top, "")
    index = 0
    while index < len(links):  # following a link to a folder may find more links
        relative, path = links[index]
        index += 1
        try:
            info = os.stat(path)
        except OSError as error:
            skipped.append((_shown(path), f"broken symbolic link ({error.strerror})"))
            continue
        is_folder = stat.S_ISDIR(info.st_mode)
        if not is_folder and (
            not stat.S_ISREG(info.st_mode) or os.path.splitext(relative)[1].lower() not in extensions
        ):
            continue
        real = os.path.realpath(path)
        identity = (info.st_dev, info.st_ino)
        if identity in seen:
            skipped.append(
                (
                    _shown(path),
                    f"symbolic link to {_shown(real)}, which is already in the dataset as '{seen[identity]}'",
                )
            )
        elif not follow_outside and os.path.commonpath([real_top, real]) != real_top:
            skipped.append(
                (
                    _shown(path),
                    f"symbolic link to {_shown(real)}, outside the dataset folder; set "
                    '"follow_symlinks_outside_root": true on the dataset to include it',
                )
            )
        elif is_folder:
            seen[identity] = relative
            walk(path, relative + "/")
        else:
            add_file(relative, path, info)
    found.sort(key=lambda item: item[0])
    return found, skipped


def _is_utf8(name: str) -> bool:
    """False for a name holding undecodable bytes (Python keeps them as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(path: str) -> Path:
    """A path that prints and writes as UTF-8: undecodable bytes shown as \\xNN escapes."""
    return Path(os.fsencode(path).decode("utf-8", "backslashreplace"))


def _read_cache(cache_file: Path, root: Path) -> dict[str, dict[str, Any]]:
    """Cached entries, or {} when the file is missing, unreadable, of another version or another folder."""
    try:
        data = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if data.get("version") != _CACHE_VERSION or data.get("root") != str(root.resolve()):
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def _write_cache(cache_file: Path, root: Path, entries: dict[str, dict[str, Any]]) -> None:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    temporary = cache_file.with_name(f".{cache_file.name}.tmp-{os.getpid()}")
    payload = {"version": _CACHE_VERSION, "root": str(root.resolve()), "files": entries}
    temporary.write_text(json.dumps(payload, sort_keys=True), encoding="utf-8")
    os.replace(temporary, cache_file)
