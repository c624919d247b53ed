"""The training recipe: one run, top to bottom.

`_setup` builds what the steps need once (accelerator, family, components, data, denoiser, features,
optimizer, schedule) into a `Run`; `_resume` restores a checkpoint; `_steps` runs each step:
batch -> noise and timesteps -> features.noisy_inputs -> target -> family.model_forward ->
diffusion_loss + features.extra_loss -> backward -> optimizer step -> events (-> checkpoint,
validation); `_finish` writes the final weights, validation and loss plot.
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from difftune.config import LoadedConfig, write_resolved
from difftune.config.schema import TrainConfig
from difftune.events import EventBus, warnings_to
from difftune.families import get_family
from difftune.families.base import Components, Family, Objective
from difftune.training.checkpoints import (
    CheckpointDiskFull,
    TrainerState,
    read_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from difftune.training.distributed import (
    apply_checkpoint,
    checkpoint_parts,
    draw_noise_and_timesteps,
    end_training,
    full_trainable_state,
    shard_if_configured,
)
from difftune.training.features import TrainingFeatures
from difftune.training.losses import LossKind, diffusion_loss
from difftune.training.noise import TimestepBias
from difftune.training.optim import (
    build_lr_scheduler,
    build_optimizer,
    clip_gradients,
    scaled_learning_rate,
    step_lr_schedule,
    use_averaged_weights,
    use_training_weights,
)
from difftune.training.setup import (
    build_accelerator,
    check_adapter_targets,
    check_block_indices,
    check_dataset_folders,
    check_fetchable_models,
    choose_placement,
    default_bus,
    load_components,
    prepare_denoiser,
    prepare_for_accelerator,
    prepare_frozen,
    save_final_weights,
    text_cache_dir,
    weight_dtype_for,
)
from difftune.training.text_encoders import check_text_encoder_training
from difftune.validation.schedule import Validation, maybe_validate


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    lora_path: Path | None = None
    model_path: Path | None = None
    validation_paths: list[Path] = field(default_factory=list)
    loss_plot: Path | None = None
    losses: list[float] = field(default_factory=list)
    interrupted: bool = False


def train(
    loaded: LoadedConfig, bus: EventBus | None = None, stop_after_steps: int | None = None
) -> TrainResult:
    """Train as the config says. `stop_after_steps` ends early as if interrupted (for tests)."""
    config = loaded.train
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_resolved(loaded, output_dir)

    accelerator = build_accelerator(config)
    bus = bus or default_bus(config, output_dir, accelerator.is_main_process)
    try:
        with warnings_to(bus.emit):  # deep code's `events.warn` reaches this run's bus
            run = _setup(loaded, accelerator, bus)
            state = _resume(run)
            result = _steps(run, state, stop_after_steps)
            _finish(run, state, result, loaded)
            return result
    except Exception as exc:  # webhooks and the web UI learn why the run stopped
        bus.emit("error", {"message": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        bus.close()
        raise


@dataclass
class Run:
    """What the steps need, gathered once in set-up: the step reads these, never the config."""

    config: TrainConfig  # for what the named calls after a step read (checkpoints, validation)
    accelerator: Any
    bus: EventBus
    family: Family
    components: Components
    objective: Objective
    data: Any
    denoiser: torch.nn.Module  # as accelerate prepared it (the DDP wrapper), for the trained pass
    model: torch.nn.Module  # the unwrapped denoiser, for everything else
    optimizer: Any
    lr_scheduler: Any
    features: TrainingFeatures
    validation: Validation
    noise_generator: torch.Generator
    loss_kind: LossKind
    timestep_bias: TimestepBias | None
    noise_offset: tuple[float, float]  # (strength, probability of a batch)
    total_steps: int
    sharded: bool
    resume_path: Path | None

    def draw_noise(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise (B, ...) and timesteps (B,) of this process's rows of the global batch."""
        a = self.accelerator
        offset, probability = self.noise_offset
        return draw_noise_and_timesteps(
            self.objective,
            latents.shape,
            self.noise_generator,
            a.device,
            a.num_processes,
            a.process_index,
            offset,
            probability,
            self.timestep_bias,
        )


