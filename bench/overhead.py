"""Trainer overhead: ms/step of difftune's train() against a bare loop of the same step, in one process.

Both train the tiny SDXL's UNet with the same LoRA, optimizer, objective and model_forward on the
same cached data. train() runs once to fill the caches, then again from warm caches; its step time is
the median gap between consecutive progress events of events.jsonl (each gap covers one whole step:
batch read, forward, backward, optimizer, events). The bare loop steps over batches already in
memory. The ratio difftune / bare is the recipe's overhead (goal: at most 1.10).

    python bench/overhead.py --quick              # 24 timed steps
    python bench/overhead.py --steps 200 --profile   # also cProfile one train() run: top costs
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import common

WARMUP_STEPS = 3  # steps left out of each median: first-call allocations, lazy inits


def difftune_step_times(
    config_path: Path, output_dir: Path, steps: int, profile: bool = False
) -> tuple[list[float], float]:
    """Seconds of `steps` steps of a train() run after the warm-up steps, and of its first step.

    Step times are the gaps between progress events; the first step is timed from the start event.
    """
    from difftune.config import load_config
    from difftune.training.loop import train

    overrides = {"output_dir": str(output_dir), "max_train_steps": str(steps + WARMUP_STEPS + 1)}
    loaded = load_config(config_path, overrides)
    if profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(train, loaded)
        print("\n-- cProfile of one train() run, top 25 by own time --")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    else:
        train(loaded)
    events = common.read_events(output_dir / "events.jsonl")
    start = next(e["time"] for e in events if e["type"] == "start")
    times = [start] + [e["time"] for e in events if e["type"] == "progress"]
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    return gaps[WARMUP_STEPS + 1 :], gaps[0]


def bare_step_times(config_path: Path, steps: int) -> tuple[list[float], float, list[float]]:
    """Seconds of each bare step after the warm-up steps, of the first step, and the losses."""
    from difftune.config import load_config

    loaded = load_config(config_path)
    loop = common.BareLoop(loaded)
    batches = loop.load_batches(loaded, steps + WARMUP_STEPS)
    times, losses = [], []
    for batch in batches:
        with common.stopwatch() as timing:
            losses.append(loop.step(batch))
        times.append(timing["s"])
    return times[WARMUP_STEPS:], times[0], losses


def main() -> None:
    arguments = common.parser(__doc__.splitlines()[0])
    arguments.add_argument("--steps", type=int, default=None, help="timed steps (default 24 quick, 100)")
    arguments.add_argument("--resolution", type=int, default=64, help="image side in px (latents side / 8)")
    arguments.add_argument("--batch-size", type=int, default=2)
    arguments.add_argument("--profile", action="store_true", help="cProfile the timed train() run")
    args = arguments.parse_args()
    common.quiet()
    steps = args.steps or (24 if args.quick else 100)

    from difftune.testing.images import make_image_dataset
    from difftune.testing.runs import build_tiny_model, write_tiny_run

    with tempfile.TemporaryDirectory(prefix="difftune-bench-") as scratch:
        scratch = Path(scratch)
        model = build_tiny_model("sdxl", scratch / "models" / "sdxl")
        side = args.resolution
        make_image_dataset(scratch / "images", n=16, sizes=[(side, side)], seed=0)
        config = write_tiny_run(
            scratch / "run",
            model,
            scratch / "images",
            dataset={**common.DATASET, "resolution": side},
            max_train_steps=steps,
            train_batch_size=args.batch_size,
            **common.RUN,
        )
        with common.stopwatch() as cold:
            difftune_step_times(config, scratch / "run" / "out-cold", 2)  # fills the latent and text caches
        # two rounds of bare then difftune, so load from other processes on the machine hits both alike
        ours, bare, losses, ours_first, bare_first = [], [], [], [], []
        for round_index, round_steps in enumerate((steps // 2, steps - steps // 2)):
            bare_times, first, losses = bare_step_times(config, round_steps)
            bare += bare_times
            bare_first.append(first)
            our_times, first = difftune_step_times(
                config,
                scratch / "run" / f"out-warm-{round_index}",
                round_steps,
                profile=args.profile and round_index == 1,
            )
            ours += our_times
            ours_first.append(first)

    ours_ms, bare_ms = common.median_ms(ours), common.median_ms(bare)
    figures = {
        "difftune_step_ms": ours_ms,
        "bare_step_ms": bare_ms,
        "overhead_ratio": ours_ms / bare_ms,
        "overhead_p20_ratio": common.low_ms(ours) / common.low_ms(bare),
        "difftune_mean_step_ms": 1000 * statistics.fmean(ours),
        "bare_mean_step_ms": 1000 * statistics.fmean(bare),
        "difftune_first_step_ms": 1000 * min(ours_first),
        "bare_first_step_ms": 1000 * min(bare_first),
        "first_run_s": cold["s"],
    }
    notes = {
        "setup": f"tiny SDXL, LoRA rank 4, batch {args.batch_size} at {side}x{side} px, fp32, "
        f"{len(ours)} difftune and {len(bare)} bare steps timed (medians; p20 = 20th percentile), "
        f"{WARMUP_STEPS} warm-up steps each",
        "verdict": "within 10% of bare"
        if ours_ms <= 1.10 * bare_ms
        else "overhead above 10%: run with --profile",
        "bare_loss_last": f"{losses[-1]:.4f}",
    }
    common.report("overhead", figures, notes, save=not args.no_save)


if __name__ == "__main__":
    main()
