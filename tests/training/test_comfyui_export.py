"""The ComfyUI export of every family, read the way ComfyUI reads LoRA files.

ComfyUI (comfy/lora.py, model_lora_keys_unet) maps "lora_unet_<module, dots as underscores>" for SDXL
(through its table of diffusers UNet names) and for Kandinsky 5 (whose module names are diffusers'),
and Kandinsky 5 also "<module>" and "transformer.<module>"; for SDXL's text encoders (model_lora_keys_clip)
"lora_te1_text_model_encoder_layers_<b>_<module>" (CLIP-L) and "lora_te2_..." (CLIP-G), <module> one of
its CLIP modules with dots as underscores; a key it does not map is "not loaded".
It applies a module as W + (alpha / rank) * up @ down, and with a dora_scale of one value per output
row as (W + dW) * dora_scale / ||W||. Each test trains nothing: it sets random adapter weights, writes
the files through save_final_weights, applies the export to a fresh denoiser by those rules and
compares every weight with peft's merge of the in-trainer adapter.
"""

from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

from difftune.config.schema import TrainConfig
from difftune.families import family_class
from difftune.training.adapters import attach_lora
from difftune.training.setup import save_final_weights

SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale")
# the CLIP modules ComfyUI maps in each encoder layer, and their names in a LoRA key
CLIP_MODULES = (
    "mlp.fc1",
    "mlp.fc2",
    "self_attn.k_proj",
    "self_attn.q_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
)


@pytest.fixture(scope="module")
def folders(tiny_model) -> dict[str, Path]:
    return {name: tiny_model(name) for name in ("sdxl", "kandinsky5-image", "kandinsky5-video")}


def comfyui_key_map(family_name: str, denoiser: torch.nn.Module) -> dict[str, str]:
    """LoRA key -> weight name, as ComfyUI builds it for this family (diffusers names)."""
    key_map = {}
    for name in denoiser.state_dict():
        if name.endswith(".weight"):
            module = name[: -len(".weight")]
            key_map[f"lora_unet_{module.replace('.', '_')}"] = name
            if family_name.startswith("kandinsky5"):
                key_map[module] = name
                key_map[f"transformer.{module}"] = name
    return key_map


def comfyui_clip_key_map(encoders: list[torch.nn.Module]) -> dict[str, tuple[int, str]]:
    """LoRA key -> (encoder index, module path from encoder.layers on), as ComfyUI builds it for SDXL's
    CLIP-L and CLIP-G from their checkpoints' weights "text_model.encoder.layers.<b>.<module>.weight"."""
    key_map = {}
    for index, encoder in enumerate(encoders):
        for layer in range(encoder.config.num_hidden_layers):
            for module in CLIP_MODULES:
                key = f"lora_te{index + 1}_text_model_encoder_layers_{layer}_{module.replace('.', '_')}"
                key_map[key] = (index, f"encoder.layers.{layer}.{module}")
    return key_map


@torch.no_grad()
def apply_like_comfyui(family_name: str, denoiser: torch.nn.Module, exported: dict[str, torch.Tensor]) -> int:
    """Patch the denoiser's weights with the exported file; returns the number of modules applied."""
    key_map = comfyui_key_map(family_name, denoiser)
    weights = dict(denoiser.named_parameters())
    modules = {key[: -len(s)] for key in exported for s in SUFFIXES if key.endswith(s)}
    assert len(modules) * 3 <= len(exported)
    not_loaded = sorted(m for m in modules if m not in key_map)
    assert not not_loaded, f"ComfyUI would not load {not_loaded[:3]}"
    for module in modules:
        weight = weights[key_map[module]]
        down, up = exported[f"{module}.lora_down.weight"], exported[f"{module}.lora_up.weight"]
        alpha = exported[f"{module}.alpha"].item() / down.shape[0]
        diff = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * alpha
        dora_scale = exported.get(f"{module}.dora_scale")
        if dora_scale is None:
            weight.add_(diff)
        else:
            assert dora_scale.shape == (weight.shape[0], 1)  # the output axis
            norm = weight.flatten(1).norm(dim=1, keepdim=True) + torch.finfo(weight.dtype).eps
            weight.copy_((weight + diff) * (dora_scale / norm))
    return len(modules)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("family_name", ["sdxl", "kandinsky5-image", "kandinsky5-video"])
