"""Batch loading: TrainingData.load_batch from warm caches against the tiny model's step, in one process.

The same batches are first read (timed: load_batch, with the latent and text-embedding file reads
inside it timed apart) and then trained on by the bare step (timed: forward, backward, optimizer).
The share of a step spent waiting for data is load / (load + step), as the recipe, which reads each
batch just before its step, waits for it.

    python bench/loading.py --quick            # 40 batches of 2 at 64x64 px
    python bench/loading.py --resolution 128 --batch-size 4
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from itertools import islice
from pathlib import Path

import common

WARMUP_BATCHES = 3


def timed_reads(totals: dict[str, float]):
    """Wrap LatentCache.load and TextEmbedCache.load to add their seconds to totals; returns an undo."""
    from difftune.cache.latents import LatentCache
    from difftune.cache.text import TextEmbedCache

    originals = {LatentCache: LatentCache.load, TextEmbedCache: TextEmbedCache.load}

    def wrap(function, phase):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                totals[phase] += time.perf_counter() - started

        return wrapper

    LatentCache.load = wrap(LatentCache.load, "latent_read")
    TextEmbedCache.load = wrap(TextEmbedCache.load, "text_read")

    def undo() -> None:
        for cls, function in originals.items():
            cls.load = function

    return undo


def main() -> None:
    arguments = common.parser(__doc__.splitlines()[0])
    arguments.add_argument("--batches", type=int, default=None, help="timed batches (default 40 quick, 200)")
    arguments.add_argument("--resolution", type=int, default=64)
    arguments.add_argument("--batch-size", type=int, default=2)
    args = arguments.parse_args()
    common.quiet()
    count = args.batches or (40 if args.quick else 200)

    from difftune.config import load_config
    from difftune.testing.images import make_image_dataset
    from difftune.testing.runs import build_tiny_model, write_tiny_run

    with tempfile.TemporaryDirectory(prefix="difftune-bench-") as scratch:
        scratch = Path(scratch)
        model = build_tiny_model("sdxl", scratch / "models" / "sdxl")
        side = args.resolution
        make_image_dataset(scratch / "images", n=32, sizes=[(side, side), (side * 2, side * 2)], seed=0)
        config = write_tiny_run(
            scratch / "run",
            model,
            scratch / "images",
            dataset={**common.DATASET, "resolution": side},
            max_train_steps=1,
            train_batch_size=args.batch_size,
            **common.RUN,
        )
        loaded = load_config(config)
        loop = common.BareLoop(loaded)
        loop.training_data(loaded)  # fills the caches
        data = loop.training_data(loaded)  # warm, as a run's second start
        order = list(islice(data.sampler.iter_forever(), count + WARMUP_BATCHES))

        reads: dict[str, float] = defaultdict(float)
        undo = timed_reads(reads)
        load_times, batches = [], []
        try:
            for index, indices in enumerate(order):
                if index == WARMUP_BATCHES:
                    reads.clear()
                with common.stopwatch() as timing:
                    batches.append(data.load_batch(indices))
                load_times.append(timing["s"])
        finally:
            undo()
        step_times = []
        for batch in batches:
            with common.stopwatch() as timing:
                loop.step(batch)
            step_times.append(timing["s"])

    load_times, step_times = load_times[WARMUP_BATCHES:], step_times[WARMUP_BATCHES:]
    load_ms, step_ms = common.median_ms(load_times), common.median_ms(step_times)
    total_load_s = sum(load_times)
    figures = {
        "load_batch_ms": load_ms,
        "step_ms": step_ms,
        "data_wait_share": load_ms / (load_ms + step_ms),
        "data_wait_p20_share": common.low_ms(load_times)
        / (common.low_ms(load_times) + common.low_ms(step_times)),
        "load_per_sample_ms": load_ms / args.batch_size,
        "latent_read_share_of_load": reads["latent_read"] / total_load_s,
        "text_read_share_of_load": reads["text_read"] / total_load_s,
    }
    notes = {
        "setup": f"tiny SDXL, LoRA rank 4, {count} batches of {args.batch_size} at {side}x{side} px "
        f"(latents 4x{side // 8}x{side // 8}), fp32, medians after {WARMUP_BATCHES} warm-up batches",
        "reference": "step_ms = the bare training step on the same batches, in memory",
    }
    common.report("loading", figures, notes, save=not args.no_save)


if __name__ == "__main__":
    main()
