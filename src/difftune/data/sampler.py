"""The resumable bucket batch sampler: every batch holds samples of one bucket of one dataset.

An epoch's order is a pure function of (seed, epoch): each dataset's buckets are shuffled and cut
into full batches (an incomplete last batch is dropped), then datasets take turns, the next batch
coming from a dataset drawn with weight `probability` among those with batches left. The epoch ends
when every dataset is used up, so probability shapes the mix, not how much of a dataset is seen.
Position is (epoch, batch_index), which is all a checkpoint needs to resume exactly.
With n processes and train_batch_size B, every process walks the same order of global batches of n * B
samples and takes its own B rows of each (`rows`), so position and epoch length are the same on all.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from difftune.data.errors import DatasetTooSmall


@dataclass(frozen=True)
class SampleGroup:
    """One dataset's samples by bucket. repeats 0 = each sample once per epoch, N = N + 1 times."""

    dataset_id: str
    buckets: dict[Hashable, list[int]]
    repeats: int = 0
    probability: float = 1.0

    def usable_samples(self, batch_size: int) -> int:
        """Samples per epoch that land in full, single-bucket batches (repeats counted)."""
        if self.probability <= 0:
            return 0
        return sum(len(ix) * (self.repeats + 1) // batch_size * batch_size for ix in self.buckets.values())

    def total_samples(self) -> int:
        return sum(len(ix) for ix in self.buckets.values())


def usable_batches(groups: Sequence[SampleGroup], batch_size: int) -> int:
    """Full single-bucket batches in one epoch over all groups."""
    return sum(group.usable_samples(batch_size) // batch_size for group in groups)


def check_enough_samples(
    groups: Sequence[SampleGroup],
    batch_size: int,
    gradient_accumulation_steps: int = 1,
    num_processes: int = 1,
) -> None:
    """Raise DatasetTooSmall unless one epoch fills one optimizer step of global batches.

    A global batch is batch_size * num_processes samples of one bucket (see the module docstring).
    """
    global_batch = batch_size * num_processes
    needed = global_batch * gradient_accumulation_steps
    usable = sum(group.usable_samples(global_batch) for group in groups)
    if usable >= needed:
        return
    names = ", ".join(f"'{g.dataset_id}'" for g in groups) or "(none)"
    details = "; ".join(
        f"'{g.dataset_id}': {g.total_samples()} samples in {len(g.buckets)} bucket(s), "
        f"{g.usable_samples(global_batch)} usable"
        for g in groups
    )
    raise DatasetTooSmall(
        f"dataset(s) {names} give {usable} usable samples per epoch (full batches of {global_batch} from one "
        f"bucket; {details}), but one optimizer step needs {needed} (train_batch_size {batch_size} x "
        f"gradient_accumulation_steps {gradient_accumulation_steps} x {num_processes} process(es)): "
        f"{needed - usable} short. Add images, raise repeats, lower train_batch_size or "
        "gradient_accumulation_steps, or use fewer aspect buckets (crop with crop_aspect square)"
    )


class BucketBatchSampler:
    """Yields lists of sample indices, one bucket of one dataset per list; see the module docstring."""

    def __init__(
        self,
        groups: Sequence[SampleGroup],
        batch_size: int,
        seed: int,
        rows: slice = slice(None),
    ) -> None:
        """batch_size: samples of a global batch (every process's rows); rows: this process's share."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.groups = list(groups)
        self.batch_size = batch_size
        self.seed = seed
        self.rows = rows
        self.epoch = 0
        self.batch_index = 0  # batches of this epoch already handed out
        self.last_position: tuple[int, int] | None = None  # (epoch, batch_index) of the last batch yielded
        self._cached_epoch: tuple[int, list[list[int]]] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return usable_batches(self.groups, self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This process's rows of every batch of an epoch, in order."""
        if self._cached_epoch is None or self._cached_epoch[0] != epoch:
            self._cached_epoch = (epoch, [batch[self.rows] for batch in self._global_order(epoch)])
        return self._cached_epoch[1]

    def __iter__(self) -> Iterator[list[int]]:
        """The rest of the current epoch; the position advances before each batch is handed out."""
        if self.batch_index >= self.batches_per_epoch:
            self.epoch, self.batch_index = self.epoch + 1, 0
        batches = self.epoch_batches(self.epoch)
        while self.batch_index < len(batches):
            batch = batches[self.batch_index]
            self.last_position = (self.epoch, self.batch_index)
            self.batch_index += 1
            yield list(batch)

    def iter_forever(self) -> Iterator[list[int]]:
        """Epoch after epoch, without end."""
        if self.batches_per_epoch == 0:
            check_enough_samples(self.groups, self.batch_size)
        while True:
            yield from self

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved position; the next batch is the one that followed it before."""
        if not state:
            return
        if "seed" in state and state["seed"] != self.seed:
            raise ValueError(
                f"the checkpoint's sampler used seed {state['seed']} but this run uses seed {self.seed}; "
                "set the same seed to resume exactly"
            )
        self.epoch = int(state["epoch"])
        self.batch_index = int(state["batch_index"])

    # -- ordering ------------------------------------------------------------------------------
    def _global_order(self, epoch: int) -> list[list[int]]:
        per_group = [self._group_batches(group, epoch) for group in self.groups]
        rng = _rng(self.seed, epoch, "mix")
        order: list[list[int]] = []
        positions = [0] * len(per_group)
        while True:
            open_groups = [i for i, batches in enumerate(per_group) if positions[i] < len(batches)]
            if not open_groups:
                return order
            weights = [self.groups[i].probability for i in open_groups]
            chosen = rng.choices(open_groups, weights=weights)[0]
            order.append(per_group[chosen][positions[chosen]])
            positions[chosen] += 1

    def _group_batches(self, group: SampleGroup, epoch: int) -> list[list[int]]:
        if group.probability <= 0:
            return []
        batches = []
        for bucket in sorted(group.buckets, key=str):
            pool: list[int] = []
            for repeat in range(group.repeats + 1):
                copy = list(group.buckets[bucket])
                _rng(self.seed, epoch, group.dataset_id, str(bucket), repeat).shuffle(copy)
                pool += copy
            full = len(pool) // self.batch_size * self.batch_size
            batches += [pool[i : i + self.batch_size] for i in range(0, full, self.batch_size)]
        _rng(self.seed, epoch, group.dataset_id, "batches").shuffle(batches)
        return batches


def _rng(*parts: Any) -> random.Random:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))
