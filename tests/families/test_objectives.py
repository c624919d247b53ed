"""Epsilon / v objectives against diffusers' DDPM formulas; flow matching's shift and targets."""

import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler

from difftune.families.flow_matching import FlowMatchingObjective, shift_sigmas
from difftune.families.objectives import EpsilonObjective

SDXL_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def tensors(seed=0, shape=(3, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_timesteps_are_uniform_integers_drawn_only_from_the_generator():
    objective = EpsilonObjective(EulerDiscreteScheduler(**SDXL_BETAS))
    torch.manual_seed(123)
    a = objective.sample_timesteps(4096, torch.Generator().manual_seed(7), "cpu")
    torch.manual_seed(456)
    b = objective.sample_timesteps(4096, torch.Generator().manual_seed(7), "cpu")
    assert torch.equal(a, b) and a.dtype == torch.int64
    assert a.min() >= 0 and a.max() <= 999 and a.float().mean() == pytest.approx(499.5, abs=20)


def test_add_noise_and_v_target_match_diffusers_ddpm():
    ddpm = DDPMScheduler(**SDXL_BETAS, prediction_type="v_prediction")
    objective = EpsilonObjective(EulerDiscreteScheduler(**SDXL_BETAS), prediction_type="v_prediction")
    latents, noise = tensors()
    timesteps = torch.tensor([0, 500, 999])
    torch.testing.assert_close(
        objective.add_noise(latents, noise, timesteps), ddpm.add_noise(latents, noise, timesteps)
    )
    torch.testing.assert_close(
        objective.target(latents, noise, timesteps), ddpm.get_velocity(latents, noise, timesteps)
    )
    eps = EpsilonObjective(EulerDiscreteScheduler(**SDXL_BETAS))
    assert eps.prediction_type == "epsilon" and torch.equal(eps.target(latents, noise, timesteps), noise)


def test_min_snr_weights_follow_the_paper():
    scheduler = EulerDiscreteScheduler(**SDXL_BETAS)
    alphas = scheduler.alphas_cumprod
    timesteps = torch.tensor([0, 100, 400, 999])
    snr = alphas[timesteps] / (1 - alphas[timesteps])
    gamma = 5.0
    eps = EpsilonObjective(scheduler, snr_gamma=gamma).loss_weights(timesteps)
    v = EpsilonObjective(scheduler, snr_gamma=gamma, prediction_type="v_prediction").loss_weights(timesteps)
    torch.testing.assert_close(eps, torch.minimum(snr, torch.tensor(gamma)) / snr)
    torch.testing.assert_close(v, torch.minimum(snr, torch.tensor(gamma)) / (snr + 1))
    assert eps[0] < 1 and eps[-1] == pytest.approx(1.0)  # low noise is down-weighted, high noise kept
    assert EpsilonObjective(scheduler).loss_weights(timesteps) is None


def test_epsilon_objective_rejects_flow_prediction_and_bad_gamma():
    with pytest.raises(ValueError, match="flow_matching"):
        EpsilonObjective(EulerDiscreteScheduler(**SDXL_BETAS), prediction_type="flow_matching")
    with pytest.raises(ValueError, match="snr_gamma"):
        EpsilonObjective(EulerDiscreteScheduler(**SDXL_BETAS), snr_gamma=0)


def test_flow_shift_formula():
    sigmas = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(shift_sigmas(sigmas, 3.0), 3 * sigmas / (1 + 2 * sigmas))
    assert shift_sigmas(torch.tensor([0.5]), 3.0).item() == pytest.approx(0.75)


def test_flow_sampling_is_deterministic_shifted_and_in_range():
    plain = FlowMatchingObjective(uniform=True).sample_timesteps(8, torch.Generator().manual_seed(2), "cpu")
    shifted = FlowMatchingObjective(shift=3.0, uniform=True).sample_timesteps(
        8, torch.Generator().manual_seed(2), "cpu"
    )
    torch.testing.assert_close(shifted, shift_sigmas(plain, 3.0))
    logit = FlowMatchingObjective(sigmoid_scale=1.0)
    a = logit.sample_timesteps(2048, torch.Generator().manual_seed(5), "cpu")
    b = logit.sample_timesteps(2048, torch.Generator().manual_seed(5), "cpu")
    assert torch.equal(a, b) and 0 < a.min() and a.max() < 1
    assert a.mean() == pytest.approx(0.5, abs=0.03)


def test_flow_interpolation_and_target():
    objective = FlowMatchingObjective()
    latents, noise = tensors(1)
    sigmas = torch.tensor([0.0, 0.3, 1.0])
    noisy = objective.add_noise(latents, noise, sigmas)
    torch.testing.assert_close(noisy[0], latents[0])
    torch.testing.assert_close(noisy[1], 0.7 * latents[1] + 0.3 * noise[1])
    torch.testing.assert_close(noisy[2], noise[2])
    torch.testing.assert_close(objective.target(latents, noise, sigmas), noise - latents)


def test_soft_min_snr_weights_are_a_smooth_minimum():
    scheduler = EulerDiscreteScheduler(**SDXL_BETAS)
    timesteps = torch.tensor([10, 300, 900])
    hard = EpsilonObjective(scheduler, snr_gamma=5.0)
    soft = EpsilonObjective(scheduler, snr_gamma=5.0, soft_min_snr=True)
    snr = hard.snr(timesteps)
    torch.testing.assert_close(soft.loss_weights(timesteps), 5.0 / (snr + 5.0))
    assert not torch.allclose(soft.loss_weights(timesteps), hard.loss_weights(timesteps))
    assert hard.noise_fraction(torch.tensor([0, 500])).tolist() == [0.0, 0.5]
