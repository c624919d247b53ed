"""loss_type l2 / huber / smooth_l1 with huber_c and its schedules."""

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from difftune.families.flow_matching import FlowMatchingObjective
from difftune.families.objectives import EpsilonObjective
from difftune.training.losses import LossKind, diffusion_loss, per_sample_loss

SDXL_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def batch(scale=1.0):
    g = torch.Generator().manual_seed(0)
    return scale * torch.randn(3, 4, 8, 8, generator=g), torch.zeros(3, 4, 8, 8)


def test_huber_gives_another_loss_than_l2_on_the_same_batch():
    objective, timesteps = FlowMatchingObjective(), torch.tensor([0.2, 0.5, 0.8])
    prediction, target = batch()
    l2 = per_sample_loss(prediction, target, None)
    huber = per_sample_loss(
        prediction, target, None, LossKind("huber", 0.1, "constant"), objective, timesteps
    )
    smooth = per_sample_loss(
        prediction, target, None, LossKind("smooth_l1", 0.1, "constant"), objective, timesteps
    )
    assert not torch.allclose(l2, huber)
    torch.testing.assert_close(huber, 0.1 * smooth)
    # large errors: huber grows linearly (about 2 c |d|), far below the squared error
    assert (huber < 0.5 * l2).all()
    torch.testing.assert_close(
        per_sample_loss(prediction, target, None, LossKind(), objective, timesteps), l2
    )


def test_huber_is_the_squared_error_for_small_errors():
    prediction, target = batch(scale=1e-3)
    kind = LossKind("huber", 0.1, "constant")
    huber = per_sample_loss(prediction, target, None, kind, FlowMatchingObjective(), torch.tensor([0.5] * 3))
    torch.testing.assert_close(huber, per_sample_loss(prediction, target, None), rtol=1e-3, atol=0)


def test_huber_c_schedules():
    objective = EpsilonObjective(EulerDiscreteScheduler(**SDXL_BETAS))
    timesteps = torch.tensor([0, 500, 1000 - 1])
    exponential = LossKind("huber", 0.1, "exponential").c(objective, timesteps)
    assert exponential[0].item() == pytest.approx(1.0)
    assert exponential[1].item() == pytest.approx(0.1**0.5)
    snr = LossKind("huber", 0.1, "snr").c(objective, timesteps)
    ratio = objective.snr(timesteps).rsqrt()
    torch.testing.assert_close(snr, 0.9 / (1 + ratio) ** 2 + 0.1)
    assert snr[0] > snr[1] > snr[2] > 0.1  # clean timesteps tolerate larger errors quadratically
    constant = LossKind("huber", 0.3, "constant").c(objective, timesteps)
    assert constant.tolist() == pytest.approx([0.3] * 3)


class FirstHalfMasked:
    """A family whose own loss mask counts only the left half of the latent grid."""

    def loss_mask(self, batch, latents):
        mask = torch.zeros(1, 1, *latents.shape[2:])
        mask[..., : latents.shape[-1] // 2] = 1.0
        return mask


def test_diffusion_loss_applies_both_masks_the_sample_weights_and_min_snr_once():
    objective = EpsilonObjective(EulerDiscreteScheduler(**SDXL_BETAS), snr_gamma=5.0)
    timesteps = torch.tensor([50, 500, 950])
    prediction, target = batch()
    latents = torch.zeros_like(prediction)
    data_mask = torch.ones(3, 1, 8, 8)
    data_mask[:, :, :4] = 0.0  # the batch's masked-loss mask drops the top half
    sample_weights = torch.tensor([1.0, 0.5, 2.0])  # prior_loss_weight on some rows
    kind = LossKind("huber", 0.1, "snr")

    loss = diffusion_loss(
        FirstHalfMasked(),
        objective,
        {"loss_mask": data_mask},
        latents,
        prediction,
        target,
        timesteps,
        kind,
        sample_weights,
    )

    counted = kind.elementwise(prediction - target, objective, timesteps)[:, :, 4:, :4]  # bottom left
    expected = counted.mean(dim=(1, 2, 3)) * sample_weights * objective.loss_weights(timesteps)
    torch.testing.assert_close(loss, expected.mean())
    assert loss.ndim == 0
    # each sample's loss with the same weights; the eval loss leaves out the timestep weights
    arguments = (
        FirstHalfMasked(),
        objective,
        {"loss_mask": data_mask},
        latents,
        prediction,
        target,
        timesteps,
    )
    per_sample = diffusion_loss(*arguments, kind, sample_weights, reduction="none")
    torch.testing.assert_close(per_sample, expected)
    unweighted = diffusion_loss(*arguments, kind, sample_weights, reduction="none", timestep_weights=False)
    torch.testing.assert_close(unweighted, counted.mean(dim=(1, 2, 3)) * sample_weights)
