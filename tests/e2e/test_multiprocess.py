"""Two processes (gloo on the CPU, started by torchrun) train like one process with the global batch."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from difftune.config import load_config
from difftune.events import read_events
from difftune.testing.runs import write_tiny_run
from difftune.training.loop import train

# adam_epsilon far above the gradients (|g| << 1e-2 here) makes each AdamW step lr * m / epsilon: linear
# in the averaged gradients, like SGD. Two processes sum the gradients of a global batch in another order
# than one process does, which moves each gradient by a relative ~1e-6 at most (fp32 rounding, 6e-8 per
# add, over sums of thousands of terms); a linear step keeps that relative size in the weights, where
# Adam's default epsilon would turn the sign of a near-zero gradient into a step of lr.
COMMON = dict(
    max_train_steps=6, checkpointing_steps=2, validation_disable=True, optimizer="adamw", adam_epsilon=1.0
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(config_path, *extra: str) -> None:
    """`torchrun --nproc_per_node 2 -m difftune train --config PATH ...`; fails the test on a bad exit."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "difftune",
        "train",
        "--config",
        str(config_path),
        *extra,
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from difftune.testing.images import make_image_dataset

    folder = tmp_path_factory.mktemp("data") / "images"
    make_image_dataset(folder, n=6, seed=0)
    return folder


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_sdxl, images):
    """The reference: one process, train_batch_size 2, six steps, checkpoints every two."""
    workdir = tmp_path_factory.mktemp("one")
    return train(load_config(write_tiny_run(workdir, tiny_sdxl, images, train_batch_size=2, **COMMON)))


ZERO_START = ("lora_B", "lora_up", "hada_w2_a")


def assert_same_weights(a: dict, b: dict) -> None:
    """Equal up to 1e-4 of the largest trained update, 100 times the gradients' reduction-order error.

    LoRA's B matrices (LoCon's up and LoHa's second w2 factor in LyCORIS files) start at zero, so each
    holds nothing but its updates; the largest of them is the scale of what training changed.
    """
    assert a.keys() == b.keys() and a
    update = max(float(a[key].abs().max()) for key in a if any(part in key for part in ZERO_START))
    assert update > 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4 * update)


@pytest.mark.slow
def test_two_ddp_processes_match_one_process_with_the_global_batch(tmp_path, tiny_sdxl, images, one_process):
    config = write_tiny_run(
        tmp_path, tiny_sdxl, images, train_batch_size=1, **(COMMON | {"max_train_steps": 4})
    )
    torchrun(config)
    out = tmp_path / "out"
    start = read_events(out / "events.jsonl", "start")
    assert [e["processes"] for e in start] == [2]
    two = load_file(str(out / "checkpoint-4" / "trainable.safetensors"))
    one = load_file(str(one_process.output_dir / "checkpoint-4" / "trainable.safetensors"))
    assert_same_weights(one, two)
    assert (
        load_file(str(out / "pytorch_lora_weights.safetensors")).keys()
        == load_file(str(one_process.lora_path)).keys()
    )
    losses = [e["loss"] for e in read_events(out / "events.jsonl", "progress")]
    assert losses == pytest.approx(one_process.losses[:4], abs=1e-5)  # the loss of the whole global batch


