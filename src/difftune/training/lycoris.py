"""LyCORIS adapters (LoKr, LoHa, LoCon, full) through the lycoris-lora package.

`attach_lycoris` builds LyCORIS's `LycorisNetwork` on the denoiser from a lycoris_config file, lets
LyCORIS wrap the forward of each matched layer (`apply_to`), and registers the network as the
denoiser's submodule `lycoris`. Its weights are then trainable parameters of the denoiser
("lycoris.<adapter name>.<weight>"), so the optimizer, checkpoints, EMA, DDP, FSDP2 and group
offload treat them as they treat LoRA weights, and validation runs the pipeline with them applied.

The saved pytorch_lora_weights.safetensors is the network's own state dict: keys
"lycoris_<module path, dots as underscores>.<weight>" (`lokr_w1`, `hada_w1_a`, `lora_down.weight`,
`diff`, `alpha`...), the layout that `lycoris.create_lycoris_from_weights` and ComfyUI read. The
lycoris_config it was trained with travels in the file's metadata.
"""

from __future__ import annotations

import copy
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from difftune.config import ConfigError
from difftune.hub import LORA_FILE

if TYPE_CHECKING:
    from difftune.config.lycoris import LycorisSettings

ADAPTER_NAME = "lycoris"  # the network's submodule name on the denoiser
METADATA_KEY = "lycoris_config"
# LycorisNetwork keeps its preset in class attributes; every run starts from these, then applies its
# own apply_preset, so one run's preset never leaks into the next (LyCORIS's defaults).
_PRESET_DEFAULTS = {
    "enable_conv": True,
    "target_module": ["Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm"],
    "target_name": [],
    "module_algo_map": {},
    "name_algo_map": {},
    "lora_prefix": "lycoris",
    "use_fnmatch": False,
    "exclude_name": [],
}


@contextmanager
def _quiet_lycoris():
    """LyCORIS logs every module it creates; what a run needs to know goes through the event bus."""
    logger = logging.getLogger("LyCORIS")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def apply_preset(settings: LycorisSettings) -> None:
    """Set LycorisNetwork's class-level preset: LyCORIS's defaults, then the file's apply_preset."""
    from lycoris import LycorisNetwork

    preset = dict(_PRESET_DEFAULTS)
    if settings.apply_preset is not None:
        given = settings.apply_preset.model_dump(exclude_none=True)
        for name in ("module_algo_map", "name_algo_map"):
            given[name] = {
                key: override.model_dump(exclude_none=True)
                for key, override in getattr(settings.apply_preset, name).items()
            }
        preset.update(given)
    LycorisNetwork.apply_preset(preset)


def attach_lycoris(
    denoiser: torch.nn.Module, settings: LycorisSettings, source: str, quantised: bool = False
) -> list[str]:
    """Wrap the layers the lycoris_config selects; only the network trains, in fp32. Returns warnings.

    `quantised`: the base weights are quantised, which LyCORIS can only wrap in bypass mode
    (x -> W x + dW x), so bypass_mode is set. Raises ConfigError, naming `source` and the key, when
    the file's targets match no layer of this denoiser.
    """
    from lycoris import FullModule, LycorisNetwork

    apply_preset(settings)
    arguments = settings.network_arguments()
    device = next(denoiser.parameters()).device
    with _quiet_lycoris():
        network = LycorisNetwork(
            denoiser,
            multiplier=arguments["multiplier"],
            lora_dim=arguments["linear_dim"],
            alpha=arguments["linear_alpha"],
            conv_lora_dim=arguments.get("conv_dim", arguments["linear_dim"]),
            conv_alpha=arguments.get("conv_alpha", arguments["linear_alpha"]),
            dropout=arguments["dropout"],
            rank_dropout=arguments["rank_dropout"],
            module_dropout=arguments["module_dropout"],
            use_tucker=arguments["use_tucker"],
            use_scalar=arguments["use_scalar"],
            network_module=arguments["algo"],
            train_norm=arguments["train_norm"],
            decompose_both=arguments["decompose_both"],
            factor=arguments["factor"],
            weight_decompose=arguments["dora_wd"],
            wd_on_out=arguments["wd_on_output"],
            full_matrix=arguments["full_matrix"],
            bypass_mode=True if quantised else arguments.get("bypass_mode"),
            unbalanced_factorization=arguments["unbalanced_factorization"],
            warn_on_unmatched=False,
        )
    if not network.loras:
        raise ConfigError(_no_match_message(denoiser, source))
    warnings = _unmatched_targets(denoiser, source)
    with _quiet_lycoris():
        network.apply_to()
    network.to(device)
    for parameter in network.parameters():
        parameter.data = parameter.data.to(torch.float32)
        parameter.requires_grad_(True)
    denoiser.add_module(ADAPTER_NAME, network)
    for lora in network.loras:
        if isinstance(lora, FullModule):  # trains the layer's whole weight
            _match_input_dtype(lora)
    return warnings


