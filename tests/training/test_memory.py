"""Quantised bases under LoRA, offload hooks, checkpointing intervals, attention fallbacks, patched Conv3d."""

from __future__ import annotations

import re
import warnings
from types import SimpleNamespace

import pytest
import torch

from difftune.events import warnings_to
from difftune.testing.sdxl import tiny_sdxl_unet
from difftune.training import memory, memory_quant
from difftune.training.adapters import lora_state_dict

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def memory_config(**overrides) -> SimpleNamespace:
    """The memory keys of TrainConfig with their schema defaults."""
    from difftune.config.schema import TrainConfig

    keys = (
        "enable_group_offload",
        "group_offload_type",
        "group_offload_blocks_per_group",
        "group_offload_use_stream",
        "group_offload_to_disk_path",
        "enable_model_cpu_offload",
        "vae_enable_patch_conv",
        "vae_enable_tiling",
        "vae_enable_slicing",
    )
    values = {key: TrainConfig.model_fields[key].default for key in keys}
    values.update(overrides)
    return SimpleNamespace(**values)


def unet_inputs(batch: int = 2, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, 8, 8, generator=g).to(dtype),
        timestep=torch.tensor([10, 500][:batch]),
        encoder_hidden_states=torch.randn(batch, 5, 64, generator=g).to(dtype),
        added_cond_kwargs={
            "text_embeds": torch.randn(batch, 32, generator=g).to(dtype),
            "time_ids": torch.randn(batch, 6, generator=g).to(dtype),
        },
    )


def add_lora(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    from peft import LoraConfig

    from difftune.training.adapters import add_lora_adapter

    add_lora_adapter(
        unet, LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def train(unet, steps: int, dtype=torch.float32, lr: float = 1e-2) -> list[float]:
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    inputs = unet_inputs(dtype=dtype)
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        out = unet(**inputs).sample
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def quantised_lora_unet(precision: str, dtype=torch.float32):
    unet = tiny_sdxl_unet().to(dtype)
    unet.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        memory.quantize_module(unet, precision, device="cpu")
    add_lora(unet)
    return unet


def warning_messages(events: list) -> str:
    """The messages of the `warning` events in `events` (what `warnings_to(...append)` collected)."""
    return "\n".join(data["message"] for kind, data in events if kind == "warning")


# -- quantisation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [
        ("no_change", torch.float32),
        ("int8-quanto", torch.float32),
        pytest.param("int8-quanto", torch.bfloat16, marks=pytest.mark.slow),  # bf16 matmuls are slow on CPU
        ("int8-torchao", torch.float32),
    ],
)
def test_lora_on_each_precision_lowers_the_loss(precision, dtype):
    unet = quantised_lora_unet(precision, dtype)
    losses = train(unet, steps=4, dtype=dtype)
    assert losses[-1] < losses[0] * 0.95, losses
    assert all(p.dtype == torch.float32 for p in unet.parameters() if p.requires_grad)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int4-quanto", "fp8-quanto", "fp8-torchao"])
def test_lora_on_low_bit_precisions_lowers_the_loss(precision):
    losses = train(quantised_lora_unet(precision), steps=3)
    assert losses[-1] < losses[0], losses


def test_quanto_layers_are_quantised_and_sensitive_ones_are_not():
    from optimum.quanto import QLinear, qint8

    unet = quantised_lora_unet("int8-quanto")
    attn = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    assert isinstance(attn.to_q.base_layer, QLinear)
    assert attn.to_q.base_layer.weight_qtype == qint8
    assert memory.is_quantized(attn.to_q)
    # excluded: time/added embeddings, norms, first and last convolution
    for name in ("time_embedding.linear_1", "add_embedding.linear_1", "conv_in", "conv_out", "conv_norm_out"):
        assert not memory.is_quantized(unet.get_submodule(name)), name
    assert type(unet.get_submodule("time_embedding.linear_1")) is torch.nn.Linear


def test_torchao_layers_hold_int8_weights():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unet = quantised_lora_unet("int8-torchao")
    # peft's notice that merge() needs the quantisation recipe: difftune never merges into a quantised base
    assert not [w for w in caught if "get_apply_tensor_subclass" in str(w.message)]
    to_q = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert type(to_q).__name__ == "TorchaoLoraLinear"
    assert "Int8" in type(to_q.base_layer.weight).__name__
    assert not memory.is_quantized(unet.get_submodule("time_embedding.linear_1"))