def _setup(loaded: LoadedConfig, accelerator, bus: EventBus) -> Run:
    """Accelerator, family, components, data, denoiser, features, optimizer, schedule: checked first."""
    from difftune.data.pipeline import prepare_training_data
    from difftune.validation.generate import validation_conditioning_image
    from difftune.validation.prompts import validation_prompts

    config = loaded.train
    output_dir = Path(config.output_dir)
    for warning in loaded.warnings:
        bus.emit("warning", {"message": warning})
    placement_note = choose_placement(config.mixed_precision).note
    if placement_note:
        bus.emit("warning", {"message": placement_note})
    if config.seed is not None:
        from accelerate.utils import set_seed

        set_seed(config.seed)
    family = get_family(config, bus.emit)  # its check() ran when the config was loaded
    check_text_encoder_training(family, config)
    check_dataset_folders(loaded.datasets)  # before the model load, which can take minutes
    resume_path = resolve_resume(  # verified now, so a damaged checkpoint stops before the model load
        output_dir, config.resume_from_checkpoint, config.allow_resume_outside_output_dir, bus.emit
    )
    check_fetchable_models(config)
    check_block_indices(family, config)
    weight_dtype = weight_dtype_for(config, accelerator.device)
    bus.emit("log", {"message": f"loading {family.name} from {family.model_id()}"})
    components = load_components(family, accelerator.device, weight_dtype)
    check_adapter_targets(config, components.denoiser)
    for note in prepare_frozen(family, components, config, accelerator.device):
        bus.emit("log", {"message": note})

    prompts = validation_prompts(config)
    extra_prompts = [p for _, p in prompts] + [config.validation_negative_prompt, ""]
    with accelerator.main_process_first():  # the main process fills the caches, the others read them
        data = prepare_training_data(
            config,
            loaded.datasets,
            text_cache_dir(loaded),
            family,
            components,
            accelerator.device,
            bus.emit,
            num_processes=accelerator.num_processes,
            process_index=accelerator.process_index,
            extra_prompts=extra_prompts,
        )
    conditioning_image = validation_conditioning_image(loaded.all_datasets)  # generated ones exist now

    denoiser = prepare_denoiser(family, components, config, weight_dtype, accelerator.device, bus.emit)
    sharded = shard_if_configured(denoiser, config, accelerator.num_processes, bus.emit)  # FSDP2
    objective = family.objective(components)
    noise_generator = torch.Generator().manual_seed(config.seed if config.seed is not None else 0)
    features = TrainingFeatures.build(  # scheduled sampling, CREPA, text encoders: what the optimizer trains
        family,
        components,
        objective,
        config,
        denoiser,
        accelerator.device,
        noise_generator,
        accelerator.num_processes,
        accelerator.process_index,
    )
    optimizer = build_optimizer(
        list(denoiser.parameters()) + features.trainable_parameters(), config, accelerator.num_processes
    )
    features.add_parameter_groups(
        optimizer, scaled_learning_rate(config, accelerator.num_processes) / config.learning_rate
    )
    steps_per_epoch = max(1, data.sampler.batches_per_epoch // config.gradient_accumulation_steps)
    total_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    lr_scheduler = build_lr_scheduler(optimizer, config, total_steps)
    denoiser, optimizer = prepare_for_accelerator(accelerator, denoiser, optimizer, config, sharded)
    use_training_weights(optimizer, config)
    model = accelerator.unwrap_model(denoiser)

    validation = Validation(
        family,
        components,
        model,
        config,
        bus,
        conditioning_image,
        features,
        optimizer,
        prompts,
        runs_here=accelerator.is_main_process or sharded,  # every shard joins the sampler's forward passes
        write=accelerator.is_main_process,
    )
    return Run(
        config=config,
        accelerator=accelerator,
        bus=bus,
        family=family,
        components=components,
        objective=objective,
        data=data,
        denoiser=denoiser,
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        features=features,
        validation=validation,
        noise_generator=noise_generator,
        loss_kind=LossKind.from_config(config),
        timestep_bias=TimestepBias.from_config(config),
        noise_offset=(config.effective_noise_offset, config.effective_noise_offset_probability),
        total_steps=total_steps,
        sharded=sharded,
        resume_path=resume_path,
    )


def _resume(run: Run) -> TrainerState:
    """The checkpoint's weights, optimizer, schedule, sampler and generator; then the features of the
    prepared, resumed model (TREAD, EMA, prior preservation, evaluator) and their checkpoint state."""
    state = TrainerState()
    if run.resume_path is not None:
        checkpoint = read_checkpoint(run.resume_path)
        state = apply_checkpoint(checkpoint, run.model, run.optimizer, run.lr_scheduler)
        run.noise_generator.set_state(state.noise_generator)
        run.data.sampler.load_state_dict(state.sampler)
        run.bus.emit("log", {"message": f"resumed from {run.resume_path} at step {state.global_step}"})
    elif run.config.resume_from_checkpoint:
        run.bus.emit("log", {"message": "no checkpoint to resume from yet; starting at step 0"})
    run.features.attach(run.model, run.data)  # EMA starts from the resumed weights
    run.features.load_state_dict(state.extra)  # "ema", "crepa", "text_encoder_lora"
    return state


def _steps(run: Run, state: TrainerState, stop_after_steps: int | None) -> TrainResult:
    """Optimizer steps until the total (or `stop_after_steps`), with checkpoints and validation."""
    accelerator, features, model = run.accelerator, run.features, run.model
    result = TrainResult(output_dir=Path(run.config.output_dir), global_step=state.global_step)
    run.bus.emit(
        "start",
        {
            "total_steps": run.total_steps,
            "first_step": state.global_step,
            "samples": run.data.num_samples,
            "family": run.family.name,
            "model_type": run.config.model_type,
            "processes": accelerator.num_processes,
        },
    )
    micro_batches = run.data.sampler.iter_forever()
    accumulated, micro_count, started = 0.0, 0, time.perf_counter()
    first_step = state.global_step
    run.denoiser.train()
    while state.global_step < run.total_steps:
        batch = run.data.load_batch(next(micro_batches))
        with accelerator.accumulate(run.denoiser):
            latents = batch["latents"].to(accelerator.device)
            noise, timesteps = run.draw_noise(latents)
            with accelerator.autocast():
                noisy = features.noisy_inputs(model, latents, noise, timesteps, batch, state.global_step)
                target = run.objective.target(latents, noise, timesteps)
                target = features.target(noisy, timesteps, batch, target)  # prior preservation's rows
                batch = features.encode_batch(batch)  # train_text_encoder: the captions encoded now
                prediction = run.family.model_forward(run.components, run.denoiser, noisy, timesteps, batch)
            sample_weights = features.sample_weights(batch, prediction.device)  # prior_loss_weight
            loss = diffusion_loss(
                run.family,
                run.objective,
                batch,
                latents,
                prediction,
                target,
                timesteps,
                run.loss_kind,
                sample_weights,
            ) + features.extra_loss(batch, latents)
            accelerator.backward(loss)
            _clip_and_step(run)
        accumulated += accelerator.reduce(loss.detach(), "mean").item()  # the global batch's loss
        micro_count += 1
        if not accelerator.sync_gradients:
            continue

        state.global_step += 1
        features.after_optimizer_step(model, state.global_step)
        step_loss, accumulated, micro_count = accumulated / micro_count, 0.0, 0
        result.losses.append(step_loss)
        rate = (state.global_step - first_step) / max(time.perf_counter() - started, 1e-9)
        _report(run, state.global_step, step_loss, rate)
        _maybe_checkpoint(run, state)
        if state.global_step < run.total_steps:  # the last step's validation is the final one
            result.validation_paths += maybe_validate(run.validation, state.global_step)
        features.maybe_evaluate(model, state.global_step, run.bus.emit)
        if stop_after_steps is not None and state.global_step >= stop_after_steps:
            result.interrupted = True
            break
    result.global_step = state.global_step
    return result


def _clip_and_step(run: Run) -> None:
    """Clip the gradients once they are whole (the last micro-batch), then the optimizer and schedule step."""
    if run.accelerator.sync_gradients:
        run.features.average_gradients(run.accelerator)  # the text encoders' (DDP averages the denoiser's)
        clip_gradients(run.accelerator, run.optimizer, run.config)
    run.optimizer.step()
    step_lr_schedule(run.lr_scheduler, run.optimizer, run.accelerator.sync_gradients)
    run.optimizer.zero_grad(set_to_none=True)


def _report(run: Run, step: int, loss: float, rate: float) -> None:
    """The progress event of an optimizer step; a loss that is not finite stops the run."""
    run.bus.emit(
        "progress",
        {
            "step": step,
            "loss": loss,
            "lr": run.lr_scheduler.get_last_lr()[0],
            "it_per_s": rate,
            "eta_s": (run.total_steps - step) / max(rate, 1e-9),
        },
    )
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"loss became {loss} at step {step}; lower learning_rate or use mixed_precision bf16 instead of fp16"
        )


