"""LoRA on the tiny SDXL: train a little, save, load into a stock pipeline, export to ComfyUI."""

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from difftune.config.schema import TrainConfig
from difftune.families.sdxl import SDXLFamily
from difftune.training.adapters import attach_lora, comfyui_dora_scales, export_comfyui, lora_state_dict

CPU = torch.device("cpu")


def unet_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(2, 4, 8, 8, generator=g),
        timestep=torch.tensor([50, 700]),
        encoder_hidden_states=torch.randn(2, 77, 64, generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(2, 32, generator=g),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        },
    )


def predict(unet, inputs):
    with torch.no_grad():
        return unet(**inputs, return_dict=False)[0]


def trained_lora(tiny_sdxl, tiny_components, **overrides):
    """SDXL family and UNet with a LoRA trained for a few SGD steps towards random targets."""
    config = TrainConfig(model_family="sdxl", pretrained_model_name_or_path=str(tiny_sdxl), **overrides)
    family = SDXLFamily(config)
    unet = tiny_components("sdxl", fresh_denoiser=True).denoiser
    unet.requires_grad_(False)
    attach_lora(unet, family, config)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    inputs = unet_inputs(1)
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(4):
        loss = torch.nn.functional.mse_loss(unet(**inputs, return_dict=False)[0], target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    return family, unet


@pytest.fixture(scope="module")
def stock_pipeline(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)


def fresh_pipeline(stock_pipeline):
    """The stock pipeline as from_pretrained loaded it, with its own UNet to load an adapter into."""
    return type(stock_pipeline)(**{**stock_pipeline.components, "unet": copy.deepcopy(stock_pipeline.unet)})


def test_attach_lora_wraps_only_the_attention_projections(tiny_sdxl, tiny_components):
    config = TrainConfig(model_family="sdxl", pretrained_model_name_or_path=str(tiny_sdxl), lora_rank=4)
    family = SDXLFamily(config)
    unet = tiny_components("sdxl", fresh_denoiser=True).denoiser
    before = predict(unet, unet_inputs())
    unet.requires_grad_(False)
    attach_lora(unet, family, config)
    names = {n.rsplit(".", 3)[0] for n, p in unet.named_parameters() if p.requires_grad}
    assert names and all(
        n.split(".")[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0") for n in names
    )
    state = lora_state_dict(unet)
    assert len(state) == 2 * len(names)
    assert all(".lora_A." in k or ".lora_B." in k for k in state)
    assert all(not v.any() for k, v in state.items() if ".lora_B." in k)  # starts as the base model
    torch.testing.assert_close(predict(unet, unet_inputs()), before)


def test_adapter_trains_in_fp32_on_bf16_weights(tiny_sdxl):
    config = TrainConfig(model_family="sdxl", pretrained_model_name_or_path=str(tiny_sdxl), lora_rank=4)
    family = SDXLFamily(config)
    unet = family.load(CPU, torch.bfloat16).denoiser.requires_grad_(False)
    attach_lora(unet, family, config)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    frozen = [p for p in unet.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in frozen)


def test_saved_lora_loads_in_a_stock_pipeline_with_the_same_output(
    tiny_sdxl, tiny_components, stock_pipeline, tmp_path
):
    family, unet = trained_lora(tiny_sdxl, tiny_components, lora_rank=4, lora_alpha=8)
    path = family.save_lora(tmp_path, lora_state_dict(unet))
    assert path == tmp_path / "pytorch_lora_weights.safetensors"
    assert all(k.startswith("unet.") for k in load_file(str(path)))
    inputs = unet_inputs(3)
    expected = predict(unet, inputs)

    pipeline = fresh_pipeline(stock_pipeline)
    without = predict(pipeline.unet, inputs)
    pipeline.load_lora_weights(tmp_path)
    torch.testing.assert_close(predict(pipeline.unet, inputs), expected, atol=1e-4, rtol=0)
    assert (without - expected).abs().max() > 1e-2


def test_comfyui_export_round_trips_through_diffusers(tiny_sdxl, tiny_components, stock_pipeline, tmp_path):
    family, unet = trained_lora(tiny_sdxl, tiny_components, lora_rank=4, lora_alpha=2)
    path = family.save_lora(tmp_path, lora_state_dict(unet))
    exported = export_comfyui(path, tmp_path / "comfy.safetensors", family.adapter_prefix)
    with safe_open(str(exported), framework="pt") as handle:
        keys = set(handle.keys())
        assert handle.metadata()["ss_network_dim"] == "4"
        alpha = handle.get_tensor(
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha"
        )
    module = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0"
    assert {f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"} <= keys
    assert alpha.item() == 2.0
    assert len(keys) == 3 * len(load_file(str(path))) // 2
    inputs = unet_inputs(4)
    pipeline = fresh_pipeline(stock_pipeline)
    pipeline.load_lora_weights(str(exported))
    torch.testing.assert_close(predict(pipeline.unet, inputs), predict(unet, inputs), atol=1e-4, rtol=0)


def test_dora_saves_and_loads_with_its_magnitudes(tiny_sdxl, tiny_components, stock_pipeline, tmp_path):
    family, unet = trained_lora(tiny_sdxl, tiny_components, lora_rank=2, use_dora=True)
    path = family.save_lora(tmp_path, lora_state_dict(unet))
    assert any("lora_magnitude_vector" in k for k in load_file(str(path)))
    pipeline = fresh_pipeline(stock_pipeline)
    pipeline.load_lora_weights(tmp_path)
    inputs = unet_inputs(5)
    torch.testing.assert_close(predict(pipeline.unet, inputs), predict(unet, inputs), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="dora_scales"):  # ComfyUI's scale needs the base weights
        export_comfyui(path, tmp_path / "comfy.safetensors", family.adapter_prefix)
    exported = load_file(
        str(
            export_comfyui(
                path,
                tmp_path / "comfy.safetensors",
                family.adapter_prefix,
                dora_scales=comfyui_dora_scales(unet),
            )
        )
    )
    scales = [v for k, v in exported.items() if k.endswith(".dora_scale")]
    assert scales and all(v.ndim == 2 and v.shape[1] == 1 for v in scales)


def test_export_names_a_file_that_is_not_a_lora(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "model.safetensors"
    save_file({"unet.conv_in.weight": torch.zeros(2)}, str(bad))
    with pytest.raises(ValueError, match="conv_in.weight"):
        export_comfyui(bad, tmp_path / "out.safetensors", "unet")


def test_export_reads_the_weights_and_alpha_under_the_prefix_it_is_given(tmp_path):
    import json

    from safetensors.torch import save_file

    from difftune.training.adapters import ADAPTER_METADATA_KEY

    lora = tmp_path / "pytorch_lora_weights.safetensors"
    weights = {
        "prior.blocks.0.to_q.lora_A.weight": torch.ones(2, 4),
        "prior.blocks.0.to_q.lora_B.weight": torch.zeros(4, 2),
    }
    metadata = {ADAPTER_METADATA_KEY: json.dumps({"prior.lora_alpha": 3, "text_encoder.lora_alpha": 9})}
    save_file(weights, str(lora), metadata=metadata)
    exported = load_file(str(export_comfyui(lora, tmp_path / "comfy.safetensors", "prior")))
    module = "lora_unet_blocks_0_to_q"
    assert set(exported) == {f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"}
    assert exported[f"{module}.alpha"].item() == 3.0
