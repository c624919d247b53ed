"""Text-embedding cache: one safetensors file per prompt, named by sha256(identity + prompt).

`identity` names the text encoders (a family's cache_identity()): a new model gives new names, so
old entries are never read for it. Each file stores the prompt and identity in its metadata; they
are checked on every read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from difftune.cache.store import CacheMiss, header_matches, read_entry, write_entry

__all__ = ["CacheMiss", "TextEmbedCache"]


class TextEmbedCache:
    """Prompt -> dict of tensors (as the family's encode_prompts gives for one prompt)."""

    def __init__(self, cache_dir: str | Path, identity: str, write_batch_size: int = 128) -> None:
        self.cache_dir = Path(cache_dir)
        self.identity = identity
        self.write_batch_size = max(1, write_batch_size)

    def path_for(self, prompt: str) -> Path:
        digest = hashlib.sha256(f"{self.identity}\0{prompt}".encode()).hexdigest()
        return self.cache_dir / f"{digest}.safetensors"

    def _expected(self, prompt: str) -> dict[str, str]:
        return {"prompt": prompt, "identity": self.identity}

    def missing(self, prompts: Sequence[str]) -> list[str]:
        """Prompts without a sound entry (distinct, in first-seen order); damaged entries are deleted."""
        seen: set[str] = set()
        absent = []
        for prompt in prompts:
            if prompt in seen:
                continue
            seen.add(prompt)
            if not header_matches(self.path_for(prompt), self._expected(prompt)):
                absent.append(prompt)
        return absent

    def write(
        self,
        prompts: Sequence[str],
        embeds: Sequence[dict[str, torch.Tensor]],
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Store one entry per prompt, write_batch_size files at a time; progress(done, total) after each batch."""
        if len(prompts) != len(embeds):
            raise ValueError(
                f"got {len(prompts)} prompts but {len(embeds)} embeddings; pass one dict per prompt"
            )
        for start in range(0, len(prompts), self.write_batch_size):
            for prompt, embed in zip(
                prompts[start : start + self.write_batch_size], embeds[start : start + self.write_batch_size]
            ):
                write_entry(self.path_for(prompt), embed, self._expected(prompt))
            if progress is not None:
                progress(min(start + self.write_batch_size, len(prompts)), len(prompts))

    def load(self, prompt: str) -> dict[str, torch.Tensor]:
        """The cached tensors of a prompt; raises CacheMiss when absent or damaged (a damaged file is deleted)."""
        tensors, _ = read_entry(self.path_for(prompt), self._expected(prompt))
        return tensors
