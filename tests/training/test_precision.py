"""Kandinsky 5's time embeddings and modulations stay fp32 under bf16 training, as the pipeline keeps them."""

import pytest
import torch

from difftune.config.schema import TrainConfig
from difftune.families.kandinsky5_image import Kandinsky5ImageFamily
from difftune.training.precision import fp32_module_names
from difftune.training.setup import prepare_denoiser


@pytest.mark.parametrize("model_type", ["lora", "full"])
def test_fp32_modules_stay_fp32_and_run_outside_bf16_autocast(tiny_k5_image, model_type):
    config = TrainConfig(
        model_family="kandinsky5-image",
        model_type=model_type,
        pretrained_model_name_or_path=str(tiny_k5_image),
        mixed_precision="bf16",
        gradient_checkpointing=False,
    )
    family = Kandinsky5ImageFamily(config)
    components = family.load(torch.device("cpu"), torch.bfloat16)
    denoiser = prepare_denoiser(family, components, config, torch.bfloat16)

    kept = fp32_module_names(denoiser)
    blocks = len(denoiser.text_transformer_blocks) + len(denoiser.visual_transformer_blocks)
    assert "time_embeddings" in kept and "out_layer.modulation" in kept
    assert len(kept) == 1 + blocks + 1  # time embeddings, one modulation per block, the output layer's
    fp32 = {f"{name}." for name in kept}
    for name, parameter in denoiser.named_parameters():
        norm = {"query_norm", "key_norm"} & set(name.split("."))  # fp32 for their fp32 inputs
        if name.startswith(tuple(fp32)) or model_type == "full" or "lora_" in name or norm:
            assert parameter.dtype == torch.float32, name
        else:
            assert parameter.dtype == torch.bfloat16, name

    linears = {
        name: module
        for name, module in denoiser.named_modules()
        if isinstance(module, torch.nn.Linear) and "lora_" not in name and not name.endswith("base_layer")
    }
    dtypes: dict[str, torch.dtype] = {}

    def record(name):
        def hook(_module, _inputs, output):
            dtypes[name] = output.dtype

        return hook

    for name, module in linears.items():
        module.register_forward_hook(record(name))
    batch = family.collate_prompts(family.encode_prompts(components, ["a red cat"]))
    latents = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        family.model_forward(components, denoiser, latents, torch.tensor([0.5]), batch)

    in_fp32 = {name for name in dtypes if name.startswith(tuple(fp32))}
    assert (
        "time_embeddings.in_layer" in in_fp32
        and "visual_transformer_blocks.0.visual_modulation.out_layer" in in_fp32
    )
    assert {dtypes[name] for name in in_fp32} == {torch.float32}
    # autocast is on for the rest: the attention and feed-forward layers ran in bf16
    assert {dtypes[name] for name in dtypes if name not in in_fp32} == {torch.bfloat16}


def test_the_attention_norms_fed_fp32_keep_fp32_weights_so_bf16_training_takes_the_fused_kernel(
    tiny_k5_image,
):
    import warnings

    config = TrainConfig(
        model_family="kandinsky5-image",
        pretrained_model_name_or_path=str(tiny_k5_image),
        mixed_precision="bf16",
        gradient_checkpointing=False,
    )
    family = Kandinsky5ImageFamily(config)
    components = family.load(torch.device("cpu"), torch.bfloat16)
    denoiser = prepare_denoiser(family, components, config, torch.bfloat16)
    norms = [m for name, m in denoiser.named_modules() if name.endswith(("query_norm", "key_norm"))]
    assert norms and {m.weight.dtype for m in norms} == {torch.float32}

    batch = family.collate_prompts(family.encode_prompts(components, ["a red cat"]))
    latents = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        family.model_forward(components, denoiser, latents, torch.tensor([0.5]), batch)
    assert not [w for w in caught if "Mismatch dtype" in str(w.message)]
