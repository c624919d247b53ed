"""Scheduled sampling: rolled-out inputs, their probability ramp, and a run that trains with them."""

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from difftune.config import load_config
from difftune.config.schema import TrainConfig
from difftune.events import warnings_to
from difftune.families.flow_matching import FlowMatchingObjective
from difftune.families.objectives import Diff2FlowObjective, EpsilonObjective
from difftune.testing.runs import write_tiny_run
from difftune.testing.sdxl import SDXL_SCHEDULER_CONFIG
from difftune.training.features import TrainingFeatures
from difftune.training.scheduled_sampling import ScheduledSampler


def config(**overrides) -> TrainConfig:
    values = dict(
        model_family="sdxl",
        scheduled_sampling_max_step_offset=4,
        scheduled_sampling_probability=1.0,
        scheduled_sampling_sampler="euler",
    )
    return TrainConfig(**(values | overrides))


class OracleFamily:
    """model_forward answers with the true epsilon / velocity (or a constant when `perfect` is off)."""

    def __init__(self, latents, noise, kind: str, perfect: bool = True):
        self.latents, self.noise, self.kind, self.perfect = latents, noise, kind, perfect
        self.calls = 0

    def model_forward(self, components, model, noisy, timesteps, batch):
        self.calls += 1
        if not self.perfect:
            return torch.zeros_like(noisy)
        return self.noise if self.kind == "epsilon" else self.noise - self.latents


def data(seed=0, batch_size=3):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 4, 8, 8, generator=generator), torch.randn(
        batch_size, 4, 8, 8, generator=generator
    )


OBJECTIVES = {
    "epsilon": lambda: EpsilonObjective(EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)),
    "flow": lambda: FlowMatchingObjective(shift=3.0),
    "diff2flow": lambda: Diff2FlowObjective(EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)),
}


def timesteps_for(name, objective, batch_size=3):
    if name == "epsilon":
        return torch.tensor([10, 500, 990])[:batch_size]
    return torch.tensor([0.2, 0.5, 0.9])[:batch_size].clamp(max=objective.t_max - 0.01)


def rollout(name, perfect, cfg, step=0, seed=0):
    objective = OBJECTIVES[name]()
    latents, noise = data()
    kind = "epsilon" if name == "epsilon" else "velocity"
    family = OracleFamily(latents, noise, kind, perfect)
    t = timesteps_for(name, objective)
    sampler = ScheduledSampler(family, None, objective, cfg, generator=torch.Generator().manual_seed(seed))
    noisy = sampler(None, latents, noise, t, {}, step)
    return noisy, objective.add_noise(latents, noise, t), family.calls


