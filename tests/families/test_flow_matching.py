import math

import pytest
import torch

from difftune.families.flow_matching import FlowMatchingObjective, shift_sigmas


def test_shift_formula_matches_closed_form_and_keeps_ends():
    sigmas = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    shifted = shift_sigmas(sigmas, 3.0)
    expected = torch.tensor([0.0, 0.75 / 1.5, 1.5 / 2.0, 2.25 / 2.5, 1.0])
    torch.testing.assert_close(shifted, expected)
    torch.testing.assert_close(shift_sigmas(sigmas, 1.0), sigmas)
    assert shift_sigmas(torch.tensor([0.5]), 0.5).item() == pytest.approx(0.25 / 0.75)


def test_shift_applies_to_sampled_sigmas():
    plain = FlowMatchingObjective(shift=1.0).sample_timesteps(64, torch.Generator().manual_seed(3), "cpu")
    shifted = FlowMatchingObjective(shift=3.0).sample_timesteps(64, torch.Generator().manual_seed(3), "cpu")
    torch.testing.assert_close(shifted, 3 * plain / (1 + 2 * plain))


@pytest.mark.parametrize("uniform", [False, True])
def test_sampling_is_deterministic_and_in_range(uniform):
    objective = FlowMatchingObjective(shift=2.0, uniform=uniform)
    first = objective.sample_timesteps(256, torch.Generator().manual_seed(7), "cpu")
    torch.manual_seed(123)  # the global RNG must not matter
    second = objective.sample_timesteps(256, torch.Generator().manual_seed(7), "cpu")
    other = objective.sample_timesteps(256, torch.Generator().manual_seed(8), "cpu")
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert first.shape == (256,) and first.min() >= 0 and first.max() <= 1


def test_logit_normal_versus_uniform_distributions():
    gen = torch.Generator().manual_seed(0)
    logit = FlowMatchingObjective(sigmoid_scale=1.0).sample_timesteps(20000, gen, "cpu")
    wide = FlowMatchingObjective(sigmoid_scale=3.0).sample_timesteps(20000, gen, "cpu")
    uniform = FlowMatchingObjective(uniform=True).sample_timesteps(20000, gen, "cpu")
    assert abs(logit.mean().item() - 0.5) < 0.01 and logit.std().item() < 0.22  # peaked in the middle
    assert wide.std().item() > uniform.std().item() > logit.std().item()
    assert abs(uniform.std().item() - (1 / 12) ** 0.5) < 0.01


@pytest.mark.parametrize("shape", [(2, 16, 8, 8), (2, 16, 3, 8, 8)])
def test_add_noise_and_target_for_4d_and_5d_latents(shape):
    objective = FlowMatchingObjective()
    latents, noise = torch.randn(shape), torch.randn(shape)
    sigmas = torch.tensor([0.0, 1.0])
    noisy = objective.add_noise(latents, noise, sigmas)
    assert noisy.shape == shape
    torch.testing.assert_close(noisy[0], latents[0])
    torch.testing.assert_close(noisy[1], noise[1])
    mid = objective.add_noise(latents, noise, torch.tensor([0.25, 0.25]))
    torch.testing.assert_close(mid, 0.75 * latents + 0.25 * noise)
    target = objective.target(latents, noise, sigmas)
    torch.testing.assert_close(target, noise - latents)
    # Following the velocity from x_t back by sigma recovers x0.
    torch.testing.assert_close(mid - 0.25 * target, latents)


def test_invalid_shift_is_rejected():
    with pytest.raises(ValueError, match="flow_schedule_shift"):
        FlowMatchingObjective(shift=0.0)


def test_beta_schedule_draws_sigmas_from_the_beta_distribution_repeatably():
    objective = FlowMatchingObjective(beta=(5.0, 1.0))
    first = objective.sample_timesteps(4000, torch.Generator().manual_seed(1), "cpu")
    torch.manual_seed(99)  # the global RNG must not matter
    again = objective.sample_timesteps(4000, torch.Generator().manual_seed(1), "cpu")
    assert torch.equal(first, again)
    # Beta(5, 1): mean 5/6, standard deviation 0.14, so the mean of 4000 draws is within 0.02 of it
    assert first.mean().item() == pytest.approx(5 / 6, abs=0.02)
    logit = FlowMatchingObjective().sample_timesteps(4000, torch.Generator().manual_seed(1), "cpu")
    assert logit.mean().item() == pytest.approx(0.5, abs=0.02)


def test_auto_shift_grows_with_the_latent_size():
    from difftune.families.flow_matching import resolution_shift

    assert resolution_shift((1, 16, 32, 32)) == pytest.approx(math.exp(0.5))  # 256 tokens
    assert resolution_shift((1, 16, 128, 128)) == pytest.approx(math.exp(1.15))  # 4096 tokens
    assert resolution_shift((1, 16, 2, 64, 64)) == pytest.approx(math.exp(0.5 + 0.65 * (2048 - 256) / 3840))
    objective = FlowMatchingObjective(auto_shift=True, uniform=True)
    small = objective.sample_timesteps_for((8, 16, 32, 32), 8, torch.Generator().manual_seed(0), "cpu")
    large = objective.sample_timesteps_for((8, 16, 128, 128), 8, torch.Generator().manual_seed(0), "cpu")
    plain = FlowMatchingObjective(uniform=True).sample_timesteps(8, torch.Generator().manual_seed(0), "cpu")
    torch.testing.assert_close(small, shift_sigmas(plain, math.exp(0.5)))
    torch.testing.assert_close(large, shift_sigmas(plain, math.exp(1.15)))


def test_min_snr_weights_of_the_velocity_loss_weight_the_x0_error_by_min_snr():
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    snr = ((1 - sigmas) / sigmas) ** 2
    hard = FlowMatchingObjective(snr_gamma=5.0).loss_weights(sigmas)
    soft = FlowMatchingObjective(snr_gamma=5.0, soft_min_snr=True).loss_weights(sigmas)
    torch.testing.assert_close(hard, sigmas**2 * snr.clamp(max=5.0))
    torch.testing.assert_close(soft, sigmas**2 * snr * 5.0 / (snr + 5.0))
    assert FlowMatchingObjective().loss_weights(sigmas) is None
