"""bench/gpu_families.py: FLOPs counted on the meta device, and every setting runs at tiny size."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import gpu_families  # noqa: E402


@pytest.mark.parametrize("case", list(gpu_families.CASES))
def test_flops_counted_on_meta_equal_those_of_a_real_run(case):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # the full-size counts come from the meta device; at tiny size both can be run and must agree.
    # The CPU's fused attention kernel is not one the counter knows (the GPU's are), so the real run
    # takes the math path, whose matrix products the counter sees.
    meta = gpu_families.count_flops(gpu_families.CASES[case], tiny=True, device="meta")
    with sdpa_kernel(SDPBackend.MATH):
        real = gpu_families.count_flops(gpu_families.CASES[case], tiny=True, device="cpu")
    assert meta == real > 0


def test_backward_counts_input_gradients_of_frozen_layers_and_both_gradients_of_lora():
    from peft import LoraConfig, inject_adapter_in_model
    from torch.utils.flop_counter import FlopCounterMode

    rows, width, out, rank = 8, 32, 16, 4
    model = torch.nn.Sequential(
        torch.nn.Linear(width, width, bias=False), torch.nn.Linear(width, out, bias=False)
    )
    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, target_modules=["1"]), model)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(rows, width)).square().sum().backward()
    forward = (
        2 * rows * width * width + 2 * rows * width * out + 2 * rows * width * rank + 2 * rows * rank * out
    )
    # lora_B: weight and input gradients; lora_A: weight gradient only (its input needs none); the
    # frozen layers: nothing, since neither their weights nor their inputs need a gradient
    backward = 2 * rows * rank * out * 2 + 2 * rows * width * rank
    assert counter.get_total_flops() == forward + backward


@pytest.mark.parametrize("setting", ["bf16", "int8+group-offload"])
def test_each_setting_runs_a_step_at_tiny_size(setting):
    figures = gpu_families.measure(
        gpu_families.CASES["k5-video-lite"], setting, batch=1, steps=1, tiny=True, device=torch.device("cpu")
    )
    assert figures["step_ms"] > 0 and 0 <= figures["outside_denoiser_share"] < 1
