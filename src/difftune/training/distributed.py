"""Training on several processes: the global batch split by rows, and FSDP2 sharding of the denoiser.

A run on n processes with train_batch_size B trains on global batches of n * B samples: every process
walks the same sampler over batches of n * B (one bucket each) and takes its own B rows (the sampler's
`rows`, see data/sampler.py), and it draws the noise and timesteps of the whole global batch and keeps
its rows (`global_rows` below). The gradients DDP (or FSDP2) averages are then those of one process
training with train_batch_size n * B, so the final weights match it up to float rounding.

FSDP2 (fsdp_enable, fsdp_version 2) shards every block of the denoiser's top-level block lists (each
ModuleList child: a UNet-style denoiser's down/up blocks, a transformer's block lists) and then the root with
torch.distributed.fsdp.fully_shard. Checkpoints and exported weights hold full (gathered) tensors,
so a checkpoint written under FSDP2 resumes under FSDP2 (or without it) and the LoRA file loads like any
other: `checkpoint_parts` gathers what save_checkpoint writes, `apply_checkpoint` scatters it back.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from difftune import events
from difftune.config.schema import TrainConfig
from difftune.training.checkpoints import (
    Checkpoint,
    CheckpointError,
    TrainerState,
    restore_rng,
    trainable_state,
)
from difftune.training.noise import TimestepBias, draws_offset


# -- the global batch --------------------------------------------------------------------------
def global_rows(
    draw: Callable[[int], torch.Tensor], batch_size: int, num_processes: int = 1, process_index: int = 0
) -> torch.Tensor:
    """Draw for the whole global batch (draw(n * B) -> (n * B, ...)) and keep this process's B rows."""
    values = draw(batch_size * num_processes)
    return values[process_index * batch_size : (process_index + 1) * batch_size]


def draw_noise_and_timesteps(
    objective,
    shape: torch.Size,
    generator: torch.Generator,
    device,
    num_processes: int = 1,
    process_index: int = 0,
    noise_offset: float = 0.0,
    noise_offset_probability: float = 1.0,
    bias: TimestepBias | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise (B, ...) and timesteps (B,) of this process's rows, drawn for the global batch.

    noise_offset adds a per-sample, per-channel constant to the noise (offset noise), which lets the
    model learn overall brightness shifts; with noise_offset_probability < 1 one draw per global
    batch decides whether it is added. `bias` reweights the timesteps (timestep_bias_*).

    The draw order (all the noise, then all the timesteps) is the single-process order, so one
    process with batch n * B draws exactly what n processes with batch B draw together.
    """
    batch_size, rest = shape[0], tuple(shape[1:])
    noise = global_rows(
        lambda n: torch.randn((n, *rest), generator=generator), batch_size, num_processes, process_index
    )

    def timesteps_of(n: int) -> torch.Tensor:
        if bias is not None:
            return bias.draw(objective, (n, *rest), n, generator, device)
        return objective.sample_timesteps_for((n, *rest), n, generator, device)

    timesteps = global_rows(timesteps_of, batch_size, num_processes, process_index)
    if noise_offset and draws_offset(noise_offset_probability, generator):
        offsets = global_rows(
            lambda n: torch.randn((n, rest[0]), generator=generator), batch_size, num_processes, process_index
        )
        noise = noise + noise_offset * offsets.view(batch_size, rest[0], *([1] * (len(rest) - 1)))
    return noise.to(device), timesteps


def perturb_inputs(
    noise: torch.Tensor,
    scale: float,
    generator: torch.Generator,
    num_processes: int = 1,
    process_index: int = 0,
) -> torch.Tensor:
    """noise + scale * fresh noise (input_perturbation): what the noisy inputs are built from.

    The target keeps the unperturbed noise. Drawn for the global batch like the noise itself.
    """
    if scale == 0:
        return noise
    batch_size, rest = noise.shape[0], tuple(noise.shape[1:])
    extra = global_rows(
        lambda n: torch.randn((n, *rest), generator=generator), batch_size, num_processes, process_index
    )
    return noise + scale * extra.to(device=noise.device, dtype=noise.dtype)


# -- FSDP2 -------------------------------------------------------------------------------------
def block_lists(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks FSDP2 shards one by one: the items of every top-level ModuleList that hold parameters."""
    blocks = []
    for child in denoiser.children():
        if isinstance(child, torch.nn.ModuleList):
            blocks += [block for block in child if any(True for _ in block.parameters())]
    return blocks


def apply_fsdp2(denoiser: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    """Shard the denoiser in place with fully_shard: each block, then the root; returns it.

    Needs an initialised process group of two or more processes (torchrun / accelerate launch) and
    fsdp_version 2; fsdp_reshard_after_forward frees the gathered weights after each block's forward.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if config.fsdp_version != 2:
        raise ValueError(
            f"fsdp_version {config.fsdp_version} is not supported; set fsdp_version to 2 (FSDP2)"
        )
    if not dist.is_initialized():
        raise RuntimeError(
            "fsdp_enable needs several processes; start with torchrun --nproc_per_node N "
            "or accelerate launch --num_processes N, or set fsdp_enable false"
        )
    device = next(denoiser.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    reshard = config.fsdp_reshard_after_forward
    for block in block_lists(denoiser):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(denoiser, mesh=mesh, reshard_after_forward=reshard)
    return denoiser


def shard_if_configured(
    denoiser: torch.nn.Module,
    config: TrainConfig,
    num_processes: int,
    emit: Callable[[str, dict[str, Any]], None],
) -> bool:
    """apply_fsdp2 when fsdp_enable is set and several processes run; returns whether it sharded."""
    if not config.fsdp_enable:
        return False
    if num_processes < 2:
        emit(
            "warning",
            {
                "message": "fsdp_enable: only one process runs, so the denoiser is not sharded; "
                "launch with torchrun --nproc_per_node N to shard it"
            },
        )
        return False
    apply_fsdp2(denoiser, config)
    return True


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether fully_shard wrapped this module."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _options(**extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **extra)


def full_trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU tensors of the parameters that train, on the main process (empty elsewhere).

    A collective under FSDP2: every process must call it. Without sharding, the parameters themselves.
    """
    if not is_sharded(model):
        return trainable_state(model)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True, ignore_frozen_params=True))


