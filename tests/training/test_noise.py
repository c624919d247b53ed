"""Timestep bias, offset-noise probability and input perturbation draw what the original tool describes."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from difftune.families.flow_matching import FlowMatchingObjective
from difftune.families.objectives import EpsilonObjective
from difftune.training.distributed import draw_noise_and_timesteps, perturb_inputs
from difftune.training.noise import TimestepBias, draws_offset, input_perturbation_scale

SDXL_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = torch.Size([4000, 4, 2, 2])


def bias(strategy, multiplier=10.0, portion=0.25, begin=0, end=1000):
    config = SimpleNamespace(
        timestep_bias_strategy=strategy,
        timestep_bias_multiplier=multiplier,
        timestep_bias_portion=portion,
        timestep_bias_begin=begin,
        timestep_bias_end=end,
    )
    return TimestepBias.from_config(config)


def draw(objective, timestep_bias, seed=0):
    _, timesteps = draw_noise_and_timesteps(
        objective, SHAPE, torch.Generator().manual_seed(seed), "cpu", bias=timestep_bias
    )
    return timesteps


def test_later_bias_shifts_diffusion_timesteps_to_the_noisy_end():
    objective = EpsilonObjective(EulerDiscreteScheduler(**SDXL_BETAS))
    plain, later = draw(objective, None), draw(objective, bias("later"))
    assert bias("none") is None
    # the last 250 of 1000 timesteps weigh 10x: 2.5 / (2.5 + 0.75) = 0.77 of the draws land there
    # (binomial standard deviation 0.007 for 4000 draws)
    assert (later >= 750).float().mean().item() == pytest.approx(2.5 / 3.25, abs=0.04)
    assert (plain >= 750).float().mean().item() == pytest.approx(0.25, abs=0.04)
    assert later.dtype == torch.int64 and torch.equal(later, draw(objective, bias("later")))


def test_earlier_and_range_biases():
    objective = EpsilonObjective(EulerDiscreteScheduler(**SDXL_BETAS))
    earlier = draw(objective, bias("earlier", portion=0.5, multiplier=3.0))
    assert (earlier < 500).float().mean().item() == pytest.approx(0.75, abs=0.04)
    ranged = draw(objective, bias("range", begin=200, end=300, multiplier=9.0))
    # 100 timesteps at 9x: 900 / (900 + 900) of the mass
    assert ((ranged >= 200) & (ranged < 300)).float().mean().item() == pytest.approx(0.5, abs=0.04)


def test_later_bias_moves_flow_sigmas_up():
    objective = FlowMatchingObjective(uniform=True)
    later = draw(objective, bias("later"))
    assert (later >= 0.75).float().mean().item() == pytest.approx(2.5 / 3.25, abs=0.04)


def test_offset_noise_probability_decides_per_global_batch():
    objective = FlowMatchingObjective()
    shape = torch.Size([2, 4, 8, 8])

    def noise(probability, seed):
        return draw_noise_and_timesteps(
            objective, shape, torch.Generator().manual_seed(seed), "cpu", 1, 0, 0.5, probability
        )[0]

    plain = draw_noise_and_timesteps(objective, shape, torch.Generator().manual_seed(0), "cpu")[0]
    assert torch.equal(noise(0.0, 0), plain)
    assert not torch.equal(noise(1.0, 0), plain)
    hits = sum(draws_offset(0.25, torch.Generator().manual_seed(seed)) for seed in range(2000))
    assert hits / 2000 == pytest.approx(0.25, abs=0.04)


def test_input_perturbation_adds_noise_to_the_inputs_and_decays():
    noise = torch.zeros(2, 4, 3, 3)
    perturbed = perturb_inputs(noise, 0.1, torch.Generator().manual_seed(0))
    assert perturbed.std().item() == pytest.approx(0.1, rel=0.3)
    assert perturb_inputs(noise, 0.0, torch.Generator()) is noise
    assert input_perturbation_scale(0.1, 0, 500) == 0.1
    assert input_perturbation_scale(0.1, 100, 25) == pytest.approx(0.075)
    assert input_perturbation_scale(0.1, 100, 100) == 0.0