@pytest.mark.parametrize("name", ["epsilon", "flow", "diff2flow"])
def test_probability_one_rolls_out_and_a_perfect_model_lands_on_the_true_state(name):
    noisy, reference, calls = rollout(name, perfect=False, cfg=config())
    assert 1 <= calls <= 4
    assert not torch.allclose(noisy, reference, atol=1e-3)  # the model's own steps, not add_noise
    # the sampler is exact for a perfect predictor: its rollout stays on the noising path
    noisy, reference, _ = rollout(name, perfect=True, cfg=config())
    torch.testing.assert_close(noisy, reference, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("steps", [1000, 50])
def test_flow_rollouts_start_whole_steps_of_the_objectives_schedule_above_the_timestep(steps):
    objective = FlowMatchingObjective(num_train_timesteps=steps)
    latents, noise = data()
    t = torch.tensor([0.2, 0.5, 0.7])
    family = OracleFamily(latents, noise, "velocity", perfect=False)  # zero velocity: x stays at the start
    sampler = ScheduledSampler(family, None, objective, config(), generator=torch.Generator().manual_seed(0))
    noisy = sampler(None, latents, noise, t, {}, 0)
    # x_s - x_t = (s - t)(noise - x0) with s = t + offset / steps, offset in 1..4
    offsets = ((noisy - objective.add_noise(latents, noise, t)) / (noise - latents)).median(dim=1).values
    offsets = offsets.flatten(1).median(dim=1).values * steps
    torch.testing.assert_close(offsets, offsets.round(), atol=1e-2, rtol=0)
    assert ((offsets.round() >= 1) & (offsets.round() <= 4)).all()


@pytest.mark.parametrize("name", ["epsilon", "flow"])
def test_probability_zero_is_add_noise_and_draws_nothing(name):
    objective = OBJECTIVES[name]()
    latents, noise = data()
    t = timesteps_for(name, objective)
    generator = torch.Generator().manual_seed(3)
    before = generator.get_state()
    family = OracleFamily(latents, noise, "epsilon", perfect=False)
    cfg = config(scheduled_sampling_probability=0.0)
    features = TrainingFeatures.build(family, None, objective, cfg, None, "cpu", generator)
    assert features.scheduled_sampler is None
    noisy = features.noisy_inputs(None, latents, noise, t, {}, 5)
    assert torch.equal(noisy, objective.add_noise(latents, noise, t))
    assert torch.equal(generator.get_state(), before) and family.calls == 0


def test_rollouts_draw_the_choice_then_the_offset_of_each_global_row_and_nothing_else():
    """The draw order a run's noise generator (and so an exact resume) depends on: p-draws for every row of
    the global batch, then offsets in [1, max_step_offset]; then the model steps the longest rollout."""
    cfg = config(scheduled_sampling_probability=0.5, scheduled_sampling_max_step_offset=3)
    objective = OBJECTIVES["flow"]()
    latents, noise = data(batch_size=2)
    family = OracleFamily(latents, noise, "velocity")
    generator = torch.Generator().manual_seed(4)
    sampler = ScheduledSampler(family, None, objective, cfg, 2, 1, generator)
    sampler(None, latents, noise, timesteps_for("flow", objective, 2), {}, 0)

    replay = torch.Generator().manual_seed(4)
    chosen = torch.rand(4, generator=replay) < 0.5
    offsets = torch.randint(1, 4, (4,), generator=replay) * chosen
    assert torch.equal(generator.get_state(), replay.get_state())
    assert family.calls == int(offsets.max())
    assert torch.equal(
        ScheduledSampler(None, None, objective, cfg, 2, 1, torch.Generator().manual_seed(4)).draw_offsets(
            2, 0
        )[0],
        offsets[2:],
    )


def test_probability_ramps_up_over_the_ramp_steps():
    cfg = config(scheduled_sampling_probability=0.8, scheduled_sampling_ramp_steps=10)
    ramped = ScheduledSampler(None, None, OBJECTIVES["flow"](), cfg)
    assert [ramped.probability(s) for s in (0, 5, 10, 50)] == pytest.approx([0.0, 0.4, 0.8, 0.8])
    steady = ScheduledSampler(None, None, OBJECTIVES["flow"](), config(scheduled_sampling_probability=0.3))
    assert steady.probability(0) == pytest.approx(0.3)
    _, _, calls = rollout("epsilon", perfect=False, cfg=cfg, step=0)
    assert calls == 0  # p is still 0 at step 0


def test_processes_draw_their_rows_of_the_global_batch():
    cfg = config(scheduled_sampling_probability=0.5, scheduled_sampling_max_step_offset=6)

    def sampler(num_processes=1, rank=0):
        generator = torch.Generator().manual_seed(9)
        return ScheduledSampler(None, None, OBJECTIVES["flow"](), cfg, num_processes, rank, generator)

    whole, longest = sampler().draw_offsets(4, 0)
    parts = [sampler(2, rank).draw_offsets(2, 0) for rank in (0, 1)]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole)
    assert {p[1] for p in parts} == {longest} and longest == int(whole.max())
    assert set(whole.tolist()) <= set(range(7))


def test_a_unipc_setting_warns_that_steps_are_first_order():
    import difftune.training.scheduled_sampling as module

    module._warned_unipc = False
    got = []
    with warnings_to(lambda *event: got.append(event)):
        rollout("epsilon", perfect=True, cfg=config(scheduled_sampling_sampler="unipc"))
    assert [kind for kind, _ in got] == ["warning"] and "first-order" in got[0][1]["message"]


@pytest.mark.slow
def test_a_training_run_with_rollouts_lowers_the_loss(tmp_path, tiny_sdxl):
    from difftune.testing.images import make_image_dataset
    from difftune.training.loop import train

    images = tmp_path / "images"
    make_image_dataset(images, n=6, seed=0)
    path = write_tiny_run(
        tmp_path,
        tiny_sdxl,
        images,
        max_train_steps=6,
        checkpointing_steps=0,
        learning_rate=5e-3,
        scheduled_sampling_max_step_offset=3,
        scheduled_sampling_probability=1.0,
        scheduled_sampling_sampler="euler",
    )
    result = train(load_config(path))
    assert result.global_step == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
