"""Memory benchmark: an SDXL-shaped LoRA trained for a few steps under each memory setting.

Each setting runs in a fresh subprocess, so peak figures do not leak between settings. Printed per
setting: peak memory (GPU: torch.cuda.max_memory_allocated; CPU: peak RSS of the process), the bytes
the UNet's weights occupy, the median step time, and each figure's ratio to the fp32 baseline.

    python bench/memory.py                         # every setting, tiny UNet, 6 steps
    python bench/memory.py --size small --json out.json   # compare with out.json if it exists
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

SETTINGS = {  # name -> (dtype, base_model_precision, offload)
    "fp32": ("fp32", "no_change", None),
    "bf16": ("bf16", "no_change", None),
    "int8-quanto": ("bf16", "int8-quanto", None),
    "int8-torchao": ("bf16", "int8-torchao", None),
    "group-offload": ("bf16", "no_change", "group"),
    "model-cpu-offload": ("bf16", "no_change", "model"),
    "group-offload+int8-torchao": ("bf16", "int8-torchao", "group"),
}
SIZES = {  # block_out_channels, transformer layers per block, latent side
    "small": ((128, 256), (1, 2), 32),
    "large": ((320, 640, 1280), (1, 2, 4), 64),
}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def build_unet(size: str) -> tuple[torch.nn.Module, int]:
    """The UNet and its latent side; `tiny` is difftune.testing's SDXL UNet, the others are wider."""
    from diffusers import UNet2DConditionModel

    from difftune.testing import sdxl

    if size == "tiny":
        return sdxl.tiny_sdxl_unet(), 16
    channels, layers, side = SIZES[size]
    torch.manual_seed(0)
    levels = len(channels)
    unet = UNet2DConditionModel(
        sample_size=side,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=2,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        attention_head_dim=tuple(c // 64 for c in channels),
        transformer_layers_per_block=layers,
        use_linear_projection=True,
        cross_attention_dim=2 * sdxl.TEXT_HIDDEN,
        norm_num_groups=32,
        addition_embed_type="text_time",
        addition_time_embed_dim=sdxl.TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * sdxl.TIME_EMBED_DIM + sdxl.POOLED_DIM,
    )
    return unet, side


def run_setting(name: str, size: str, steps: int, device: torch.device) -> dict:
    """Train the LoRA `steps` steps under setting `name`; returns its figures."""
    from peft import LoraConfig

    from difftune.testing.sdxl import tiny_sdxl_text_encoders
    from difftune.training import memory

    warnings.simplefilter("ignore")
    dtype_name, precision, offload = SETTINGS[name]
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    unet, side = build_unet(size)
    encoders = list(tiny_sdxl_text_encoders())
    unet.requires_grad_(False).to(dtype)
    memory.quantize_module(unet, precision, device=device)
    unet.add_adapter(
        LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    )
    lora = [p for p in unet.parameters() if p.requires_grad]
    for p in lora:
        p.data = p.data.float()
    memory.enable_checkpointing(unet, None)
    weight_bytes = memory.resident_weight_bytes(unet)
    config = argparse.Namespace(
        enable_group_offload=offload == "group",
        group_offload_type="block_level",
        group_offload_blocks_per_group=1,
        group_offload_use_stream=device.type == "cuda",
        group_offload_to_disk_path=None,
        enable_model_cpu_offload=offload == "model",
    )
    for encoder in encoders:
        encoder.to(dtype)
    if offload != "group":
        unet.to(device)
    if offload != "model":
        for encoder in encoders:
            encoder.to(device)
    memory.apply_offload(unet, config, device, frozen=encoders)
    optimizer = torch.optim.AdamW(lora, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 49408, (2, 77), generator=g).to(device)
    latents = torch.randn(2, 4, side, side, generator=g).to(device, dtype)
    noise = torch.randn(2, 4, side, side, generator=g).to(device)
    time_ids = torch.tensor([[side * 8, side * 8, 0, 0, side * 8, side * 8]] * 2, device=device, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    lora_before = torch.cat([p.detach().flatten().cpu() for p in lora]).clone()
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.no_grad():
            hidden = torch.cat(
                [
                    encoders[0](tokens, output_hidden_states=True).hidden_states[-2],
                    encoders[1](tokens, output_hidden_states=True).hidden_states[-2],
                ],
                dim=-1,
            )
            pooled = encoders[1](tokens).text_embeds
        out = unet(
            latents,
            torch.tensor([500, 500], device=device),
            hidden.to(dtype),
            added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids},
        ).sample
        loss = torch.nn.functional.mse_loss(out.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # .item() synchronises the GPU
        times.append(time.perf_counter() - start)
    lora_change = (torch.cat([p.detach().flatten().cpu() for p in lora]) - lora_before).abs().max().item()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {
        "setting": name,
        "device": device.type,
        "size": size,
        "steps": steps,
        "peak_bytes": peak,
        "weight_bytes": weight_bytes,
        "step_seconds": statistics.median(times[1:] or times),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "lora_change": lora_change,
    }


def in_subprocess(name: str, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        name,
        "--size",
        args.size,
        "--steps",
        str(args.steps),
        "--device",
        args.device,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"setting": name, "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def mib(value: float) -> str:
    return f"{value / 2**20:9.2f}"


def report(results: list[dict], previous: dict[str, dict]) -> None:
    base = next((r for r in results if r["setting"] == "fp32" and "error" not in r), None)
    peak_label = "peak GPU MiB" if results and results[0].get("device") == "cuda" else "peak RSS MiB"
    print(
        f"{'setting':26} {peak_label:>13} {'x fp32':>7} {'weights MiB':>12} {'x fp32':>7} "
        f"{'step ms':>9} {'x fp32':>7}  loss first->last  lora moved"
    )
    for r in results:
        if "error" in r:
            print(f"{r['setting']:26} failed: {r['error']}")
            continue
        ratio = (lambda key, r=r: f"{r[key] / base[key]:7.2f}") if base else (lambda key: "      -")
        print(
            f"{r['setting']:26} {mib(r['peak_bytes']):>13} {ratio('peak_bytes')} {mib(r['weight_bytes']):>12} "
            f"{ratio('weight_bytes')} {r['step_seconds'] * 1e3:9.1f} {ratio('step_seconds')}  "
            f"{r['loss_first']:.4f}->{r['loss_last']:.4f}  {r['lora_change'] > 0}"
        )
    changes = []
    for r in results:
        old = previous.get(r["setting"])
        if old and "error" not in r and "error" not in old:
            changes.append(
                f"{r['setting']:26} peak {100 * (r['peak_bytes'] / old['peak_bytes'] - 1):+6.1f}%  "
                f"weights {100 * (r['weight_bytes'] / old['weight_bytes'] - 1):+6.1f}%  "
                f"step {100 * (r['step_seconds'] / old['step_seconds'] - 1):+6.1f}%"
            )
    if changes:
        print("\nchange since the previous run:")
        print("\n".join(changes))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--settings", default=",".join(SETTINGS), help="comma-separated, from: " + ", ".join(SETTINGS)
    )
    parser.add_argument("--size", choices=["tiny", *SIZES], default="tiny")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--json", type=Path, help="write the figures here; compare with this file if it exists"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_setting(args.worker, args.size, args.steps, torch.device(args.device))))
        return
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"--settings: unknown {unknown}; choose from {', '.join(SETTINGS)}")
    previous = {}
    if args.json and args.json.exists():
        previous = {r["setting"]: r for r in json.loads(args.json.read_text())["results"]}
    results = [in_subprocess(name, args) for name in names]
    report(results, previous)
    if args.json:
        args.json.write_text(
            json.dumps({"size": args.size, "device": args.device, "results": results}, indent=1)
        )


if __name__ == "__main__":
    main()
