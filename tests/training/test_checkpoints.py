import torch

from difftune.training.checkpoints import (
    TrainerState,
    checkpoint_dirs,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    trainable_state,
)


def _model_and_optim():
    model = torch.nn.Linear(4, 3)
    model.bias.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return model, optimizer, scheduler


def _step(model, optimizer, scheduler):
    loss = model(torch.ones(2, 4)).pow(2).mean()
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_checkpoint_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    model, optimizer, scheduler = _model_and_optim()
    _step(model, optimizer, scheduler)
    generator = torch.Generator().manual_seed(3)
    state = TrainerState(
        global_step=1, sampler={"epoch": 0, "batch_index": 5}, noise_generator=generator.get_state()
    )
    path = save_checkpoint(tmp_path, trainable_state(model), optimizer, scheduler, state)
    expected_next = torch.rand(3)
    saved_weight = model.weight.detach().clone()

    _step(model, optimizer, scheduler)
    assert not torch.equal(model.weight, saved_weight)
    restored = load_checkpoint(path, model, optimizer, scheduler)
    assert torch.equal(model.weight, saved_weight)
    assert restored.global_step == 1 and restored.sampler == {"epoch": 0, "batch_index": 5}
    assert torch.equal(torch.rand(3), expected_next)  # torch RNG restored
    assert "bias" not in trainable_state(model)
    assert scheduler.last_epoch == 1


def test_incomplete_checkpoint_is_ignored_and_limit_prunes(tmp_path):
    model, optimizer, scheduler = _model_and_optim()
    for step in (2, 4, 6):
        save_checkpoint(
            tmp_path,
            trainable_state(model),
            optimizer,
            scheduler,
            TrainerState(global_step=step),
            total_limit=2,
        )
    (tmp_path / "checkpoint-8").mkdir()  # a crash mid-write would leave no complete.json
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    assert resolve_resume(tmp_path, "latest").name == "checkpoint-6"
    assert resolve_resume(tmp_path / "empty", "latest") is None


def test_resume_from_a_missing_path_names_the_choices(tmp_path):
    model, optimizer, scheduler = _model_and_optim()
    save_checkpoint(tmp_path, trainable_state(model), optimizer, scheduler, TrainerState(global_step=3))
    try:
        resolve_resume(tmp_path, "checkpoint-99")
    except FileNotFoundError as exc:
        assert "checkpoint-99" in str(exc) and "checkpoint-3" in str(exc)
    else:
        raise AssertionError("expected FileNotFoundError")
