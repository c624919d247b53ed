"""Memory features the trainer switches on from the config: quantisation, offload, gradient
checkpointing, attention backend and VAE tiling/slicing/patched 3D convolutions.

Quantisation lives in memory_quant.py and offloading in memory_offload.py; both are re-exported here
so callers import everything from `difftune.training.memory`.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from difftune.training.memory_offload import (
    apply_offload,
    enable_group_offload,
    group_offload_hooks,
    group_residencies,
    offload_when_idle,
    resident,
)
from difftune.training.memory_quant import (
    DEFAULT_EXCLUDE,
    fp8_supported,
    is_quantized,
    quantize_module,
    resident_weight_bytes,
    warn_once,
)

if TYPE_CHECKING:
    from difftune.config.schema import TrainConfig

__all__ = [
    "DEFAULT_EXCLUDE",
    "apply_offload",
    "configure_vae",
    "enable_checkpointing",
    "enable_group_offload",
    "fp8_supported",
    "group_offload_hooks",
    "group_residencies",
    "is_quantized",
    "offload_when_idle",
    "patch_conv3d",
    "quantize_module",
    "resident",
    "resident_weight_bytes",
    "set_attention_backend",
]

# ---------------------------------------------------------------------------------------------
# gradient checkpointing


class _EveryNth:
    """diffusers gradient_checkpointing_func that checkpoints only every `interval`-th block.

    Blocks are numbered in the order of their first call (fixed by the model's forward), so the
    same blocks are checkpointed on every step; block 0, N, 2N, ... recompute, the rest keep
    their activations.
    """

    def __init__(self, interval: int):
        self.interval = interval
        self.index: dict[int, int] = {}

    def __call__(self, block, *args):
        position = self.index.setdefault(id(block), len(self.index))
        if position % self.interval:
            return block(*args)
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)


def enable_checkpointing(denoiser: torch.nn.Module, interval: int | None = None) -> bool:
    """Gradient checkpointing through diffusers; `interval` N > 1 checkpoints only every N-th block.

    Returns False (with one warning) for a model without diffusers checkpointing support.
    """
    if not getattr(denoiser, "_supports_gradient_checkpointing", False):
        warn_once(
            f"ckpt:{type(denoiser).__name__}",
            f"gradient_checkpointing: {type(denoiser).__name__} does "
            "not support it; training without checkpointing",
        )
        return False
    if interval is None or interval <= 1:
        denoiser.enable_gradient_checkpointing()
    else:
        denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=_EveryNth(interval))
    return True


# ---------------------------------------------------------------------------------------------
# attention backend

# config attention_mechanism -> (python package that must be importable, diffusers backend name)
ATTENTION_BACKENDS = {
    "flash": ("flash_attn", "flash"),
    "sageattention": ("sageattention", "sage"),
    "xformers": ("xformers", "xformers"),
}


def set_attention_backend(model: torch.nn.Module, name: str) -> str:
    """Select the attention kernel of `model`; returns the one in use ('sdpa' or `name`).

    `sdpa`/`diffusers` keep torch's scaled_dot_product_attention (the diffusers default). flash,
    sageattention and xformers are used only when their package is installed and the device is CUDA;
    otherwise one warning and sdpa stays.
    """
    if name in ("sdpa", "diffusers"):
        return "sdpa"
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attention_mechanism '{name}' is unknown; use sdpa, flash, sageattention or xformers"
        )
    package, backend = ATTENTION_BACKENDS[name]
    if importlib.util.find_spec(package) is None or not torch.cuda.is_available():
        why = (
            f"the {package} package is not installed"
            if importlib.util.find_spec(package) is None
            else "it needs a CUDA GPU"
        )
        warn_once(f"attn:{name}", f"attention_mechanism '{name}': {why}; keeping sdpa")
        return "sdpa"
    try:
        if name == "xformers" and hasattr(model, "enable_xformers_memory_efficient_attention"):
            model.enable_xformers_memory_efficient_attention()
        else:
            model.set_attention_backend(backend)
    except (AttributeError, ValueError, RuntimeError, ImportError) as error:
        warn_once(
            f"attn:{name}:{type(model).__name__}",
            f"attention_mechanism '{name}' could not be set on "
            f"{type(model).__name__} ({error}); keeping sdpa",
        )
        return "sdpa"
    return name


# ---------------------------------------------------------------------------------------------
# VAE memory


def configure_vae(vae: torch.nn.Module | None, config: TrainConfig, chunk_frames: int = 8) -> list[str]:
    """Apply vae_enable_tiling / vae_enable_slicing / vae_enable_patch_conv; returns what was enabled."""
    enabled: list[str] = []
    if vae is None:
        return enabled
    for key, method in (("vae_enable_tiling", "enable_tiling"), ("vae_enable_slicing", "enable_slicing")):
        if not getattr(config, key):
            continue
        if hasattr(vae, method):
            getattr(vae, method)()
            enabled.append(method)
        else:
            warn_once(
                f"{key}:{type(vae).__name__}", f"{key}: {type(vae).__name__} has no {method}(); ignored"
            )
    if config.vae_enable_patch_conv:
        count = patch_conv3d(vae, chunk_frames)
        if count:
            enabled.append(f"patch_conv({count})")
        else:
            warn_once(
                "vae_enable_patch_conv",
                f"vae_enable_patch_conv: {type(vae).__name__} has no Conv3d "
                "layers (a 2D VAE); nothing to patch",
            )
    return enabled


def patch_conv3d(module: torch.nn.Module, chunk_frames: int = 8) -> int:
    """Make every zero-padded Conv3d in `module` run in chunks of `chunk_frames` output frames.

    The input (B, C, T, H, W) is zero-padded in time once, then each chunk of outputs reads the
    input frames it needs (kernel - 1 frames of overlap, times dilation; stride respected), so
    the result equals the unchunked convolution while the convolution's workspace is bounded by
    the chunk. The VAE's own tiling cuts space and time with blending, which changes the output;
    chunking the convolutions does not. Returns the number of convolutions patched.
    """
    count = 0
    for conv in module.modules():
        if (
            type(conv) is torch.nn.Conv3d
            and conv.padding_mode == "zeros"
            and not hasattr(conv, "_chunk_frames")
        ):
            conv._chunk_frames = chunk_frames
            conv.forward = _chunked_conv3d.__get__(conv)
            count += 1
    return count


def _chunked_conv3d(conv: torch.nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    if isinstance(conv.padding, str):  # 'same'/'valid': let torch work out the padding
        return conv._conv_forward(x, conv.weight, conv.bias)
    pad_t, pad_h, pad_w = conv.padding
    stride_t = conv.stride[0]
    reach = (conv.kernel_size[0] - 1) * conv.dilation[0] + 1  # input frames one output frame reads
    frames_in = x.shape[2] + 2 * pad_t
    frames_out = (frames_in - reach) // stride_t + 1
    if frames_out <= conv._chunk_frames:
        return conv._conv_forward(x, conv.weight, conv.bias)
    if pad_t:
        x = F.pad(x, (0, 0, 0, 0, pad_t, pad_t))
    outputs = []
    for first in range(0, frames_out, conv._chunk_frames):
        last = min(first + conv._chunk_frames, frames_out)  # outputs [first, last)
        piece = x[:, :, first * stride_t : (last - 1) * stride_t + reach]
        outputs.append(
            F.conv3d(
                piece, conv.weight, conv.bias, conv.stride, (0, pad_h, pad_w), conv.dilation, conv.groups
            )
        )
    return torch.cat(outputs, dim=2)
