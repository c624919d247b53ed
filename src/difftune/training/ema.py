"""Exponential moving average of the trained weights (config keys use_ema, ema_decay, ema_device).

Only parameters with requires_grad are averaged (the LoRA weights, or the whole denoiser for full
training), in fp32, on the CPU or on the accelerator. At every update (after every optimizer step, or
every ema_update_interval steps):
    ema = d * ema + (1 - d) * weight,   d = min(ema_decay, (1 + n) / (10 + n))
where n counts the updates made before this one. The warm-up term keeps early averages close to the
recent weights instead of the untrained start (the usual EMA warm-up of diffusion trainers).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

DEFAULT_EMA_DECAY = 0.995


class EMAModel:
    """Shadow copy of a model's trainable parameters, keyed by parameter name."""

    def __init__(
        self, model: torch.nn.Module, decay: float = DEFAULT_EMA_DECAY, device: str | torch.device = "cpu"
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}; 0.995 is a common choice")
        self.decay = float(decay)
        self.device = _resolve_device(device, model)
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: param.detach().to(self.device, dtype=torch.float32, copy=True)
            for name, param in _trainable(model)
        }
        if not self.shadow:
            raise ValueError(
                "EMA found no trainable parameters (requires_grad) in the model; make the "
                "model trainable (attach the adapter) before creating the EMA"
            )

    def current_decay(self) -> float:
        """The decay the next update uses: the warm-up term until it reaches `decay`."""
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One EMA step from the model's current weights."""
        weight = 1.0 - self.current_decay()
        for name, param in _trainable(model):
            shadow = self.shadow.get(name)
            if shadow is None:
                raise KeyError(f"EMA has no parameter named {name!r}; was the EMA created for another model?")
            shadow.lerp_(param.detach().to(self.device, dtype=torch.float32), weight)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Write the averaged weights into the model's trainable parameters (in their dtype and device)."""
        for name, param in _trainable(model):
            param.copy_(self.shadow[name].to(param.device, dtype=param.dtype))

    @contextmanager
    def averaged(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Swap the averaged weights in for the block (e.g. validation), then restore the trained ones."""
        backup = {name: param.detach().to("cpu", copy=True) for name, param in _trainable(model)}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, param in _trainable(model):
                    param.copy_(backup[name].to(param.device))

    def state_dict(self) -> dict[str, Any]:
        """For checkpoints: decay, update count and the shadow tensors (on the CPU)."""
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "shadow": {name: tensor.detach().cpu() for name, tensor in self.shadow.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`; the parameter names must match this model's."""
        missing = sorted(set(self.shadow) - set(state["shadow"]))
        unexpected = sorted(set(state["shadow"]) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(
                f"EMA state does not match the model: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}; was the checkpoint written with another adapter config?"
            )
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for name, tensor in state["shadow"].items():
            self.shadow[name] = tensor.to(self.device, dtype=torch.float32).clone()


def _trainable(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    return ((name, param) for name, param in model.named_parameters() if param.requires_grad)


def _resolve_device(device: str | torch.device, model: torch.nn.Module) -> torch.device:
    """'cpu', 'accelerator' (where the model's weights are) or any torch device."""
    if isinstance(device, str) and device.lower() in ("accelerator", "gpu", "cuda"):
        return next(model.parameters()).device
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"ema_device {device!r} is not 'cpu', 'accelerator' or a torch device") from exc
