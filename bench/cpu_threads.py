"""CPU thread settings under load: a tiny training-step loop beside CPU burners, with and without them.

Each setting runs in its own process (OpenMP reads its settings when torch loads), while `--burners`
busy-loop processes compete for the cores; every burner stops itself after its deadline and is
stopped at the end of its setting in any case. Settings:

- `default`: OMP_WAIT_POLICY and OMP_NUM_THREADS unset (torch's defaults: spinning workers, one per core)
- `passive`: OMP_WAIT_POLICY=PASSIVE, one thread per core
- `chosen`: what `difftune.threads.choose_cpu_threads` sets (what `difftune` and the tests use)
- `one`: OMP_WAIT_POLICY=PASSIVE, OMP_NUM_THREADS=1

Figures: ms per step (median and 20th percentile), the share of slow steps (over twice the quiet
median), CPU seconds per step, and each setting's ratio to `default` (lower is better).

    python bench/cpu_threads.py --quick            # --seconds 20 --burners 2 --settings default chosen
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import common  # noqa: E402

SETTINGS = ("default", "passive", "chosen", "one")
OMP_KEYS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def setting_environment(name: str) -> dict[str, str]:
    """The child's environment for a setting: the user's, without OpenMP variables, plus the setting's."""
    from difftune.threads import available_cores, choose_cpu_threads

    env = {k: v for k, v in os.environ.items() if k not in OMP_KEYS}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent / "src")
    if name == "passive":
        env.update(OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(available_cores()))
    elif name == "chosen":
        choose_cpu_threads(env)
    elif name == "one":
        env.update(OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    return env


def burn(seconds: float) -> None:
    """Busy-loop for `seconds`, then exit (a burner never outlives its deadline)."""
    deadline = time.monotonic() + seconds
    count = 0
    while time.monotonic() < deadline:
        count += 1


def child(seconds: float, resolution: int) -> None:
    """Run the tiny step loop for about `seconds`; print the step times and CPU seconds as JSON."""
    import resource

    import torch

    from difftune.testing.sdxl import POOLED_DIM, TEXT_HIDDEN, tiny_sdxl_unet

    unet = tiny_sdxl_unet()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    side = resolution // 8
    batch = 2
    conditioning = {
        "text_embeds": torch.randn(batch, POOLED_DIM, generator=generator),
        "time_ids": torch.tensor(
            [[resolution, resolution, 0, 0, resolution, resolution]] * batch, dtype=torch.float32
        ),
    }
    text = torch.randn(batch, 8, 2 * TEXT_HIDDEN, generator=generator)

    def step() -> None:
        latents = torch.randn(batch, 4, side, side, generator=generator)
        timesteps = torch.randint(0, 1000, (batch,), generator=generator)
        prediction = unet(latents, timesteps, text, added_cond_kwargs=conditioning).sample
        loss = torch.nn.functional.mse_loss(prediction, latents)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    times = []
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    print(json.dumps({"times": times, "cpu_s": cpu, "threads": torch.get_num_threads()}))


def measure(name: str, seconds: float, burners: int, resolution: int) -> dict[str, float]:
    """One setting's step times with `burners` busy loops beside it."""
    script = str(Path(__file__).resolve())
    guard = (
        seconds + 900
    )  # a burner's own deadline: the child's import and warm-up on a loaded machine included
    started = [
        subprocess.Popen([sys.executable, script, "--burn", str(guard)], stdout=subprocess.DEVNULL)
        for _ in range(burners)
    ]
    try:
        done = subprocess.run(
            [sys.executable, script, "--child", str(seconds), "--resolution", str(resolution)],
            env=setting_environment(name),
            capture_output=True,
            text=True,
            timeout=guard,
        )
    finally:
        for burner in started:
            burner.terminate()
        for burner in started:
            burner.wait()
    if done.returncode != 0:
        raise SystemExit(f"{name}: the step loop failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    times = result["times"]
    return {
        "median_ms": common.median_ms(times),
        "p20_ms": common.low_ms(times),
        "cpu_s_per_step": result["cpu_s"] / len(times),
        "steps": len(times),
        "threads": result["threads"],
        "times": times,
    }


def main() -> None:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=None, help="step-loop seconds per setting")
    parser.add_argument("--burners", type=int, default=None, help="busy loops beside the step loop")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--child", type=float, help=argparse_hidden())
    parser.add_argument("--burn", type=float, help=argparse_hidden())
    args = parser.parse_args()
    if args.burn is not None:
        burn(args.burn)
        return
    if args.child is not None:
        child(args.child, args.resolution)
        return
    from difftune.threads import available_cores

    seconds = args.seconds or (15.0 if args.quick else 40.0)
    burners = available_cores() if args.burners is None else args.burners
    quiet = measure("one", min(seconds, 5.0), 0, args.resolution)  # what a step costs without competition
    slow_limit = 2 * quiet["median_ms"] / 1000
    figures: dict[str, float] = {"quiet_step_ms": round(quiet["median_ms"], 2)}
    results = {name: measure(name, seconds, burners, args.resolution) for name in args.settings}
    notes = {"burners": burners, "seconds_per_setting": seconds, "resolution": args.resolution}
    for name, result in results.items():
        slow = sum(t > slow_limit for t in result["times"]) / len(result["times"])
        figures[f"{name}_step_ms"] = round(result["median_ms"], 2)
        figures[f"{name}_p20_ms"] = round(result["p20_ms"], 2)
        figures[f"{name}_cpu_s_per_step_s"] = round(result["cpu_s_per_step"], 4)
        figures[f"{name}_slow_step_share"] = round(slow, 3)
        notes[f"{name}_threads"] = result["threads"]
        notes[f"{name}_steps"] = result["steps"]
    if "default" in results:
        for name in results:
            if name != "default":
                figures[f"{name}_vs_default_ratio"] = round(
                    results[name]["median_ms"] / results["default"]["median_ms"], 3
                )
    common.report("cpu_threads", figures, notes, save=not args.no_save)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
