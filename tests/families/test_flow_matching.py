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
