"""Settings for the whole test suite, applied before any test module imports torch, and tiny models of
every registered family, built once per session (saved diffusers folders, loaded through the real path)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from difftune.testing.runs import build_tiny_model  # torch-free until a model is built
from difftune.threads import choose_cpu_threads

# Idle OpenMP workers sleep instead of spinning, so tests stay fast on a busy machine; the
# training subprocesses that tests start inherit the same settings.
choose_cpu_threads()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Callable[..., Path]:
    """tiny_model(family, **options) -> the folder of that family's tiny model (its registry row's
    builder, e.g. i2i=True), built on first use and shared by the whole session."""
    built: dict[tuple, Path] = {}

    def build(family: str, **options) -> Path:
        key = (family, tuple(sorted(options.items())))
        if key not in built:
            built[key] = build_tiny_model(family, tmp_path_factory.mktemp("models") / family, **options)
        return built[key]

    return build


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_model) -> Path:
    return tiny_model("sdxl")


@pytest.fixture(scope="session")
def tiny_k5_image(tiny_model) -> Path:
    return tiny_model("kandinsky5-image")


@pytest.fixture(scope="session")
def tiny_k5_video(tiny_model) -> Path:
    return tiny_model("kandinsky5-video")