def test_comfyui_export_applies_like_the_trained_adapter(
    tmp_path, folders, tiny_components, family_name, use_dora
):
    config = TrainConfig(
        model_type="lora",
        model_family=family_name,
        pretrained_model_name_or_path=str(folders[family_name]),
        lora_rank=4,
        lora_alpha=16,  # != rank: the exported alpha must be the trained one
        use_dora=use_dora,
        lora_format="comfyui",
    )
    family = family_class(family_name)(config)
    trained = tiny_components(family_name, fresh_denoiser=True).denoiser
    trained.requires_grad_(False)
    attach_lora(trained, family, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in trained.named_parameters():
            if "lora_" in name:  # as after training: B non-zero, magnitudes moved off the weight norms
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.copy_(parameter * (1 + 0.1 * noise) if "magnitude" in name else 0.1 * noise)
    save_final_weights(family, trained, config, tmp_path)

    with safe_open(str(tmp_path / "pytorch_lora_weights_comfyui.safetensors"), framework="pt") as handle:
        exported = {key: handle.get_tensor(key) for key in handle.keys()}
    assert all(key.startswith("lora_unet_") for key in exported)
    assert {v.item() for k, v in exported.items() if k.endswith(".alpha")} == {16.0}
    assert any(k.endswith(".dora_scale") for k in exported) == use_dora

    fresh = tiny_components(family_name, fresh_denoiser=True).denoiser  # as loaded, without the adapter
    before = {name: value.clone() for name, value in fresh.state_dict().items()}
    applied = apply_like_comfyui(family_name, fresh, exported)
    wrapped = [module for module in trained.modules() if isinstance(module, LoraLayer)]
    assert len(wrapped) == applied
    for module in wrapped:
        module.merge()  # peft's own W + dW (DoRA: rescaled to m / ||W + dW||)
    expected = {name.replace(".base_layer", ""): value for name, value in trained.state_dict().items()}
    changed = 0
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
        changed += int(not value.equal(before[name]))
    assert changed == applied


def test_text_encoder_lora_exports_under_the_clip_names_comfyui_maps(tmp_path, folders):
    from difftune.training.text_encoders import TextEncoderTraining

    config = TrainConfig(
        model_type="lora",
        model_family="sdxl",
        pretrained_model_name_or_path=str(folders["sdxl"]),
        lora_rank=4,
        lora_alpha=8,
        lora_format="comfyui",
        train_text_encoder=True,
    )
    family = family_class("sdxl")(config)
    components = family.load(torch.device("cpu"), torch.float32)
    components.denoiser.requires_grad_(False)
    attach_lora(components.denoiser, family, config)
    text_encoders = TextEncoderTraining(family, components, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in text_encoders.parameters() + [
            p for p in components.denoiser.parameters() if p.requires_grad
        ]:
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    save_final_weights(family, components.denoiser, config, tmp_path, text_encoders=text_encoders)

    with safe_open(str(tmp_path / "pytorch_lora_weights_comfyui.safetensors"), framework="pt") as handle:
        exported = {key: handle.get_tensor(key) for key in handle.keys()}
    fresh = family.load(torch.device("cpu"), torch.float32)
    unet_map, clip_map = comfyui_key_map("sdxl", fresh.denoiser), comfyui_clip_key_map(fresh.text_encoders)
    modules = {key[: -len(s)] for key in exported for s in SUFFIXES if key.endswith(s)}
    not_loaded = sorted(m for m in modules if m not in unet_map and m not in clip_map)
    assert not not_loaded, f"ComfyUI would not load {not_loaded[:3]}"

    wrapped = {
        (index, name.removeprefix("text_model.")): module
        for index, encoder in enumerate(text_encoders.encoders)
        for name, module in encoder.named_modules()
        if isinstance(module, LoraLayer)
    }
    exported_clip = [m for m in modules if m in clip_map]
    assert {clip_map[m] for m in exported_clip} == set(wrapped)  # every wrapped CLIP module, in both encoders
    for module in exported_clip:
        down, up = exported[f"{module}.lora_down.weight"], exported[f"{module}.lora_up.weight"]
        diff = up @ down * (exported[f"{module}.alpha"].item() / down.shape[0])
        torch.testing.assert_close(diff, wrapped[clip_map[module]].get_delta_weight("default"), msg=module)
