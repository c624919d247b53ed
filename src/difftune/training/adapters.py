"""LoRA / DoRA adapters through peft: attach to a denoiser, read out, export to the ComfyUI layout.

Saved weights use peft's key names under the denoiser's prefix (the family's adapter_prefix:
"<prefix>.<module>.lora_A.weight", "lora_B", DoRA's "lora_magnitude_vector"), which the diffusers
pipelines' `load_lora_weights` read as they are; the LoraConfig (rank, alpha, targets) travels in
the file's metadata.

The ComfyUI / kohya layout names each wrapped module "lora_unet_<module path, dots as underscores>"
with ".lora_down.weight" (= lora_A), ".lora_up.weight" (= lora_B), ".alpha" (a scalar tensor, the
trained lora_alpha) and, for DoRA, ".dora_scale" (one value per output feature, shaped (out, 1)).
"lora_unet" is the layout's name for the denoiser of every family, UNet or transformer; ComfyUI maps
the diffusers module names of each family it knows, and diffusers reads the layout back through its
non-diffusers LoRA converter. Text-encoder weights (train_text_encoder) take the names the family
gives them (`Family.kohya_text_encoders`), e.g. "lora_te1_text_model_encoder_layers_0_self_attn_q_proj".

DoRA: peft scales the adapted weight W + dW by m / ||W + dW|| (row norms), while ComfyUI scales it by
dora_scale / ||W|| when dora_scale has one value per output row; the export therefore writes
dora_scale = m * ||W|| / ||W + dW||, computed from the base weights (`comfyui_dora_scales`).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from collections.abc import Mapping

    from difftune.config.schema import TrainConfig
    from difftune.families.base import Family, KohyaTextEncoder

ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # where diffusers stores the LoraConfig in safetensors
DENOISER_NAME = "lora_unet"  # the ComfyUI / kohya layout's name for the denoiser, whatever the family
_PEFT_SUFFIXES = {
    ".lora_A.weight": ".lora_down.weight",
    ".lora_B.weight": ".lora_up.weight",
    ".lora_magnitude_vector": ".dora_scale",
}


def attach_lora(denoiser: torch.nn.Module, family: Family, config: TrainConfig) -> None:
    """Wrap the family's target modules in a LoRA (DoRA with use_dora); only the adapter trains, in fp32.

    Uses lora_rank, lora_alpha (default: the rank), lora_dropout and use_dora; peft's gaussian init
    (A random, B zero) so the wrapped model starts equal to the base model.
    """
    from peft import LoraConfig

    lora_config = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.effective_lora_alpha,
        lora_dropout=config.lora_dropout,
        use_dora=config.use_dora,
        init_lora_weights="gaussian",
        target_modules=family.lora_targets(),
    )
    add_lora_adapter(denoiser, lora_config)
    for parameter in denoiser.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.to(torch.float32)


def add_lora_adapter(model: torch.nn.Module, lora_config) -> None:
    """The model's `add_adapter(lora_config)` (peft), without the notice peft's LoRA layer on a
    torchao-quantised base gives that its merge() would need the quantisation recipe: difftune never
    merges a LoRA into a quantised base (the adapter is saved on its own), so no one has to act on it."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"TorchaoLoraLinear was instantiated without `get_apply_tensor_subclass`"
        )
        model.add_adapter(lora_config)