def test_quantised_weights_take_less_memory():
    sizes = {}
    for name, dtype, precision in (
        ("fp32", torch.float32, "no_change"),
        ("bf16", torch.bfloat16, "no_change"),
        ("int8", torch.bfloat16, "int8-quanto"),
    ):
        unet = tiny_sdxl_unet().to(dtype)
        memory.quantize_module(unet, precision, device="cpu")
        sizes[name] = memory.resident_weight_bytes(unet)
    assert sizes["int8"] < sizes["bf16"] < sizes["fp32"]
    assert sizes["bf16"] == sizes["fp32"] // 2


def test_fp8_without_hardware_support_warns_and_uses_int8(monkeypatch):
    from optimum.quanto import qint8

    monkeypatch.setattr(memory_quant, "_warned", set())
    unet = tiny_sdxl_unet()
    got = []
    with warnings_to(lambda *event: got.append(event)):
        memory.quantize_module(unet, "fp8-quanto", device="cpu")
    assert re.search("no fp8 support.*int8-quanto instead", warning_messages(got))
    assert unet.down_blocks[1].attentions[0].proj_in.weight_qtype == qint8


def test_unknown_and_unsupported_precisions_name_the_value():
    with pytest.raises(ValueError, match="int3-quanto"):
        memory.quantize_module(torch.nn.Linear(2, 2), "int3-quanto")
    with pytest.raises(ValueError, match="nf4-bnb.*int4-quanto"):
        memory.quantize_module(torch.nn.Linear(2, 2), "nf4-bnb")


@pytest.mark.parametrize("precision", ["int8-quanto", "int8-torchao"])
def test_lora_from_quantised_base_loads_on_unquantised_model(precision, tmp_path):
    from safetensors.torch import load_file, save_file

    unet = quantised_lora_unet(precision)
    train(unet, steps=2)
    save_file(lora_state_dict(unet), tmp_path / "lora.safetensors")

    plain = tiny_sdxl_unet()
    inputs = unet_inputs()
    with torch.no_grad():
        before = plain(**inputs).sample
        plain.load_lora_adapter(load_file(tmp_path / "lora.safetensors"), prefix=None, adapter_name="trained")
        after = plain(**inputs).sample
        reference = unet(**inputs).sample
    assert not any(memory.is_quantized(m) for m in plain.modules())
    assert (after - before).abs().max() > 1e-3
    # the unquantised model with the adapter approximates the quantised one it was trained on
    assert (after - reference).abs().max() < 0.1 * before.abs().max()


# -- offload --------------------------------------------------------------------------------------


def test_group_offload_installs_hooks_on_cpu_and_still_trains():
    unet = tiny_sdxl_unet()
    unet.requires_grad_(False)
    add_lora(unet)
    memory.apply_offload(unet, memory_config(enable_group_offload=True), "cpu")
    hooked = memory.group_offload_hooks(unet)
    assert any(name.startswith("down_blocks.") for name in hooked)
    assert any(name.startswith("up_blocks.") for name in hooked)
    losses = train(unet, steps=3)
    assert losses[-1] < losses[0]


def test_use_stream_on_cpu_warns_and_is_off(monkeypatch):
    from diffusers.hooks.group_offloading import _get_top_level_group_offload_hook

    monkeypatch.setattr(memory_quant, "_warned", set())
    unet = tiny_sdxl_unet()
    config = memory_config(
        enable_group_offload=True, group_offload_use_stream=True, group_offload_type="leaf_level"
    )
    got = []
    with warnings_to(lambda *event: got.append(event)):
        memory.apply_offload(unet, config, "cpu")
    assert "group_offload_use_stream needs a CUDA device" in warning_messages(got)
    hook = _get_top_level_group_offload_hook(unet)
    assert hook is not None and hook.group.stream is None
    assert "conv_in" in memory.group_offload_hooks(unet)  # leaf level hooks every layer


def test_group_and_model_cpu_offload_together_is_an_error():
    config = memory_config(enable_group_offload=True, enable_model_cpu_offload=True)
    with pytest.raises(ValueError, match="enable_group_offload and enable_model_cpu_offload.*Keep one"):
        memory.apply_offload(tiny_sdxl_unet(), config, "cpu")