def _maybe_checkpoint(run: Run, state: TrainerState) -> None:
    """checkpoint-STEP every checkpointing_steps: weights, optimizer, schedule, sampler, generator, features."""
    config = run.config
    if not config.checkpointing_steps or state.global_step % config.checkpointing_steps:
        return
    state.sampler = run.data.sampler.state_dict()
    state.noise_generator = run.noise_generator.get_state()
    state.extra = run.features.state_dict()
    trainable, optimizer_state = checkpoint_parts(run.model, run.optimizer)  # gathered under FSDP2
    if not run.accelerator.is_main_process:
        return
    try:
        path = save_checkpoint(
            Path(config.output_dir),
            trainable,
            optimizer_state,
            run.lr_scheduler.state_dict(),
            state,
            config.checkpoints_total_limit,
        )
        run.bus.emit("checkpoint", {"step": state.global_step, "path": str(path)})
    except CheckpointDiskFull as error:
        if not config.skip_checkpoint_on_disk_full:
            raise CheckpointDiskFull(
                f"{error}. To train on without a checkpoint when the disk is full, set "
                "skip_checkpoint_on_disk_full: true"
            ) from None
        run.bus.emit("warning", {"message": f"{error}; training goes on without this checkpoint"})


def _finish(run: Run, state: TrainerState, result: TrainResult, loaded: LoadedConfig) -> None:
    """Final weights, validation, loss plot and the features' outputs (not after an interruption)."""
    accelerator, config, bus, model = run.accelerator, run.config, run.bus, run.model
    output_dir = Path(config.output_dir)
    accelerator.wait_for_everyone()
    if not result.interrupted:
        use_averaged_weights(run.optimizer, config)  # the run ends with the weights it is saved with
        full_state = full_trainable_state(model) if run.sharded else None
        if accelerator.is_main_process:
            result.lora_path, result.model_path = save_final_weights(
                run.family, model, config, output_dir, full_state, run.features.text_encoders
            )
            saved = str(result.lora_path or result.model_path)
            bus.emit("saved", {"step": state.global_step, "path": saved})
        result.validation_paths += maybe_validate(run.validation, state.global_step, final=True)
        if accelerator.is_main_process:
            from difftune.training.plot import plot_loss

            result.loss_plot = plot_loss(output_dir / "events.jsonl", output_dir / "loss.png")
            run.features.finish(output_dir, model, result, loaded, bus.emit)
            finished = {"lora": result.lora_path, "model": result.model_path, "loss_plot": result.loss_plot}
            bus.emit("finished", {"step": state.global_step} | {k: str(v or "") for k, v in finished.items()})
    run.features.close()
    bus.close()
    run.denoiser = None  # the DDP wrapper goes before the process group (see end_training)
    end_training(accelerator)