def _match_input_dtype(lora: torch.nn.Module) -> None:
    """Let a full-weight layer (fp32 trained weight) take and give the base's dtype outside autocast.

    LyCORIS's FullModule multiplies its input by its own weight as it is; a bf16 pipeline (validation)
    would hand it bf16 activations. Outside autocast the input is cast to the weight's dtype and the
    output back to the input's; under autocast (training) nothing changes.
    """
    layer = lora.org_module[0]
    given: list[torch.dtype] = []

    def before(_layer, args):
        if torch.is_autocast_enabled(args[0].device.type) or args[0].dtype == lora.weight.dtype:
            return None
        given.append(args[0].dtype)
        return (args[0].to(lora.weight.dtype), *args[1:])

    def after(_layer, _args, output):
        return output.to(given.pop()) if given else None

    layer.register_forward_pre_hook(before)
    layer.register_forward_hook(after)


def check_targets(denoiser: torch.nn.Module, settings: LycorisSettings, source: str) -> None:
    """Raise ConfigError when the file's apply_preset selects no module of this denoiser: no targeted
    class is present and no target name matches. Cheap; runs before the caches are filled."""
    import fnmatch
    import re

    preset = settings.apply_preset
    classes = set(_PRESET_DEFAULTS["target_module"])
    patterns: list[str] = []
    if preset is not None:
        classes = {
            *(preset.target_module if preset.target_module is not None else classes),
            *preset.module_algo_map,
        }
        patterns = [*(preset.target_name or []), *preset.name_algo_map]
    if any(type(module).__name__ in classes for module in denoiser.modules()):
        return
    match = fnmatch.fnmatch if preset is not None and preset.use_fnmatch else lambda n, p: re.match(p, n)
    if any(match(name, pattern) for name, _ in denoiser.named_modules() for pattern in patterns):
        return
    raise ConfigError(_no_match_message(denoiser, source))


def _no_match_message(denoiser: torch.nn.Module, source: str) -> str:
    return (
        f"{source}: 'apply_preset' selects no layer of {type(denoiser).__name__}; its classes "
        f"with Linear layers are {', '.join(_adaptable_classes(denoiser))}: name some of them "
        "in apply_preset.target_module"
    )


def _adaptable_classes(denoiser: torch.nn.Module) -> list[str]:
    """Class names of the modules that hold Linear layers directly (what target_module can name)."""
    names = {
        type(module).__name__
        for module in denoiser.modules()
        if any(isinstance(child, torch.nn.Linear) for child in module.children())
    }
    return sorted(names)


def _unmatched_targets(denoiser: torch.nn.Module, source: str) -> list[str]:
    from lycoris import LycorisNetwork

    present = {type(module).__name__ for module in denoiser.modules()}
    wanted = [*LycorisNetwork.TARGET_REPLACE_MODULE, *LycorisNetwork.MODULE_ALGO_MAP]
    missing = sorted(
        {name for name in wanted if name not in present} - set(_PRESET_DEFAULTS["target_module"])
    )
    if not missing:
        return []
    return [
        f"{source}: apply_preset names {', '.join(missing)}, which {type(denoiser).__name__} does not "
        "have; those entries adapt nothing"
    ]


def lycoris_network(model: torch.nn.Module) -> torch.nn.Module:
    """The LycorisNetwork that attach_lycoris registered on `model`."""
    return model.get_submodule(ADAPTER_NAME)


def lycoris_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The network's weights in LyCORIS's key layout, detached, on the CPU."""
    state = lycoris_network(model).state_dict()
    return {key: value.detach().contiguous().cpu() for key, value in state.items()}


def save_lycoris(output_dir: Path, state: dict[str, torch.Tensor], settings_path: str) -> Path:
    """Write output_dir/pytorch_lora_weights.safetensors with the lycoris_config in its metadata."""
    from safetensors.torch import save_file

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LORA_FILE
    metadata = {METADATA_KEY: json.dumps(json.loads(Path(settings_path).read_text(encoding="utf-8-sig")))}
    save_file(state, str(path), metadata=metadata)
    return path


def lycoris_from_full_state(
    model: torch.nn.Module, full_state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """lycoris_state_dict of a sharded (FSDP2) model, from its gathered trainable weights.

    Each adapter module is read through a shallow copy that holds the full tensors instead of its
    shards, so LyCORIS's own state_dict (alpha, scalar products, full-weight differences) writes the file.
    """
    network = lycoris_network(model)
    prefix = f"{ADAPTER_NAME}."
    tensors = {key.removeprefix(prefix): value for key, value in full_state.items() if key.startswith(prefix)}
    state = _with_tensors(network, tensors).state_dict()
    return {key: value.detach().contiguous().cpu() for key, value in state.items()}


def _with_tensors(
    module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str = ""
) -> torch.nn.Module:
    """A shallow copy of `module` (and its children) whose parameters are the named tensors."""
    clone = copy.copy(module)
    clone._parameters = {
        name: None if param is None else tensors.get(prefix + name, param)
        for name, param in module._parameters.items()
    }
    clone._modules = {
        name: None if child is None else _with_tensors(child, tensors, f"{prefix}{name}.")
        for name, child in module._modules.items()
    }
    return clone


@contextmanager
def lycoris_strength(model: torch.nn.Module, strength: float):
    """Run the block with every LyCORIS module's multiplier at `strength` (validation_lycoris_strength),
    then restore the trained multiplier."""
    network = lycoris_network(model)
    trained = network.multiplier
    network.set_multiplier(strength)
    try:
        yield model
    finally:
        network.set_multiplier(trained)
