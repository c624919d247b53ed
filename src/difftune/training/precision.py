"""Modules a model keeps in fp32 under mixed precision, as its pipeline and its original code run them.

diffusers models list them in `_keep_in_fp32_modules` (such as time embeddings and the modulations
whose outputs scale and shift each block). `from_pretrained(torch_dtype=bf16)` leaves
them in fp32; casting the whole denoiser to the weight dtype, or running it under bf16 autocast,
would compute them in bf16 again. `keep_fp32_modules` undoes both.

A family also names modules the model calls with fp32 inputs (`Family.fp32_weight_modules`, such
as query and key norms); `keep_fp32_weights` keeps their weights fp32 too, so that input and weight
match and the fused kernel runs.
"""

from __future__ import annotations

import functools

import torch


def fp32_module_names(denoiser: torch.nn.Module) -> list[str]:
    """Qualified names of the modules diffusers keeps in fp32 (a path part in `_keep_in_fp32_modules`)."""
    keep = set(getattr(denoiser, "_keep_in_fp32_modules", None) or ())
    names = [name for name, _ in denoiser.named_modules() if name and keep & set(name.split("."))]
    # the outermost matches only: their children follow them
    return [name for name in names if not any(name.startswith(f"{outer}.") for outer in names)]


def keep_fp32_modules(denoiser: torch.nn.Module) -> list[str]:
    """Cast those modules back to fp32 and run their forward outside autocast, with floating inputs in
    fp32 (the output stays fp32; the blocks mix it in as the pipeline does). Returns their names."""
    names = fp32_module_names(denoiser)
    for name in names:
        module = denoiser.get_submodule(name)
        module.to(dtype=torch.float32)
        if not isinstance(module.forward, functools.partial):  # wrapped once, even if called again
            module.forward = functools.partial(_fp32_forward, module.forward)
    return names


def keep_fp32_weights(model: torch.nn.Module, parts: tuple[str, ...]) -> list[str]:
    """Cast the modules with a path part in `parts` to fp32 (their forward unchanged); returns their names."""
    names = [name for name, _ in model.named_modules() if name and set(parts) & set(name.split("."))]
    for name in names:
        model.get_submodule(name).to(dtype=torch.float32)
    return names


def _fp32_forward(forward, *args, **kwargs):
    device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
    with torch.autocast(device_type=device_type, enabled=False):
        args = tuple(_to_fp32(a) for a in args)
        kwargs = {key: _to_fp32(value) for key, value in kwargs.items()}
        return forward(*args, **kwargs)


def _to_fp32(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    return value