@pytest.mark.slow
def test_two_processes_follow_the_lr_schedule_of_one_step_per_optimizer_step(tmp_path, tiny_sdxl, images):
    from diffusers.optimization import get_scheduler

    schedule = dict(lr_scheduler="linear", lr_warmup_steps=2, learning_rate=1e-3)
    config = write_tiny_run(tmp_path, tiny_sdxl, images, train_batch_size=1, **(COMMON | schedule))
    torchrun(config)
    rates = [e["lr"] for e in read_events(tmp_path / "out" / "events.jsonl", "progress")]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    reference = get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=6)
    expected = []
    for _ in range(6):
        optimizer.step()
        reference.step()
        expected.append(reference.get_last_lr()[0])
    assert rates == pytest.approx(expected, rel=1e-9)
    assert rates[1] == pytest.approx(1e-3) and rates[-1] == 0.0  # warm-up ends at step 2, decays to 0 at 6


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [True, False], ids=["fsdp2", "ddp"])
def test_a_two_process_checkpoint_resumes_and_exports_the_lora_of_one_process(
    tmp_path, tiny_sdxl, images, one_process, fsdp
):
    config = write_tiny_run(
        tmp_path, tiny_sdxl, images, train_batch_size=1, fsdp_enable=fsdp, **(COMMON | {"max_train_steps": 4})
    )
    torchrun(config)
    out = tmp_path / "out"
    saved = load_file(str(out / "checkpoint-4" / "trainable.safetensors"))  # full tensors, not shards
    assert_same_weights(
        load_file(str(one_process.output_dir / "checkpoint-4" / "trainable.safetensors")), saved
    )

    torchrun(config, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    resumed = [e["message"] for e in read_events(out / "events.jsonl", "log") if "resumed" in e["message"]]
    assert resumed and "checkpoint-4" in resumed[-1]
    assert_same_weights(
        load_file(str(one_process.lora_path)), load_file(str(out / "pytorch_lora_weights.safetensors"))
    )
    assert json.loads((out / "config.resolved.json").read_text())["fsdp_enable"] is fsdp


@pytest.mark.slow
def test_fsdp2_runs_validate_like_one_process(tmp_path, tiny_sdxl, images):
    import numpy as np
    from PIL import Image

    settings = dict(
        max_train_steps=2, validation_steps=1, checkpointing_steps=0, validation_resolution="64x64"
    )
    one = train(
        load_config(write_tiny_run(tmp_path / "one", tiny_sdxl, images, train_batch_size=2, **settings))
    )
    config = write_tiny_run(
        tmp_path / "two", tiny_sdxl, images, train_batch_size=1, fsdp_enable=True, **settings
    )
    torchrun(config)
    out = tmp_path / "two" / "out"
    shown = [p for e in read_events(out / "events.jsonl", "validation") for p in e["paths"]]
    assert [p.split("/validation/")[1] for p in shown] == ["1/validation-64x64.png", "2/validation-64x64.png"]
    for step in ("1", "2"):
        ours = np.asarray(Image.open(out / "validation" / step / "validation-64x64.png"), dtype=np.int16)
        reference = np.asarray(
            Image.open(one.output_dir / "validation" / step / "validation-64x64.png"), dtype=np.int16
        )
        # the weights agree to float rounding (see above); the 8-bit pixels may round the other way
        assert np.abs(ours - reference).max() <= 2


@pytest.mark.slow
def test_two_ddp_processes_train_the_text_encoders_like_one_process_with_the_global_batch(
    tmp_path, tiny_sdxl, images
):
    settings = COMMON | {"max_train_steps": 4, "checkpointing_steps": 0, "train_text_encoder": True}
    one = train(
        load_config(write_tiny_run(tmp_path / "one", tiny_sdxl, images, train_batch_size=2, **settings))
    )
    torchrun(write_tiny_run(tmp_path / "two", tiny_sdxl, images, train_batch_size=1, **settings))
    out = tmp_path / "two" / "out"
    assert [e["processes"] for e in read_events(out / "events.jsonl", "start")] == [2]
    ours = load_file(str(out / "pytorch_lora_weights.safetensors"))
    reference = load_file(str(one.lora_path))
    assert ours.keys() == reference.keys()
    # each model's own largest update sets its tolerance: the encoders' updates are far smaller than the UNet's
    for prefix in ("unet.", "text_encoder.", "text_encoder_2."):
        assert_same_weights(
            {k: v for k, v in reference.items() if k.startswith(prefix)},
            {k: v for k, v in ours.items() if k.startswith(prefix)},
        )
    losses = [e["loss"] for e in read_events(out / "events.jsonl", "progress")]
    assert losses == pytest.approx(one.losses, abs=1e-5)  # the loss of the whole global batch
