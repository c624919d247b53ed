"""The run's optional parts as one object: CREPA's term and projector, and their checkpoint state."""

from types import SimpleNamespace

import torch

from difftune.families import get_family
from difftune.families.base import Components
from difftune.families.flow_matching import FlowMatchingObjective
from difftune.training.checkpoints import TrainerState, read_checkpoint, save_checkpoint, trainable_state
from difftune.training.distributed import apply_checkpoint
from difftune.training.features import TrainingFeatures
from tests.training import test_crepa
from tests.training.test_crepa import clip_frames, crepa_config, forward, prompt_batch, tiny_transformer

dino_folder = test_crepa.dino_folder  # the tiny DINOv2 fixture

NO_EVAL_DATA = SimpleNamespace(held_out_batches=[], regularisation_datasets=set())


def _features(config, transformer) -> TrainingFeatures:
    family = get_family(config)
    components = Components(transformer, None, [], [], None)
    features = TrainingFeatures.build(
        family, components, FlowMatchingObjective(), config, transformer, "cpu", torch.Generator()
    )
    features.attach(transformer, NO_EVAL_DATA)
    return features


def _step(features, transformer, optimizer) -> torch.Tensor:
    """One forward with CREPA's hooks, its term as the loss, one optimizer step; returns the loss."""
    batch = prompt_batch()
    forward(transformer, batch)
    loss = features.extra_loss({**batch, "pixels": clip_frames()}, latents=None)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    features.after_optimizer_step(transformer, 1)
    return loss.detach()


def test_crepa_and_ema_state_resume_from_a_checkpoint_under_the_keys_ema_and_crepa(tmp_path, dino_folder):
    config = crepa_config(dino_folder, use_ema=True)
    transformer = tiny_transformer()
    features = _features(config, transformer)
    projector = list(features.crepa.projector.parameters())
    assert features.trainable_parameters() == projector  # what the optimizer gets beside the denoiser
    optimizer = torch.optim.Adam(list(transformer.parameters()) + features.trainable_parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    _step(features, transformer, optimizer)
    state = TrainerState(global_step=1, extra=features.state_dict())
    assert sorted(state.extra) == ["crepa", "ema"]
    trainable = trainable_state(transformer)
    path = save_checkpoint(tmp_path, trainable, optimizer.state_dict(), schedule.state_dict(), state)

    resumed_transformer = tiny_transformer()
    resumed = _features(config, resumed_transformer)
    resumed_optimizer = torch.optim.Adam(
        list(resumed_transformer.parameters()) + resumed.trainable_parameters(), lr=1e-3
    )
    resumed_schedule = torch.optim.lr_scheduler.LambdaLR(resumed_optimizer, lambda _: 1.0)
    loaded = apply_checkpoint(read_checkpoint(path), resumed_transformer, resumed_optimizer, resumed_schedule)
    resumed.load_state_dict(loaded.extra)

    for name, value in features.crepa.state_dict().items():
        assert torch.equal(resumed.crepa.state_dict()[name], value), name
    assert resumed.ema.num_updates == features.ema.num_updates == 1
    for name, value in features.ema.shadow.items():
        assert torch.equal(resumed.ema.shadow[name], value), name
    # the next steps of both are the same: projector, its Adam moments and the denoiser all resumed
    for _ in range(2):
        torch.testing.assert_close(
            _step(resumed, resumed_transformer, resumed_optimizer), _step(features, transformer, optimizer)
        )


def test_crepa_turned_on_at_resume_starts_fresh_and_off_adds_nothing(dino_folder):
    transformer = tiny_transformer()
    features = _features(crepa_config(dino_folder), transformer)
    fresh = {k: v.clone() for k, v in features.crepa.state_dict().items()}
    features.load_state_dict({})  # a checkpoint written before CREPA was on
    assert all(torch.equal(features.crepa.state_dict()[k], v) for k, v in fresh.items())

    plain = _features(crepa_config(dino_folder, crepa_enabled=False), tiny_transformer())
    assert plain.crepa is None and plain.trainable_parameters() == [] and plain.state_dict() == {}
    assert plain.extra_loss(prompt_batch(), latents=None) == 0.0
