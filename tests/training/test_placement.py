"""Which device and precision a run trains with: CUDA, else Apple's mps, else the CPU."""

import pytest
import torch

from difftune.config.schema import TrainConfig
from difftune.training.setup import Placement, choose_placement, weight_dtype_for

MPS = torch.device("mps")


@pytest.fixture()
def machine(monkeypatch):
    """machine(cuda=..., mps=..., macos14=...): what torch reports about the hardware."""

    def set_up(cuda=False, mps=False, macos14=True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: macos14)

    return set_up


def config(mixed_precision):
    return TrainConfig(model_family="sdxl", mixed_precision=mixed_precision)


@pytest.mark.parametrize("mixed", ["bf16", "no"])
def test_apple_silicon_trains_on_mps_with_the_asked_precision_on_macos_14(machine, mixed):
    machine(mps=True, macos14=True)
    placement = choose_placement(mixed)
    assert (placement.device, placement.mixed_precision, placement.note) == ("mps", mixed, None)
    assert weight_dtype_for(config(mixed), MPS) == (torch.bfloat16 if mixed == "bf16" else torch.float32)


def test_mps_without_bf16_trains_in_fp32_and_says_so(machine):
    machine(mps=True, macos14=False)
    placement = choose_placement("bf16")
    assert (placement.device, placement.mixed_precision) == ("mps", "no")
    assert "macOS 14" in placement.note and "fp32" in placement.note
    assert weight_dtype_for(config("bf16"), MPS) == torch.float32


def test_fp16_on_mps_becomes_bf16(machine):
    machine(mps=True, macos14=True)
    placement = choose_placement("fp16")
    assert (placement.device, placement.mixed_precision) == ("mps", "bf16") and "fp16" in placement.note
    assert weight_dtype_for(config("fp16"), MPS) == torch.bfloat16


def test_cuda_wins_over_mps_and_keeps_fp16(machine):
    machine(cuda=True, mps=True)
    assert choose_placement("fp16") == Placement("cuda", "fp16")
    assert weight_dtype_for(config("fp16"), torch.device("cuda")) == torch.float16


def test_without_a_gpu_the_cpu_trains_and_fp16_becomes_bf16(machine):
    machine()
    assert choose_placement("bf16").device == "cpu"
    placement = choose_placement("fp16")
    assert (placement.device, placement.mixed_precision) == ("cpu", "bf16") and placement.note
