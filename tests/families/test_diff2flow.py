"""Diff2Flow: flow-matching time and states mapped onto SDXL's diffusion schedule."""

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from difftune.config.schema import TrainConfig
from difftune.families.base import Components
from difftune.families.objectives import Diff2FlowObjective, EpsilonObjective
from difftune.families.sdxl import SDXLFamily
from difftune.testing.sdxl import POOLED_DIM, SDXL_SCHEDULER_CONFIG, TEXT_HIDDEN, tiny_sdxl_unet
from difftune.training.losses import per_sample_loss


@pytest.fixture(scope="module")
def scheduler():
    return EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)


def test_flow_time_and_diffusion_timestep_round_trip(scheduler):
    objective = Diff2FlowObjective(scheduler)
    steps = torch.tensor([0, 1, 10, 250, 500, 777, 998, 999])
    t = objective.flow_time(steps)
    assert torch.all(t[1:] > t[:-1]) and objective.t_min == pytest.approx(float(t[0]))
    torch.testing.assert_close(objective.diffusion_timesteps(t), steps.float(), atol=2e-3, rtol=0)
    # halfway (in log-SNR) between two integer timesteps maps to a fractional one between them
    between = objective.diffusion_timesteps(objective.flow_time(torch.tensor([400, 401])).mean().reshape(1))
    assert 400.0 < float(between) < 401.0


def test_flow_state_scaled_is_the_diffusion_state_at_the_matching_timestep(scheduler):
    flow = Diff2FlowObjective(scheduler)
    diffusion = EpsilonObjective(scheduler)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    steps = torch.tensor([3, 420, 990])
    t = flow.flow_time(steps)
    x_diff, mapped = flow.model_inputs(flow.add_noise(x0, noise, t), t)
    torch.testing.assert_close(x_diff, diffusion.add_noise(x0, noise, steps), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mapped, steps.float(), atol=2e-3, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_a_perfect_diffusion_prediction_is_a_perfect_velocity(scheduler, prediction_type):
    objective = Diff2FlowObjective(scheduler, prediction_type=prediction_type, velocity_loss=True)
    generator = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 4, 8, 8, generator=generator), torch.randn(4, 4, 8, 8, generator=generator)
    t = objective.sample_timesteps(4, generator, "cpu")
    assert torch.all((t >= objective.t_min) & (t <= objective.t_max))
    x_diff, _ = objective.model_inputs(objective.add_noise(x0, noise, t), t)
    a, s = objective.coefficients(t, x0)
    perfect = {"epsilon": noise, "v_prediction": a * noise - s * x0, "sample": x0}[prediction_type]
    velocity = objective.model_output(perfect, x_diff, t)
    target = objective.target(x0, noise, t)
    torch.testing.assert_close(target, noise - x0)
    torch.testing.assert_close(velocity, target, atol=1e-4, rtol=1e-4)
    assert float(per_sample_loss(velocity, target, None).max()) < 1e-8
    assert float(per_sample_loss(perfect + 0.1, target, None).min()) > 1e-3  # a wrong one is not


def test_without_velocity_loss_the_target_is_the_native_one(scheduler):
    objective = Diff2FlowObjective(scheduler, prediction_type="epsilon", velocity_loss=False)
    x0, noise = torch.ones(2, 4, 2, 2), torch.full((2, 4, 2, 2), 2.0)
    t = torch.tensor([0.3, 0.7])
    assert torch.equal(objective.target(x0, noise, t), noise)
    prediction = torch.randn(2, 4, 2, 2)
    assert torch.equal(objective.model_output(prediction, x0, t), prediction)


def _tiny_family(**overrides):
    config = TrainConfig(model_family="sdxl", pretrained_model_name_or_path="unused", seed=0, **overrides)
    components = Components(
        denoiser=tiny_sdxl_unet(0),
        vae=None,
        text_encoders=[],
        tokenizers=[],
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
    )
    return SDXLFamily(config), components


def test_sdxl_family_uses_diff2flow_when_enabled():
    family, components = _tiny_family(diff2flow_enabled=True, diff2flow_loss=True)
    objective = family.objective(components)
    assert isinstance(objective, Diff2FlowObjective) and objective.velocity_loss
    assert isinstance(_tiny_family()[0].objective(components), EpsilonObjective)


def test_tiny_sdxl_trains_with_the_flow_matching_loss():
    family, components = _tiny_family(diff2flow_enabled=True, diff2flow_loss=True)
    objective = family.objective(components)
    unet = components.denoiser.train()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    batch = {
        "prompt_embeds": torch.randn(2, 7, 2 * TEXT_HIDDEN, generator=generator),
        "pooled_prompt_embeds": torch.randn(2, POOLED_DIM, generator=generator),
        "original_sizes": torch.tensor([[64, 64]] * 2),
        "crop_coords": torch.tensor([[0, 0]] * 2),
        "target_sizes": torch.tensor([[64, 64]] * 2),
    }
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    fixed = torch.Generator().manual_seed(5)  # the same noise and times each step: the loss must fall
    noise, t = torch.randn(latents.shape, generator=fixed), objective.sample_timesteps(2, fixed, "cpu")
    losses = []
    for _ in range(8):
        prediction = family.model_forward(components, unet, objective.add_noise(latents, noise, t), t, batch)
        loss = per_sample_loss(prediction, objective.target(latents, noise, t), None).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]
