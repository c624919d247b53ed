import pytest
import torch

from difftune.config.schema import TrainConfig
from difftune.training.optim import (
    averaged_weights,
    build_lr_scheduler,
    build_optimizer,
    clip_gradients,
    parse_optimizer_config,
    use_training_weights,
)


@pytest.mark.parametrize(
    "name",
    ["adamw", "adamw_bf16", "optimi-adamw", "optimi-lion", "prodigy", "adamw_schedulefree", "ao-adamw8bit"],
)
def test_each_optimizer_lowers_a_quadratic(name):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(8))
    lr = 1.0 if name == "prodigy" else 0.05
    config = TrainConfig(model_family="sdxl", optimizer=name, learning_rate=lr, adam_weight_decay=0.0)
    optimizer = build_optimizer([weight], config)
    use_training_weights(optimizer, config)
    start = weight.detach().pow(2).sum().item()
    for _ in range(200 if name == "prodigy" else 30):
        optimizer.zero_grad()
        weight.pow(2).sum().backward()
        optimizer.step()
    assert weight.detach().pow(2).sum().item() < start * 0.8


def test_optimizer_config_string_is_parsed_and_applied():
    assert parse_optimizer_config("weight_decay=0.1,betas=(0.9,0.99)") == {
        "weight_decay": 0.1,
        "betas": (0.9, 0.99),
    }
    config = TrainConfig(model_family="sdxl", optimizer="adamw", optimizer_config="weight_decay=0.25")
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(2))], config)
    assert optimizer.param_groups[0]["weight_decay"] == 0.25
    with pytest.raises(ValueError, match="not key=value"):
        parse_optimizer_config("nonsense")


def test_warmup_then_constant_schedule():
    config = TrainConfig(model_family="sdxl", optimizer="adamw", learning_rate=1.0, lr_warmup_steps=4)
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(2))], config)
    scheduler = build_lr_scheduler(optimizer, config, total_steps=10)
    rates = []
    for _ in range(6):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0]) and rates[5] == 1.0


def test_compile_model_compiles_the_denoiser_in_place():
    from types import SimpleNamespace

    from difftune.training.setup import prepare_denoiser

    denoiser = torch.nn.Sequential(torch.nn.Linear(2, 2))
    config = TrainConfig(
        model_family="sdxl", model_type="full", compile_model=True, gradient_checkpointing=False
    )
    prepared = prepare_denoiser(SimpleNamespace(), SimpleNamespace(denoiser=denoiser), config, torch.float32)
    assert prepared is denoiser and prepared._compiled_call_impl is not None
    assert all(p.requires_grad for p in prepared.parameters())


def expected_rates(name: str, warmup: int, total: int) -> list[float]:
    """The LR after each of `total` optimizer steps of diffusers' schedule stepped once per step, alone."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    from diffusers.optimization import get_scheduler

    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    rates = []
    for _ in range(total):
        optimizer.step()
        scheduler.step()
        rates.append(scheduler.get_last_lr()[0])
    return rates


@pytest.mark.parametrize("num_processes", [1, 2, 3])
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_lr_of_every_step_does_not_depend_on_the_number_of_processes(monkeypatch, num_processes, name):
    """accelerate's stepping as the recipe drives it, with AcceleratorState reporting N processes."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    from difftune.training.optim import step_lr_schedule
    from difftune.training.setup import prepare_for_accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    for shared in (PartialState._shared_state, AcceleratorState._shared_state):
        monkeypatch.setitem(shared, "num_processes", num_processes)
    assert accelerator.num_processes == num_processes
    config = TrainConfig(
        model_family="sdxl", optimizer="adamw", learning_rate=1.0, lr_scheduler=name, lr_warmup_steps=3
    )
    model = torch.nn.Linear(2, 1)
    optimizer = build_optimizer(model.parameters(), config)
    scheduler = build_lr_scheduler(optimizer, config, total_steps=10)
    model, optimizer = prepare_for_accelerator(accelerator, model, optimizer, config, sharded=False)
    rates = []
    for _ in range(10 * 2):  # two accumulated micro-batches per optimizer step
        with accelerator.accumulate(model):
            accelerator.backward(model(torch.ones(1, 2)).sum())
            optimizer.step()
            step_lr_schedule(scheduler, optimizer, accelerator.sync_gradients)
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            rates.append(scheduler.get_last_lr()[0])
    assert rates == pytest.approx(expected_rates(name, 3, 10), abs=1e-12)
    assert rates[2] == pytest.approx(1.0) and rates[-1] == pytest.approx(0.0, abs=1e-12)


def _optimizer(**settings):
    config = TrainConfig(model_family="sdxl", optimizer="adamw", **settings)
    return build_optimizer([torch.nn.Parameter(torch.zeros(2))], config), config


