"""VAE-latent cache: one safetensors file per sample plan.

The file name is sha256 of (identity, source path, file size, mtime_ns, resize_to, crop_box, bucket),
so a new model, resolution or crop, or a changed source file, invalidates exactly the entries it
touches. Latents are stored in bf16 (or fp16) and read back as float32. The metadata also holds
original_size, the crop's top-left and the target size, which SDXL's time ids need.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from difftune.cache.store import CacheMiss, header_matches, read_entry, write_entry

if TYPE_CHECKING:
    from difftune.data.buckets import SamplePlan

__all__ = ["CacheMiss", "CachedLatent", "LatentCache"]

_STORAGE_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class CachedLatent:
    """A cached latent (float32, the family's layout without batch dim) and the sizes for time ids, as (h, w)."""

    latents: torch.Tensor
    original_size: tuple[int, int]  # (height, width) of the source image
    crop_top_left: tuple[int, int]  # (top, left) in the resized image
    target_size: tuple[int, int]  # (height, width) of the bucket


class LatentCache:
    """SamplePlan -> latents; see the module docstring for what the key covers."""

    def __init__(
        self,
        cache_dir: str | Path,
        identity: str,
        dtype: str | torch.dtype = "bf16",
        write_batch_size: int = 128,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.identity = identity
        self.write_batch_size = max(1, write_batch_size)
        self._keys: dict[SamplePlan, str] = {}
        if isinstance(dtype, torch.dtype):
            if dtype not in (torch.bfloat16, torch.float16):
                raise ValueError(f"latent storage dtype must be bf16 or fp16, got {dtype}")
            self.dtype = dtype
        elif dtype in _STORAGE_DTYPES:
            self.dtype = _STORAGE_DTYPES[dtype]
        else:
            raise ValueError(f"latent storage dtype '{dtype}': use bf16 or fp16")

    def key(self, plan: SamplePlan) -> str:
        """The entry's name; remembered per plan, as each step asks again for every sample it reads."""
        key = self._keys.get(plan)
        if key is None:
            key = self._keys[plan] = self._compute_key(plan)
        return key

    def _compute_key(self, plan: SamplePlan) -> str:
        fields = [
            self.identity,
            str(Path(plan.path).resolve()),
            plan.size_bytes,
            plan.mtime_ns,
            list(plan.resize_to),
            list(plan.crop_box),
            list(plan.bucket),
        ]
        return hashlib.sha256(json.dumps(fields).encode()).hexdigest()

    def path_for(self, plan: SamplePlan) -> Path:
        return self.cache_dir / f"{self.key(plan)}.safetensors"

    def _expected(self, plan: SamplePlan) -> dict[str, str]:
        return {"key": self.key(plan), "identity": self.identity}

    def missing(self, plans: Sequence[SamplePlan]) -> list[SamplePlan]:
        """Plans without a sound entry, in order; damaged entries are deleted."""
        return [plan for plan in plans if not header_matches(self.path_for(plan), self._expected(plan))]

    def write(
        self,
        plans: Sequence[SamplePlan],
        latents: torch.Tensor | Sequence[torch.Tensor],
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Store latents[i] for plans[i] ((B, ...) tensor or a list), write_batch_size files at a time."""
        if len(plans) != len(latents):
            raise ValueError(f"got {len(plans)} plans but {len(latents)} latents; pass one latent per plan")
        for start in range(0, len(plans), self.write_batch_size):
            for offset, plan in enumerate(plans[start : start + self.write_batch_size]):
                width, height = plan.original_size
                metadata = {
                    **self._expected(plan),
                    "path": str(plan.path),
                    "original_size": json.dumps([height, width]),
                    "crop_top_left": json.dumps(list(plan.crop_top_left)),
                    "target_size": json.dumps([plan.bucket[1], plan.bucket[0]]),
                }
                write_entry(
                    self.path_for(plan), {"latents": latents[start + offset].to(self.dtype)}, metadata
                )
            if progress is not None:
                progress(min(start + self.write_batch_size, len(plans)), len(plans))

    def load(self, plan: SamplePlan) -> CachedLatent:
        """The cached entry as float32; raises CacheMiss when absent or damaged (a damaged file is deleted)."""
        path = self.path_for(plan)
        tensors, metadata = read_entry(path, self._expected(plan))
        try:
            return CachedLatent(
                latents=tensors["latents"].float(),
                original_size=tuple(json.loads(metadata["original_size"])),
                crop_top_left=tuple(json.loads(metadata["crop_top_left"])),
                target_size=tuple(json.loads(metadata["target_size"])),
            )
        except (KeyError, ValueError, TypeError) as error:
            path.unlink(missing_ok=True)
            raise CacheMiss(str(path)) from error
