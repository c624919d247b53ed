import json

import pytest
import torch
from PIL import Image

from difftune.families.base import Objective
from difftune.families.flow_matching import FlowMatchingObjective
from difftune.training.losses import LossKind, diffusion_loss
from difftune.validation.eval_loss import EvalLoss, plot_eval


class EpsilonObjective(Objective):
    """Integer timesteps 0..999, x_t = x0 + t/1000 * noise, target = noise."""

    def sample_timesteps(self, batch_size, generator, device):
        return torch.randint(0, 1000, (batch_size,), generator=generator).to(device)

    def add_noise(self, latents, noise, timesteps):
        return latents + (timesteps.float() / 1000).view(-1, 1, 1, 1) * noise

    def target(self, latents, noise, timesteps):
        return noise


class FakeFamily:
    """Just the protocol methods EvalLoss uses; the denoiser is a 1x1 conv on the latents."""

    def __init__(self, objective: Objective) -> None:
        self._objective = objective

    def objective(self, components):
        return self._objective

    def model_forward(self, components, denoiser, noisy_latents, timesteps, batch):
        return denoiser(noisy_latents) + batch["bias"].view(-1, 1, 1, 1)

    def loss_mask(self, batch, latents):
        return None


def _batches() -> list[dict]:
    generator = torch.Generator().manual_seed(3)
    return [
        {"latents": torch.randn(2, 4, 4, 4, generator=generator), "bias": torch.tensor([0.0, 0.1])}
        for _ in range(3)
    ]


def _denoiser() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Conv2d(4, 4, 1)


def test_same_model_gives_identical_eval_loss_and_changed_weights_do_not():
    denoiser = _denoiser()
    evaluate = EvalLoss(FakeFamily(EpsilonObjective()), components=None, batches=_batches(), seed=7)
    first = evaluate(denoiser)
    torch.randn(100)  # the global RNG moving must not matter
    second = evaluate(denoiser)
    assert first == second
    again = EvalLoss(FakeFamily(EpsilonObjective()), components=None, batches=_batches(), seed=7)(denoiser)
    assert again == first
    with torch.no_grad():
        denoiser.weight.mul_(0.5)
    changed = evaluate(denoiser)
    assert changed.loss != first.loss
    assert all(changed.per_timestep[t] != first.per_timestep[t] for t in first.per_timestep)


def test_timesteps_are_quantiles_of_the_training_distribution():
    evaluate = EvalLoss(FakeFamily(EpsilonObjective()), None, _batches(), seed=0)
    assert evaluate.timesteps.dtype == torch.int64
    expected = torch.tensor([100, 200, 300, 400, 500, 600, 700, 800, 900])
    assert (evaluate.timesteps - expected).abs().max() <= 15
    flow = EvalLoss(FakeFamily(FlowMatchingObjective(shift=1.0, uniform=True)), None, _batches(), seed=0)
    assert flow.timesteps.dtype == torch.float32
    torch.testing.assert_close(flow.timesteps, torch.linspace(0.1, 0.9, 9), atol=0.02, rtol=0)
    explicit = EvalLoss(FakeFamily(EpsilonObjective()), None, _batches(), timesteps=[250, 750])
    assert explicit.timesteps.tolist() == [250, 750]


def test_loss_matches_a_hand_computed_value_and_mode_is_restored():
    denoiser = torch.nn.Identity()
    batches = [{"latents": torch.ones(1, 1, 2, 2), "bias": torch.zeros(1)}]
    evaluate = EvalLoss(FakeFamily(EpsilonObjective()), None, batches, timesteps=[500])
    result = evaluate(denoiser)
    # prediction = x0 + 0.5 * noise, target = noise -> mse = mean((1 - 0.5 * noise)^2)
    expected = ((1 - 0.5 * evaluate.noise[0]) ** 2).mean().item()
    assert result.per_timestep == {500.0: pytest.approx(expected)}
    assert result.loss == pytest.approx(expected)
    model = _denoiser().train()
    evaluate_model = EvalLoss(FakeFamily(EpsilonObjective()), None, _batches())
    evaluate_model(model)
    assert model.training


def test_event_and_plot(tmp_path):
    evaluate = EvalLoss(FakeFamily(EpsilonObjective()), None, _batches(), timesteps=[100, 900])
    denoiser = _denoiser()
    events = tmp_path / "events.jsonl"
    lines = []
    for step in (10, 20, 30):
        event = evaluate(denoiser).as_event(step)
        assert sorted(event) == ["eval_loss", "eval_loss_t100", "eval_loss_t900", "step"]
        lines.append(json.dumps({"type": "eval", **event}))
        with torch.no_grad():
            denoiser.weight.mul_(0.9)
    events.write_text("\n".join(lines) + "\n")
    png = plot_eval(events, tmp_path / "plots" / "eval.png")
    with Image.open(png) as image:
        assert image.size == (800, 450)
    assert plot_eval(tmp_path / "missing.jsonl", tmp_path / "none.png") is None
    with pytest.raises(ValueError, match="at least one batch"):
        EvalLoss(FakeFamily(EpsilonObjective()), None, [])


def test_eval_loss_uses_the_training_loss_type():
    flow = FlowMatchingObjective(shift=1.0, uniform=True)
    plain = EvalLoss(FakeFamily(flow), None, _batches(), seed=0)
    huber = EvalLoss(FakeFamily(flow), None, _batches(), seed=0, loss_kind=LossKind("huber", 0.1, "constant"))
    denoiser = _denoiser()
    assert huber(denoiser).loss != pytest.approx(plain(denoiser).loss, rel=1e-3)


def test_eval_loss_is_the_mean_of_the_training_loss_on_its_batches_noise_and_timesteps():
    family, kind = FakeFamily(EpsilonObjective()), LossKind("huber", 0.1, "constant")
    batches = _batches()
    for batch in batches:  # the masked-loss mask counts the left half of the latent grid
        batch["loss_mask"] = torch.zeros(2, 1, 4, 4)
        batch["loss_mask"][..., :2] = 1.0
    evaluate = EvalLoss(family, None, batches, timesteps=[300, 700], loss_kind=kind)
    denoiser = _denoiser()
    result = evaluate(denoiser)

    objective = family.objective(None)
    for value in (300, 700):
        batch_means = []
        for batch, noise in zip(batches, evaluate.noise):
            latents, timesteps = batch["latents"], torch.full((2,), value)
            noisy = objective.add_noise(latents, noise, timesteps)
            with torch.no_grad():
                prediction = family.model_forward(None, denoiser, noisy, timesteps, batch)
            target = objective.target(latents, noise, timesteps)
            loss = diffusion_loss(family, objective, batch, latents, prediction, target, timesteps, kind)
            batch_means.append(loss.item())
        # equal batch sizes: the mean over every sample is the mean of the batch means (fp32 vs fp64 sums)
        assert result.per_timestep[float(value)] == pytest.approx(
            sum(batch_means) / len(batch_means), rel=1e-6
        )
