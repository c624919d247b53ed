"""The global batch split by rows, and FSDP2 on two gloo processes against one process."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from difftune.config.schema import TrainConfig
from difftune.families.flow_matching import FlowMatchingObjective
from difftune.training.distributed import (
    apply_fsdp2,
    block_lists,
    draw_noise_and_timesteps,
    shard_if_configured,
)


def test_noise_and_timesteps_are_the_rows_of_the_global_draw():
    objective = FlowMatchingObjective(shift=3.0)
    whole = draw_noise_and_timesteps(
        objective, torch.Size([4, 2, 3, 3]), torch.Generator().manual_seed(7), "cpu"
    )
    parts = [
        draw_noise_and_timesteps(
            objective, torch.Size([2, 2, 3, 3]), torch.Generator().manual_seed(7), "cpu", 2, rank
        )
        for rank in (0, 1)
    ]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
    assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])


def test_blocks_of_the_unet_are_sharded_one_by_one():
    from difftune.testing.sdxl import tiny_sdxl_unet

    unet = tiny_sdxl_unet(0)
    blocks = block_lists(unet)
    assert blocks == [*unet.down_blocks, *unet.up_blocks]


def test_fsdp_needs_several_processes():
    config = TrainConfig(model_family="sdxl", fsdp_enable=True)
    events = []
    assert (
        shard_if_configured(torch.nn.Linear(2, 2), config, 1, lambda kind, data: events.append(data)) is False
    )
    assert "fsdp_enable" in events[0]["message"]
    with pytest.raises(RuntimeError, match="torchrun"):
        apply_fsdp2(torch.nn.Linear(2, 2), config)


# -- FSDP2 on two processes ------------------------------------------------------------------
class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.out = torch.nn.Linear(8, 8)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.out(x)


def tiny_lora_model():
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = Tiny()
    model.requires_grad_(False)
    return inject_adapter_in_model(
        LoraConfig(r=2, target_modules=["fc1", "fc2", "out"], init_lora_weights="gaussian"), model
    )


DATA = torch.randn(6, 4, 8, generator=torch.Generator().manual_seed(1))  # 6 steps of a global batch of 4


def train_steps(model, optimizer, steps, rows: slice):
    for step in steps:
        loss = (model(DATA[step][rows]) - 1.0).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad()


def make_optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def fsdp_worker(rank: int, port: int, folder: str) -> None:
    """Train 3 steps sharded, checkpoint, resume into a fresh sharded model, train 3 more, export."""
    import torch.distributed as dist

    from difftune.training.checkpoints import TrainerState, read_checkpoint, save_checkpoint
    from difftune.training.distributed import (
        apply_checkpoint,
        checkpoint_parts,
        full_trainable_state,
        is_sharded,
        lora_from_full_state,
    )

    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=2)
    config = TrainConfig(model_family="sdxl", fsdp_enable=True)
    rows = slice(2 * rank, 2 * rank + 2)
    try:
        model = apply_fsdp2(tiny_lora_model(), config)
        assert is_sharded(model) and is_sharded(model.blocks[0])
        optimizer = make_optimizer(model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        train_steps(model, optimizer, range(3), rows)
        weights, optimizer_state = checkpoint_parts(model, optimizer)
        if rank == 0:
            save_checkpoint(
                folder, weights, optimizer_state, scheduler.state_dict(), TrainerState(global_step=3)
            )
        dist.barrier()

        fresh = apply_fsdp2(tiny_lora_model(), config)
        fresh_optimizer = make_optimizer(fresh)
        fresh_scheduler = torch.optim.lr_scheduler.LambdaLR(fresh_optimizer, lambda step: 1.0)
        checkpoint = read_checkpoint(f"{folder}/checkpoint-3")
        state = apply_checkpoint(checkpoint, fresh, fresh_optimizer, fresh_scheduler)
        assert state.global_step == 3
        train_steps(fresh, fresh_optimizer, range(3, 6), rows)
        full = full_trainable_state(fresh)
        if rank == 0:
            torch.save(lora_from_full_state(fresh, full), f"{folder}/lora.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_on_two_processes_trains_checkpoints_resumes_and_exports_like_one_process(tmp_path):
    from difftune.training.adapters import lora_state_dict

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(fsdp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    sharded = torch.load(tmp_path / "lora.pt")
    from difftune.training.checkpoints import verify_checkpoint

    assert verify_checkpoint(tmp_path / "checkpoint-3") is None

    model = tiny_lora_model()
    optimizer = make_optimizer(model)
    train_steps(model, optimizer, range(6), slice(0, 4))
    single = lora_state_dict(model)
    assert sharded.keys() == single.keys() and len(single) == 10
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], rtol=1e-4, atol=1e-5)


def test_noise_offset_shifts_each_channel_by_a_constant():
    from difftune.families.flow_matching import FlowMatchingObjective
    from difftune.training.distributed import draw_noise_and_timesteps

    objective = FlowMatchingObjective()
    shape = torch.Size((2, 4, 8, 8))
    plain, _ = draw_noise_and_timesteps(objective, shape, torch.Generator().manual_seed(0), "cpu")
    offset, _ = draw_noise_and_timesteps(
        objective, shape, torch.Generator().manual_seed(0), "cpu", noise_offset=0.5
    )
    shift = offset - plain
    assert shift.abs().sum() > 0
    # one constant per (sample, channel)
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift))


def test_end_training_lets_the_ddp_wrapper_go_before_the_process_group(tmp_path):
    """The reducer of a DDP wrapper must not outlive the registered process group: its destructor holds
    the GIL, and gloo's destructor would then wait for a worker thread that waits for the GIL."""
    import weakref

    import torch.distributed as dist
    from accelerate import Accelerator

    from difftune.training.distributed import end_training

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        accelerator = Accelerator()
        wrapper = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        wrapper(torch.ones(1, 2)).sum().backward()
        accelerator._models.append(wrapper)  # as accelerate's prepare keeps it
        released = weakref.ref(wrapper)
        del wrapper
        assert released() is not None and dist.is_initialized()
        end_training(accelerator)
        assert released() is None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
