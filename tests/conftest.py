"""Settings for the whole test suite, applied before any test module imports torch."""

from difftune.threads import choose_cpu_threads

# Idle OpenMP workers sleep instead of spinning, so tests stay fast on a busy machine; the
# training subprocesses that tests start inherit the same settings.
choose_cpu_threads()
