"""CPU thread settings chosen before torch is imported.

OpenMP worker threads that wait for work spin by default (OMP_WAIT_POLICY=ACTIVE in practice). On a
machine where other processes compete for the cores, a spinning idle worker takes a core from the
thread the step waits on, and steps fall into slow stretches. PASSIVE makes idle workers sleep.
On a busy machine the fewest threads are fastest too: every parallel region waits for its slowest
worker, and a worker that lost its core stalls the region (`bench/cpu_threads.py` measures both).

Both settings are read by the OpenMP runtime when torch loads, so they must be in the environment
before `import torch`; what the user set is never changed.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

WAIT_POLICY = "PASSIVE"


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on macOS / Windows
        return max(1, os.cpu_count() or 1)


def default_thread_count(cores: int) -> int:
    """Threads for torch's CPU work when the user has not chosen: one per core this process may use.

    A fixed count, not one that follows the machine's load: runs that should give bit-equal results
    (an interrupted run and its resume) must reduce in the same order, which the thread count decides.
    """
    return max(1, cores)


def choose_cpu_threads(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set OMP_WAIT_POLICY and OMP_NUM_THREADS where they are not set; returns what was set.

    Call before torch is imported (the CLI entry, `python -m difftune`, the test suite's conftest):
    the OpenMP runtime reads these once, when it loads.
    """
    environ = os.environ if environ is None else environ
    chosen: dict[str, str] = {}
    if not environ.get("OMP_WAIT_POLICY"):
        chosen["OMP_WAIT_POLICY"] = WAIT_POLICY
    if not environ.get("OMP_NUM_THREADS"):
        chosen["OMP_NUM_THREADS"] = str(default_thread_count(available_cores()))
    environ.update(chosen)
    return chosen