def checkpoint_parts(model: torch.nn.Module, optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(trainable weights, optimizer state dict) as save_checkpoint takes them; full under FSDP2 (collective)."""
    if not is_sharded(model):
        return full_trainable_state(model), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    weights = full_trainable_state(model)
    return weights, get_optimizer_state_dict(model, _inner(optimizer), options=_options(cpu_offload=True))


def _inner(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def apply_checkpoint(checkpoint: Checkpoint, model: torch.nn.Module, optimizer, lr_scheduler) -> TrainerState:
    """Load a read checkpoint's weights, optimizer and schedule into this run and restore its RNG states.

    Returns its trainer state. Under FSDP2 the full tensors are scattered into the shards (a
    collective: every process calls it). Raises CheckpointError when the checkpoint does not fit.
    """
    path = checkpoint.path
    named = dict(model.named_parameters())
    missing = [k for k in checkpoint.weights if k not in named]
    if missing:
        raise CheckpointError(
            f"{path}: checkpoint holds weights this model does not have, e.g. {missing[:3]}; "
            "was it saved for another model_type or LoRA configuration?"
        )
    weights = {key: value.to(named[key].dtype) for key, value in checkpoint.weights.items()}
    sharded = is_sharded(model)
    if sharded:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(model, weights, options=_options(strict=False))
    else:
        with torch.no_grad():
            for key, value in weights.items():
                named[key].copy_(value)
    try:
        if sharded:
            set_optimizer_state_dict(model, _inner(optimizer), checkpoint.optimizer, options=_options())
        else:
            optimizer.load_state_dict(checkpoint.optimizer)
        lr_scheduler.load_state_dict(checkpoint.lr_scheduler)
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"{path}: the saved optimizer or learning-rate schedule does not fit this run ({error}); "
            "was it saved with another optimizer, lr_scheduler or LoRA configuration?"
        ) from None
    restore_rng(checkpoint.state.rng)
    return checkpoint.state


def lora_from_full_state(
    model: torch.nn.Module, full_state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """peft's LoRA state dict (as adapters.lora_state_dict gives it) from gathered full weights."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, state_dict=full_state)
    return {key: value.detach().contiguous() for key, value in state.items()}


def save_full_model(model: torch.nn.Module, full_state: dict[str, torch.Tensor], folder: Path) -> Path:
    """Write a sharded model's gathered weights the way save_pretrained does (config + safetensors)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_config"):
        model.save_config(folder)
    else:
        events.warn(f"{type(model).__name__} has no save_config; only its weights are written to {folder}")
    save_file(
        {k: v.contiguous() for k, v in full_state.items()},
        str(folder / "diffusion_pytorch_model.safetensors"),
    )
    return folder


def end_training(accelerator) -> None:
    """accelerator.end_training() (trackers finished, the process group destroyed), with the DDP wrapper
    released first; the caller drops its own references to the prepared model before.

    DDP's reducer holds the process group, and its destructor runs with the GIL held. If the reducer
    dropped the group's last reference, gloo's destructor would wait for its worker thread while that
    thread waits for the GIL to free the tensors of the last collectives: a hang at the end of a run.
    With the wrapper gone while the group is still registered, destroying the group drops the last
    reference, and that path releases the GIL.
    """
    accelerator.free_memory()  # accelerate's own references to the prepared model and optimizer
    gc.collect()
    accelerator.end_training()