def lora_state_dict(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights with peft's key names (no adapter name, no family prefix), detached."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(denoiser)
    return {key: value.detach().contiguous() for key, value in state.items()}


def _read_lora_file(lora_file: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Tensors and each part's LoraConfig metadata: {"<prefix>": {...}, "text_encoder": {...}}, by the
    "<part>." prefix the file's keys and metadata carry."""
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(lora_file), framework="pt") as handle:
        metadata = handle.metadata() or {}
        for key in handle.keys():
            tensors[key] = handle.get_tensor(key)
    configs: dict[str, dict] = {}
    for key, value in json.loads(metadata.get(ADAPTER_METADATA_KEY, "{}")).items():
        part, _, name = key.partition(".")
        configs.setdefault(part, {})[name] = value
    return tensors, configs


def _module_alpha(module: str, rank: int, config: dict) -> float:
    """lora_alpha of one module: alpha_pattern match, else lora_alpha, else its rank (diffusers' default)."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", module):
            return float(alpha)
    return float(config.get("lora_alpha", rank))


@torch.no_grad()
def comfyui_dora_scales(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    """ComfyUI's dora_scale of every DoRA-wrapped module (name -> (out, 1) tensor): m * ||W|| / ||W + dW||."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_module_weight

    scales = {}
    for name, module in denoiser.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter, magnitude in module.lora_magnitude_vector.items():
            base = dequantize_module_weight(module.get_base_layer()).float().flatten(1)
            adapted = base + module.get_delta_weight(adapter).float().flatten(1)
            ratio = base.norm(dim=1) / adapted.norm(dim=1)
            scales[name] = (magnitude.weight.detach().float() * ratio).reshape(-1, 1).cpu()
    return scales


def export_comfyui(
    lora_file: Path,
    out_file: Path,
    prefix: str,
    text_encoders: Mapping[str, KohyaTextEncoder] | None = None,
    dora_scales: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Rewrite a pytorch_lora_weights.safetensors in the ComfyUI / kohya key layout; returns out_file.

    `prefix` is the key prefix of the denoiser's weights in the file (`Family.adapter_prefix`), exported
    as "lora_unet_"; the text encoders' as `text_encoders` (`Family.kohya_text_encoders`) name them.
    A DoRA file needs `dora_scales` (from `comfyui_dora_scales` of the trained denoiser), since
    ComfyUI's DoRA normalisation needs the base weights' norms.
    """
    from safetensors.torch import save_file

    lora_file, out_file = Path(lora_file), Path(out_file)
    tensors, configs = _read_lora_file(lora_file)
    encoders = dict(text_encoders or {})
    names = {prefix: DENOISER_NAME} | {part: encoder.name for part, encoder in encoders.items()}
    exported: dict[str, torch.Tensor] = {}
    ranks: set[int] = set()
    for key, value in tensors.items():
        part, _, module_key = key.partition(".")
        if part not in names:
            raise ValueError(
                f"{lora_file}: key '{key}' belongs to no part the ComfyUI export knows ({', '.join(names)}); "
                "export needs a file written by save_lora"
            )
        suffix = next((s for s in _PEFT_SUFFIXES if module_key.endswith(s)), None)
        if suffix is None:
            raise ValueError(
                f"{lora_file}: key '{key}' is not a peft LoRA weight (lora_A / lora_B / "
                "lora_magnitude_vector); export needs a file written by save_lora"
            )
        module = module_key[: -len(suffix)]
        root = "" if part == prefix else encoders[part].module_root
        path = module if module.startswith(root) else root + module
        name = f"{names[part]}_{path.replace('.', '_')}"
        if suffix == ".lora_magnitude_vector":
            if part != prefix or dora_scales is None or module not in dora_scales:
                raise ValueError(
                    f"{lora_file}: '{key}' is a DoRA magnitude; exporting it for ComfyUI needs the trained "
                    "model's dora_scales (comfyui_dora_scales), which save_final_weights passes"
                )
            value = dora_scales[module]
        exported[name + _PEFT_SUFFIXES[suffix]] = value.contiguous()
        if suffix == ".lora_A.weight":
            rank = value.shape[0]
            ranks.add(rank)
            exported[name + ".alpha"] = torch.tensor(_module_alpha(module, rank, configs.get(part, {})))
    if not ranks:
        raise ValueError(f"{lora_file}: no LoRA weights (lora_A) found to export")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max(ranks)),
        "ss_network_alpha": str(configs.get(prefix, {}).get("lora_alpha", max(ranks))),
    }
    save_file(exported, str(out_file), metadata=metadata)
    return out_file
