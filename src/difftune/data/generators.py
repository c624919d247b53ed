"""Conditioning datasets generated from a dataset's own images (its `conditioning` block).

canny: each image's Canny edge map (OpenCV, on the EXIF-upright grey image at full size), white
edges on black, written as a PNG with the image's relative path to
cache/conditioning/<dataset id>_conditioning_canny/ and linked to the dataset as conditioning data
(paired by name, resized and cropped with each sample as any conditioning image). A map is made again
only when its image (size, mtime) or the thresholds change: `generated.json` in the folder records
what each map was made from.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difftune.data.conditioning import linked_ids
from difftune.data.errors import DataError

if TYPE_CHECKING:
    from difftune.config.dataset_blocks import ConditioningGenerator
    from difftune.config.schema import DatasetConfig

Events = Callable[[str, dict[str, Any]], None]
GENERATED_ROOT = Path("cache/conditioning")
_MANIFEST = "generated.json"


def generators_of(dataset: DatasetConfig) -> list[ConditioningGenerator]:
    """The dataset's conditioning generators (none when it has no `conditioning` block)."""
    return list(dataset.conditioning or [])


def generated_id(dataset: DatasetConfig, generator: ConditioningGenerator) -> str:
    """The original tool's id of a generated dataset: <id>_conditioning_<type>."""
    kind = "canny" if generator.type == "edges" else generator.type
    return f"{dataset.id}_conditioning_{kind}"


def with_generated(
    datasets: Sequence[DatasetConfig], events: Events
) -> tuple[list[DatasetConfig], dict[str, list[str]]]:
    """The datasets with every `conditioning` block's dataset generated, added and linked, and the
    captions (by generated dataset id) that replace the captions of the samples paired with it."""
    from difftune.config.schema import DatasetConfig as Config

    result = list(datasets)
    captions: dict[str, list[str]] = {}
    taken = {d.id for d in datasets}
    for index, dataset in enumerate(datasets):
        generators = generators_of(dataset)
        if not generators or dataset.disabled:
            continue
        if dataset.dataset_type != "image":
            raise DataError(
                f"dataset '{dataset.id}': conditioning generators make images from images; remove the "
                f"conditioning block from this {dataset.dataset_type} dataset"
            )
        linked = linked_ids(dataset)
        for generator in generators:
            name = generated_id(dataset, generator)
            if name in taken:
                raise DataError(
                    f"dataset '{dataset.id}': its conditioning block generates dataset '{name}', but a dataset "
                    "of that id exists already; rename that dataset or remove the conditioning block"
                )
            taken.add(name)
            folder = GENERATED_ROOT / name
            made = write_edge_maps(dataset, folder, *generator.thresholds())
            events(
                "log", {"message": f"dataset '{name}': {made} edge map(s) made in {folder}", "dataset": name}
            )
            result.append(
                Config(
                    id=name,
                    dataset_type="conditioning",
                    conditioning_type=generator.conditioning_type,
                    instance_data_dir=str(folder),
                    cache_dir_vae=str(Path(dataset.cache_dir_vae or f"cache/vae/{dataset.id}").parent / name),
                )
            )
            linked.append(name)
            if isinstance(generator.captions, str):
                captions[name] = [generator.captions]
            elif isinstance(generator.captions, list) and generator.captions:
                captions[name] = list(generator.captions)
        result[index] = dataset.model_copy(update={"conditioning_data": linked})
    return result, captions


def write_edge_maps(dataset: DatasetConfig, folder: Path, low: float, high: float) -> int:
    """Make the missing or outdated edge maps of the dataset's images in folder; returns how many were made."""
    from difftune.data.discovery import list_media_files

    root = Path(str(dataset.instance_data_dir)).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / _MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    except ValueError:
        manifest = {}  # a damaged record: every map is made again
    made = 0
    for source in list_media_files(root, follow_outside=dataset.follow_symlinks_outside_root):
        relative = source.relative_to(root).with_suffix(".png").as_posix()
        stat = source.stat()
        stamp = [stat.st_size, stat.st_mtime_ns, low, high]
        target = folder / relative
        if manifest.get(relative) == stamp and target.is_file():
            continue
        edges = edge_map(source, low, high)
        if edges is None:
            continue  # unreadable: discovery of the dataset reports it
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial.png")
        edges.save(partial)
        partial.replace(target)
        manifest[relative] = stamp
        made += 1
    partial_manifest = manifest_path.with_suffix(".partial")
    partial_manifest.write_text(json.dumps(manifest, indent=0, sort_keys=True))
    partial_manifest.replace(manifest_path)
    return made


def edge_map(path: Path, low: float, high: float):
    """The RGB PIL image of an image's Canny edges (255 on edges, 0 elsewhere), or None if unreadable."""
    import cv2
    import numpy as np
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            grey = np.asarray(ImageOps.exif_transpose(opened).convert("L"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    edges = cv2.Canny(grey, low, high)
    return Image.fromarray(edges).convert("RGB")
