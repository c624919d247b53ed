"""GPU figures for an SDXL-sized UNet LoRA step at 1024 px, bf16: it/s, peak VRAM and model FLOP utilisation.

The UNet has SDXL base 1.0's architecture with random weights (no download). Each setting runs the
same LoRA training step (rank 16 on the attention projections, as `difftune train` attaches it);
FLOPs are counted once with torch's FlopCounterMode, so MFU = counted FLOPs / step time / peak FLOP/s.

    python bench/gpu_sdxl_unet.py --steps 10 --batch 1 [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

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


def build(checkpointing: bool):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    with torch.device("cuda"):
        unet = UNet2DConditionModel(**SDXL_UNET).to(torch.bfloat16)
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=16,
            lora_alpha=16,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
    )
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return unet


def batch(size: int, resolution: int):
    latent = resolution // 8
    return dict(
        sample=torch.randn(size, 4, latent, latent, device="cuda", dtype=torch.bfloat16),
        timestep=torch.randint(0, 1000, (size,), device="cuda"),
        encoder_hidden_states=torch.randn(size, 77, 2048, device="cuda", dtype=torch.bfloat16),
        added_cond_kwargs={
            "text_embeds": torch.randn(size, 1280, device="cuda", dtype=torch.bfloat16),
            "time_ids": torch.tensor(
                [[resolution, resolution, 0, 0, resolution, resolution]] * size,
                device="cuda",
                dtype=torch.bfloat16,
            ),
        },
    )


def step(unet, optimizer, inputs):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        prediction = unet(**inputs).sample
    loss = torch.nn.functional.mse_loss(prediction.float(), torch.randn_like(prediction, dtype=torch.float32))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(checkpointing: bool, args) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    unet = build(checkpointing)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4, fused=True)
    inputs = batch(args.batch, args.resolution)
    for _ in range(2):
        step(unet, optimizer, inputs)
    with FlopCounterMode(display=False) as counter:
        step(unet, optimizer, inputs)
    flops = counter.get_total_flops()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step(unet, optimizer, inputs)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    result = {
        "setting": "gradient checkpointing" if checkpointing else "no checkpointing",
        "it_per_s": 1 / seconds,
        "step_ms": seconds * 1e3,
        "peak_vram_gib": torch.cuda.max_memory_allocated() / 2**30,
        "tflop_per_step": flops / 1e12,
        "mfu": flops / seconds / (args.peak_tflops * 1e12),
        "params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
    }
    del unet, optimizer
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    results = [measure(False, args), measure(True, args)]
    base = results[0]
    for r in results:
        print(
            f"{r['setting']:24} {r['it_per_s']:6.2f} it/s ({r['step_ms']:7.1f} ms, x{r['step_ms'] / base['step_ms']:.2f})"
            f"  peak {r['peak_vram_gib']:6.2f} GiB (x{r['peak_vram_gib'] / base['peak_vram_gib']:.2f})"
            f"  {r['tflop_per_step']:6.1f} TFLOP/step  MFU {r['mfu'] * 100:5.1f}%  ({r['params_m']:.0f}M params)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
