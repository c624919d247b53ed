"""Full-size denoisers on one GPU: it/s, peak VRAM and model FLOP utilisation per family and memory setting.

Each case builds the real diffusers class at the published full size with random weights (speed and
memory do not depend on the weights' values): SDXL base 1.0's UNet (diffusers' config), and the
Kandinsky 5 transformers with the dimensions of the official repository's configs (image Lite:
configs/config_t2i.yaml; video Lite: config_5s_sft.yaml; video Pro: k5_pro_t2v_5s_sft_hd.yaml).
A step is what `difftune train` runs from cached latents and embeddings: LoRA rank 16 on the family's
target modules, bf16 autocast, forward, MSE loss, backward, AdamW step.

FLOPs are counted by torch's FlopCounterMode over one forward and backward of the denoiser at the
measured shape, on the meta device (shapes only: no GPU and no memory needed, so `--count-flops` runs
anywhere). It counts matrix multiplications, convolutions and attention at 2 FLOPs per multiply-add,
and only what backward really runs: the input gradient through frozen layers, input and weight
gradients for the LoRA layers. MFU = counted FLOPs / step time / the GPU's dense bf16 peak.

    python bench/gpu_families.py                       # every case and setting, on the GPU
    python bench/gpu_families.py --cases k5-image-lite --settings bf16 checkpointing
    python bench/gpu_families.py --count-flops         # TFLOP per step at full size, CPU only
    python bench/gpu_families.py --dry-run             # every setting at tiny size on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
TINY_SDXL_UNET = SDXL_UNET | dict(
    sample_size=8,
    block_out_channels=(32, 64, 64),
    transformer_layers_per_block=(1, 1, 1),
    attention_head_dim=(2, 4, 4),
    cross_attention_dim=64,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
)
K5 = dict(in_visual_dim=16, out_visual_dim=16, in_text_dim=3584, in_text_dim2=768, patch_size=(1, 2, 2))
K5_IMAGE_LITE = K5 | dict(
    time_dim=512,
    model_dim=2560,
    ff_dim=10240,
    num_text_blocks=2,
    num_visual_blocks=50,
    axes_dims=(32, 48, 48),
)
K5_VIDEO_LITE = K5 | dict(
    time_dim=512,
    model_dim=1792,
    ff_dim=7168,
    num_text_blocks=2,
    num_visual_blocks=32,
    axes_dims=(16, 24, 24),
    visual_cond=True,
)
K5_VIDEO_PRO = K5 | dict(
    time_dim=1024,
    model_dim=4096,
    ff_dim=16384,
    num_text_blocks=4,
    num_visual_blocks=60,
    axes_dims=(32, 48, 48),
    visual_cond=True,
)
TINY_K5 = dict(
    in_text_dim=32,
    in_text_dim2=16,
    time_dim=16,
    model_dim=32,
    ff_dim=64,
    num_text_blocks=1,
    num_visual_blocks=2,
) | dict(axes_dims=(4, 6, 6))


def unet_arguments(
    model, batch: int, pixels: tuple[int, int], latent_frames: int, tokens: int, new: dict
) -> dict:
    """The forward keyword arguments of a UNet2DConditionModel with SDXL's added text and time conditions."""
    height, width = pixels
    config = model.config
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return dict(
        sample=torch.randn(batch, 4, height // 8, width // 8, **new),
        timestep=torch.full((batch,), 500, device=new["device"]),
        encoder_hidden_states=torch.randn(batch, tokens, config.cross_attention_dim, **new),
        added_cond_kwargs={
            "text_embeds": torch.randn(batch, pooled, **new),
            "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * batch, **new),
        },
    )


def kandinsky5_arguments(
    model, batch: int, pixels: tuple[int, int], latent_frames: int, tokens: int, new: dict
) -> dict:
    """The forward keyword arguments of a Kandinsky5Transformer3DModel (channels-last latents, RoPE positions)."""
    config = model.config
    channels = 2 * config.in_visual_dim + 1 if config.visual_cond else config.in_visual_dim
    h, w = pixels[0] // 8, pixels[1] // 8
    patch = config.patch_size
    device = new["device"]
    return dict(
        hidden_states=torch.randn(batch, latent_frames, h, w, channels, **new),
        encoder_hidden_states=torch.randn(batch, tokens, config.in_text_dim, **new),
        pooled_projections=torch.randn(batch, config.in_text_dim2, **new),
        timestep=torch.full((batch,), 500.0, **new),
        visual_rope_pos=[
            torch.arange(latent_frames // patch[0], device=device),
            torch.arange(h // patch[1], device=device),
            torch.arange(w // patch[2], device=device),
        ],
        text_rope_pos=torch.arange(tokens, device=device),
        scale_factor=[1.0, 1.0, 1.0],
        return_dict=True,
    )


@dataclass(frozen=True)
class Case:
    """One denoiser at one training shape: `family` is its registry name, `denoiser` its diffusers class
    and `arguments` what builds its forward's keyword arguments."""

    name: str
    family: str
    denoiser: str
    arguments: Callable[..., dict]
    config: dict
    tiny_config: dict
    pixels: tuple[int, int]  # (height, width) of the training images / videos
    frames: int = 1  # video frames (latent frames by the family's frames_per_latent)
    text_tokens: int = 77


# (diffusers class, its forward arguments) of each kind of denoiser
UNET_DENOISER = ("UNet2DConditionModel", unet_arguments)
K5_DENOISER = ("Kandinsky5Transformer3DModel", kandinsky5_arguments)
CASES = {
    "sdxl": Case("sdxl", "sdxl", *UNET_DENOISER, SDXL_UNET, TINY_SDXL_UNET, (1024, 1024)),
    "k5-image-lite": Case(
        "k5-image-lite",
        "kandinsky5-image",
        *K5_DENOISER,
        K5_IMAGE_LITE,
        K5_IMAGE_LITE | TINY_K5,
        (1024, 1024),
        1,
        256,
    ),
    "k5-video-lite": Case(
        "k5-video-lite",
        "kandinsky5-video",
        *K5_DENOISER,
        K5_VIDEO_LITE,
        K5_VIDEO_LITE | TINY_K5,
        (512, 768),
        61,
        256,
    ),
    "k5-video-pro": Case(
        "k5-video-pro",
        "kandinsky5-video",
        *K5_DENOISER,
        K5_VIDEO_PRO,
        K5_VIDEO_PRO | TINY_K5,
        (512, 768),
        61,
        256,
    ),
}
SETTINGS = ("bf16", "checkpointing", "int8-torchao", "group-offload", "int8+group-offload", "compile")


def build(case: Case, tiny: bool) -> torch.nn.Module:
    """The denoiser with random weights, on the current default device (use `with torch.device(...)`)."""
    import diffusers

    model = getattr(diffusers, case.denoiser)(**(case.tiny_config if tiny else case.config))
    model.requires_grad_(False)
    return model


def to_bf16(model: torch.nn.Module, family: str) -> torch.nn.Module:
    """bf16 weights, except the modules the model class keeps in fp32 (Kandinsky 5's modulation) and
    those the family keeps fp32 for their fp32 inputs (`fp32_weight_modules`), as `difftune train` does."""
    from difftune.config.schema import TrainConfig
    from difftune.families import family_class

    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    keep += family_class(family)(TrainConfig(model_family=family)).fp32_weight_modules()
    for name, module in model.named_modules():
        if keep and any(part in keep for part in name.split(".")):
            continue
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(torch.bfloat16)
    return model


def add_lora(model: torch.nn.Module, family: str, rank: int = 16) -> list[torch.nn.Parameter]:
    """LoRA as `difftune train` attaches it (the family's targets, fp32 adapter weights); returns the
    trainable parameters."""
    from difftune.config.schema import TrainConfig
    from difftune.families import family_class
    from difftune.training.adapters import attach_lora

    config = TrainConfig(model_family=family, lora_rank=rank)
    attach_lora(model, family_class(family)(config), config)
    return [p for p in model.parameters() if p.requires_grad]


def inputs(case: Case, model: torch.nn.Module, batch: int, tiny: bool, device, dtype) -> dict:
    """The forward keyword arguments of one training batch at the case's shape."""
    from difftune.families import registry

    pixels = (64, 64) if tiny else case.pixels
    frames = 5 if tiny and case.frames > 1 else case.frames
    tokens = 8 if tiny else case.text_tokens
    latent_frames = (frames - 1) // registry.spec(case.family).frames_per_latent + 1
    return case.arguments(model, batch, pixels, latent_frames, tokens, dict(device=device, dtype=dtype))


def forward_backward(model: torch.nn.Module, kwargs: dict, autocast: str | None) -> None:
    """One training forward and backward (MSE against a random target)."""
    context = torch.autocast(autocast, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        prediction = model(**kwargs).sample
    target = torch.randn(prediction.shape, device=prediction.device, dtype=torch.float32)
    torch.nn.functional.mse_loss(prediction.float(), target).backward()


def count_flops(case: Case, batch: int = 1, tiny: bool = False, device: str = "meta") -> int:
    """FLOPs of one LoRA forward + backward of the case's denoiser (meta device: shapes only)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device(device):
        model = to_bf16(build(case, tiny), case.family)
    add_lora(model, case.family)
    model.train()
    kwargs = inputs(case, model, batch, tiny, device, torch.bfloat16)
    with FlopCounterMode(display=False) as counter:
        forward_backward(model, kwargs, autocast=None)
    return counter.get_total_flops()


def prepare(case: Case, setting: str, tiny: bool, device: torch.device) -> tuple[torch.nn.Module, list]:
    """The denoiser under one memory setting, as the trainer sets it up (quantise, adapter, offload)."""
    from difftune.training.memory import enable_group_offload, quantize_module

    with torch.device("cpu" if "group-offload" in setting else device):
        model = to_bf16(build(case, tiny), case.family)
    if "int8" in setting:
        quantize_module(model, "int8-torchao", device=device)
    trainable = add_lora(model, case.family)
    if setting != "bf16":
        model.enable_gradient_checkpointing()
    if "group-offload" in setting:
        enable_group_offload(model, device, "block_level", 1, use_stream=device.type == "cuda")
    if setting == "compile":
        model.compile()
    model.train()
    return model, trainable


def measure(case: Case, setting: str, batch: int, steps: int, tiny: bool, device: torch.device) -> dict:
    """Steady-state figures of one case, setting and batch size."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, trainable = prepare(case, setting, tiny, device)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=cuda)
    kwargs = inputs(case, model, batch, tiny, device, torch.bfloat16)
    autocast = device.type

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(2):  # warm-up (and compilation)
        forward_backward(model, kwargs, autocast)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync()
    denoiser_s = step_s = 0.0
    for _ in range(steps):
        started = time.perf_counter()
        forward_backward(model, kwargs, autocast)
        sync()
        middle = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        denoiser_s += middle - started
        step_s += time.perf_counter() - started
    step_s /= steps
    figures = {
        "it_per_s": 1 / step_s,
        "step_ms": step_s * 1e3,
        "outside_denoiser_share": 1 - denoiser_s / steps / step_s,
    }
    if cuda:
        figures["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
        figures["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    del model, optimizer
    return figures


def largest_batch(case: Case, setting: str, device: torch.device, limit: int) -> int:
    """The largest power-of-two batch up to `limit` whose step fits in GPU memory."""
    fits = 1
    batch = 2
    while batch <= limit:
        try:
            measure(case, setting, batch, 1, False, device)
        except torch.OutOfMemoryError:
            break
        fits, batch = batch, batch * 2
    torch.cuda.empty_cache()
    return fits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--max-batch", type=int, default=16, help="search the largest batch up to this (0: off)"
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)"
    )
    parser.add_argument(
        "--count-flops", action="store_true", help="only count FLOPs at full size (any machine)"
    )
    parser.add_argument("--dry-run", action="store_true", help="every setting at tiny size on the CPU")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    common.quiet()

    figures: dict[str, float] = {}
    if args.count_flops:
        for name in args.cases:
            figures[f"{name}_tflop_per_step"] = count_flops(CASES[name]) / 1e12
        common.report("gpu_families_flops", figures, save=not args.no_save)
        return
    tiny = args.dry_run or not torch.cuda.is_available()
    device = torch.device("cpu" if tiny else "cuda")
    notes = {
        "device": "cpu (tiny dry run)" if tiny else torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }
    for name in args.cases:
        case = CASES[name]
        flops = count_flops(case, tiny=tiny)
        for setting in args.settings:
            if tiny and setting == "compile":
                continue  # compiling on the CPU takes minutes and says nothing about the GPU
            result = measure(case, setting, 1, 1 if tiny else args.steps, tiny, device)
            result["mfu"] = flops / (result["step_ms"] / 1e3) / (args.peak_tflops * 1e12)
            for key, value in result.items():
                figures[f"{name}_{setting}_b1_{key}"] = value
            if not tiny and args.max_batch and setting in ("checkpointing", "int8+group-offload"):
                batch = largest_batch(case, setting, device, args.max_batch)
                result = measure(case, setting, batch, args.steps, tiny, device)
                result["mfu"] = batch * flops / (result["step_ms"] / 1e3) / (args.peak_tflops * 1e12)
                figures[f"{name}_{setting}_largest_batch"] = batch
                for key, value in result.items():
                    figures[f"{name}_{setting}_bmax_{key}"] = value
    common.report("gpu_families_dry_run" if tiny else "gpu_families", figures, notes, save=not args.no_save)


if __name__ == "__main__":
    main()