def test_optimizer_betas_reach_the_optimizer():
    optimizer, _ = _optimizer(optimizer_beta1=0.8, optimizer_beta2=0.95)
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.95)
    optimizer, _ = _optimizer(adam_beta1=0.7, optimizer_beta2=0.9)
    assert optimizer.param_groups[0]["betas"] == (0.7, 0.9)
    optimizer, _ = _optimizer(optimizer_beta1=0.8, optimizer_config="betas=(0.5,0.6),amsgrad=true")
    assert optimizer.param_groups[0]["betas"] == (0.5, 0.6) and optimizer.param_groups[0]["amsgrad"] is True


@pytest.mark.parametrize(("sqrt", "factor"), [(False, 4 * 3 * 2), (True, (4 * 3 * 2) ** 0.5)])
def test_lr_scale_multiplies_by_the_global_batch(sqrt, factor):
    config = TrainConfig(
        model_family="sdxl",
        optimizer="adamw",
        learning_rate=1e-4,
        train_batch_size=4,
        gradient_accumulation_steps=3,
        lr_scale=True,
        lr_scale_sqrt=sqrt,
    )
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(2))], config, num_processes=2)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * factor)


def test_polynomial_schedule_ends_at_lr_end():
    optimizer, config = _optimizer(learning_rate=1.0, lr_scheduler="polynomial", lr_end=0.2)
    scheduler = build_lr_scheduler(optimizer, config, total_steps=10)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(0.2)


@pytest.mark.parametrize("method", ["value", "norm"])
def test_grad_clip_method_clips_elements_or_the_norm(method):
    from accelerate import Accelerator

    weight = torch.nn.Parameter(torch.zeros(4))
    weight.grad = torch.tensor([3.0, -4.0, 0.5, 0.0])
    config = TrainConfig(model_family="sdxl", max_grad_norm=1.0, grad_clip_method=method)
    clip_gradients(Accelerator(cpu=True), torch.optim.SGD([weight], lr=1.0), config)
    if method == "value":
        assert weight.grad.tolist() == [1.0, -1.0, 0.5, 0.0]
    else:
        assert weight.grad.norm().item() == pytest.approx(1.0, rel=1e-4)
        assert weight.grad[0] / weight.grad[1] == pytest.approx(-0.75)


@pytest.mark.parametrize("method", ["value", "norm"])
def test_clipping_covers_every_parameter_the_optimizer_trains(method):
    """The denoiser's adapter and a feature's own weights (CREPA's projector) are clipped together."""
    from accelerate import Accelerator

    adapter, projector = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    adapter.grad, projector.grad = torch.tensor([0.3, 0.0]), torch.tensor([0.0, 40.0])
    config = TrainConfig(model_family="sdxl", optimizer="adamw", max_grad_norm=1.0, grad_clip_method=method)
    optimizer = build_optimizer([adapter, projector], config)
    clip_gradients(Accelerator(cpu=True), optimizer, config)
    if method == "value":
        assert projector.grad.tolist() == [0.0, 1.0] and adapter.grad.tolist() == pytest.approx([0.3, 0.0])
    else:  # one joint norm: the large projector gradient scales both down
        joint = torch.cat([adapter.grad, projector.grad]).norm().item()
        assert joint == pytest.approx(1.0, rel=1e-4) and adapter.grad[0].item() < 0.3 / 40


def test_prodigy_step_size_stops_adapting_after_prodigy_steps():
    def final_d(steps):
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(8))
        config = TrainConfig(model_family="sdxl", optimizer="prodigy", learning_rate=1.0, prodigy_steps=steps)
        optimizer = build_optimizer([weight], config)
        history = []
        for _ in range(20):
            optimizer.zero_grad()
            weight.pow(2).sum().backward()
            optimizer.step()
            history.append(optimizer.param_groups[0]["d"])
        return history

    free, frozen = final_d(0), final_d(5)
    assert frozen[:5] == free[:5]
    assert frozen[5:] == [frozen[5]] * 15 and free[-1] > frozen[-1]


def test_schedule_free_adamw_evaluates_with_its_averaged_weights():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(8))
    config = TrainConfig(
        model_family="sdxl", optimizer="adamw_schedulefree", learning_rate=0.05, lr_warmup_steps=3
    )
    optimizer = build_optimizer([weight], config)
    scheduler = build_lr_scheduler(optimizer, config, total_steps=10)
    use_training_weights(optimizer, config)
    for _ in range(10):
        optimizer.zero_grad()
        weight.pow(2).sum().backward()
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == 0.05  # the optimizer warms up itself; the schedule is constant
    training = weight.detach().clone()
    with averaged_weights(optimizer, config):
        averaged = weight.detach().clone()
    assert not torch.equal(training, averaged) and torch.equal(weight.detach(), training)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without CUDA")
def test_bitsandbytes_optimizers_say_they_need_cuda_on_a_cpu():
    from difftune.config import ConfigError

    config = TrainConfig(model_family="sdxl", optimizer="bnb-adamw8bit")
    with pytest.raises(ConfigError, match="NVIDIA GPUs \\(CUDA\\) only.*ao-adamw8bit"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], config)
