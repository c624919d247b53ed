"""Settings for the whole test suite, applied before any test module imports torch, and tiny models of
every registered family, built once per session (saved diffusers folders, loaded through the real path)
and loaded once per session for the tests that only use the loaded parts."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


@pytest.fixture(scope="session")
def tiny_components(tiny_model) -> Callable[..., Any]:
    """tiny_components(family, fresh_denoiser=False, **options) -> the `Components` of
    tiny_model(family, **options), loaded through the family's `load` (float32, CPU) on first use
    and shared by the session, so a test must not change their modules. Each call gets its own copy
    of the scheduler (pipelines set its timesteps), and with fresh_denoiser=True its own copy of the
    denoiser, to train or to load an adapter into. The families' own load tests load from disk."""
    loaded: dict[tuple, Any] = {}

    def load(family: str, *, fresh_denoiser: bool = False, **options):
        import torch

        from difftune.config.schema import TrainConfig
        from difftune.families import get_family

        key = (family, tuple(sorted(options.items())))
        if key not in loaded:
            folder = tiny_model(family, **options)
            config = TrainConfig(model_family=family, pretrained_model_name_or_path=str(folder))
            loaded[key] = get_family(config).load(torch.device("cpu"), torch.float32)
        shared = loaded[key]
        denoiser = copy.deepcopy(shared.denoiser) if fresh_denoiser else shared.denoiser
        return dataclasses.replace(shared, denoiser=denoiser, scheduler=copy.deepcopy(shared.scheduler))

    return load