def test_model_cpu_offload_moves_frozen_parts_only_while_called(monkeypatch):
    from difftune.training import memory_offload

    moves = []
    real_move = memory_offload._move
    monkeypatch.setattr(memory_offload, "_move", lambda m, d: (moves.append(d.type), real_move(m, d)))
    encoder = torch.nn.Linear(4, 4)
    unet = tiny_sdxl_unet()
    memory.apply_offload(unet, memory_config(enable_model_cpu_offload=True), "cpu", frozen=[encoder])
    assert encoder._difftune_cpu_offload == torch.device("cpu")
    assert memory.group_offload_hooks(unet) == []
    moves.clear()
    out = encoder(torch.ones(1, 4))
    assert moves == ["cpu", "cpu"]  # to the (here: cpu) device, then back
    assert torch.allclose(out, torch.nn.functional.linear(torch.ones(1, 4), encoder.weight, encoder.bias))


def test_resident_moves_back_only_when_asked(monkeypatch):
    from difftune.training import memory_offload

    moves = []
    monkeypatch.setattr(memory_offload, "_move", lambda m, d: moves.append(d.type))
    vae = torch.nn.Linear(2, 2)
    with memory.resident(vae, "cuda", offload_after=True) as inside:
        assert inside is vae and moves == ["cuda"]
    assert moves == ["cuda", "cpu"]
    moves.clear()
    with memory.resident(vae, "cuda", offload_after=False):
        pass
    assert moves == ["cuda"]
    with memory.resident(None, "cuda", offload_after=True) as nothing:
        assert nothing is None


# -- gradient checkpointing -----------------------------------------------------------------------


def _grads(model, inputs) -> dict[str, torch.Tensor]:
    model.train()
    model(**inputs).sample.square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("interval", [None, 1, 2, 3])
def test_checkpointing_gives_the_same_gradients(interval):
    inputs = unet_inputs()
    reference = _grads(tiny_sdxl_unet(), inputs)
    unet = tiny_sdxl_unet()
    assert memory.enable_checkpointing(unet, interval)
    checkpointed = _grads(unet, inputs)
    assert reference.keys() == checkpointed.keys()
    for name, grad in reference.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_interval_checkpoints_every_nth_block():
    unet = tiny_sdxl_unet()
    memory.enable_checkpointing(unet, 2)
    calls = []
    func = unet.down_blocks[1]._gradient_checkpointing_func
    original = torch.utils.checkpoint.checkpoint
    try:
        torch.utils.checkpoint.checkpoint = lambda fn, *a, **k: (calls.append(fn), original(fn, *a, **k))[1]
        unet(**unet_inputs()).sample.mean().backward()
    finally:
        torch.utils.checkpoint.checkpoint = original
    assert len(func.index) > 2
    assert len(calls) == (len(func.index) + 1) // 2


# -- attention and VAE ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["flash", "sageattention", "xformers"])
def test_missing_attention_backend_warns_and_keeps_sdpa(name, monkeypatch):
    monkeypatch.setattr(memory_quant, "_warned", set())
    unet = tiny_sdxl_unet()
    got = []
    with warnings_to(lambda *event: got.append(event)):
        assert memory.set_attention_backend(unet, name) == "sdpa"
    assert re.search(f"attention_mechanism '{name}'.*keeping sdpa", warning_messages(got))
    assert memory.set_attention_backend(unet, "sdpa") == "sdpa"
    with pytest.raises(ValueError, match="attention_mechanism 'triton'"):
        memory.set_attention_backend(unet, "triton")


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation", "frames"),
    [
        (3, 1, 1, 1, 21),
        (3, 2, 1, 1, 20),
        (4, 1, 0, 1, 19),
        (3, 1, 2, 2, 17),
        (1, 1, 0, 1, 12),
    ],
)
def test_patched_conv3d_equals_the_plain_one(kernel, stride, padding, dilation, frames):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(3, 5, kernel, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(2, 3, frames, 6, 7)
    expected = conv(x)
    assert memory.patch_conv3d(torch.nn.Sequential(conv), chunk_frames=4) == 1
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)


def test_configure_vae_enables_what_the_config_asks():
    from diffusers import AutoencoderKLHunyuanVideo

    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 8),
        down_block_types=("HunyuanVideoDownBlock3D",) * 3,
        up_block_types=("HunyuanVideoUpBlock3D",) * 3,
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=4,
        temporal_compression_ratio=4,
    )
    x = torch.randn(1, 3, 9, 8, 8)
    with torch.no_grad():
        expected = vae.encode(x).latent_dist.mean
    config = memory_config(vae_enable_slicing=True, vae_enable_patch_conv=True)
    enabled = memory.configure_vae(vae, config, chunk_frames=2)
    assert enabled[0] == "enable_slicing" and enabled[1].startswith("patch_conv(")
    assert vae.use_slicing and not vae.use_tiling
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(x).latent_dist.mean, expected, rtol=1e-4, atol=1e-5)
