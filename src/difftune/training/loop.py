"""The training recipe: one run, top to bottom.

set up (accelerator, family, components, data, adapter, optimizer) -> resume -> for each step:
batch -> noise and timesteps -> family.model_forward -> loss -> backward -> optimizer step -> events
(-> checkpoint, validation) -> final weights, validation and loss plot.
"""

from __future__ import annotations

import contextlib
import math
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from difftune.config import LoadedConfig, write_resolved
from difftune.events import EventBus, warnings_to
from difftune.families import get_family
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
    full_trainable_state,
    shard_if_configured,
)
from difftune.training.features import TrainingFeatures
from difftune.training.losses import LossKind, diffusion_loss
from difftune.training.noise import TimestepBias
from difftune.training.optim import (
    averaged_weights,
    build_lr_scheduler,
    build_optimizer,
    clip_gradients,
    scaled_learning_rate,
    step_lr_schedule,
    use_averaged_weights,
    use_training_weights,
)
from difftune.training.prior import build_prior
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
from difftune.training.text_encoders import build_text_encoder_training, check_text_encoder_training


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
            return _run(loaded, accelerator, bus, stop_after_steps)
    except Exception as exc:  # webhooks and the web UI learn why the run stopped
        bus.emit("error", {"message": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        bus.close()
        raise


def _run(loaded: LoadedConfig, accelerator, bus: EventBus, stop_after_steps: int | None) -> TrainResult:
    from difftune.data.pipeline import prepare_training_data
    from difftune.validation.generate import validation_conditioning_image
    from difftune.validation.prompts import validation_prompts

    config = loaded.train
    output_dir = Path(config.output_dir)

    # -- set up -------------------------------------------------------------------------------
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
    features = TrainingFeatures.build(  # scheduled sampling, CREPA: what the optimizer must know of
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
    text_encoders = build_text_encoder_training(family, components, config)  # train_text_encoder
    optimizer = build_optimizer(
        list(denoiser.parameters()) + features.trainable_parameters(), config, accelerator.num_processes
    )
    if text_encoders is not None:
        text_encoders.add_to(
            optimizer, scaled_learning_rate(config, accelerator.num_processes) / config.learning_rate
        )
    steps_per_epoch = max(1, data.sampler.batches_per_epoch // config.gradient_accumulation_steps)
    total_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    lr_scheduler = build_lr_scheduler(optimizer, config, total_steps)
    denoiser, optimizer = prepare_for_accelerator(accelerator, denoiser, optimizer, config, sharded)
    use_training_weights(optimizer, config)
    model = accelerator.unwrap_model(denoiser)
    timestep_bias, loss_kind = TimestepBias.from_config(config), LossKind.from_config(config)

    # -- resume -------------------------------------------------------------------------------
    state = TrainerState()
    if resume_path is not None:
        state = apply_checkpoint(read_checkpoint(resume_path), model, optimizer, lr_scheduler)
        noise_generator.set_state(state.noise_generator)
        data.sampler.load_state_dict(state.sampler)
        if text_encoders is not None:
            text_encoders.load_state_dict(state.extra)
        bus.emit("log", {"message": f"resumed from {resume_path} at step {state.global_step}"})
    elif config.resume_from_checkpoint:
        bus.emit("log", {"message": "no checkpoint to resume from yet; starting at step 0"})
    prior = build_prior(family, components, model, config, loaded.datasets)
    features.attach(model, data)  # TREAD, EMA (from the resumed weights), the evaluator
    features.load_state_dict(state.extra)  # "ema", "crepa"
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

    # -- steps --------------------------------------------------------------------------------
    result = TrainResult(output_dir=output_dir, global_step=state.global_step)
    bus.emit(
        "start",
        {
            "total_steps": total_steps,
            "first_step": state.global_step,
            "samples": data.num_samples,
            "family": family.name,
            "model_type": config.model_type,
            "processes": accelerator.num_processes,
        },
    )
    micro_batches = data.sampler.iter_forever()
    accumulated, micro_count, started = 0.0, 0, time.perf_counter()
    first_step = state.global_step
    denoiser.train()
    while state.global_step < total_steps:
        indices = next(micro_batches)
        batch = data.load_batch(indices)
        with accelerator.accumulate(denoiser):
            latents = batch["latents"].to(accelerator.device)
            noise, timesteps = draw_noise_and_timesteps(
                objective,
                latents.shape,
                noise_generator,
                accelerator.device,
                accelerator.num_processes,
                accelerator.process_index,
                config.effective_noise_offset,
                config.effective_noise_offset_probability,
                timestep_bias,
            )
            with accelerator.autocast():
                noisy = features.noisy_inputs(model, latents, noise, timesteps, batch, state.global_step)
                target = objective.target(latents, noise, timesteps)
                # regularisation rows: the base model's own prediction, from the cached prompts (the base
                # text encoders'), before the trained pass so that CREPA sees that one
                if prior is not None:
                    target = prior.target(noisy, timesteps, batch, target)
                if text_encoders is not None:  # train_text_encoder: the captions encoded now, with gradients
                    batch = text_encoders.encode(batch)
                prediction = family.model_forward(components, denoiser, noisy, timesteps, batch)
            loss = diffusion_loss(
                family,
                objective,
                batch,
                latents,
                prediction,
                target,
                timesteps,
                loss_kind,
                prior.weights(batch, prediction.device) if prior is not None else None,
            ) + features.extra_loss(batch, latents)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if text_encoders is not None:
                    text_encoders.average_gradients(accelerator)
                clip_gradients(accelerator, optimizer, config)
            optimizer.step()
            step_lr_schedule(lr_scheduler, optimizer, accelerator.sync_gradients)
            optimizer.zero_grad(set_to_none=True)
        accumulated += accelerator.reduce(loss.detach(), "mean").item()  # the global batch's loss
        micro_count += 1
        if not accelerator.sync_gradients:
            continue

        state.global_step += 1
        features.after_optimizer_step(model, state.global_step)
        step_loss = accumulated / micro_count
        accumulated, micro_count = 0.0, 0
        result.losses.append(step_loss)
        elapsed = time.perf_counter() - started
        rate = (state.global_step - first_step) / max(elapsed, 1e-9)
        bus.emit(
            "progress",
            {
                "step": state.global_step,
                "loss": step_loss,
                "lr": lr_scheduler.get_last_lr()[0],
                "it_per_s": rate,
                "eta_s": (total_steps - state.global_step) / max(rate, 1e-9),
            },
        )
        if not math.isfinite(step_loss):
            raise FloatingPointError(
                f"loss became {step_loss} at step {state.global_step}; lower "
                "learning_rate or use mixed_precision bf16 instead of fp16"
            )

        if config.checkpointing_steps and state.global_step % config.checkpointing_steps == 0:
            state.sampler = data.sampler.state_dict()
            state.noise_generator = noise_generator.get_state()
            state.extra = features.state_dict()
            state.extra |= text_encoders.state_dict() if text_encoders else {}
            trainable, optimizer_state = checkpoint_parts(model, optimizer)  # gathered under FSDP2
            if accelerator.is_main_process:
                try:
                    path = save_checkpoint(
                        output_dir,
                        trainable,
                        optimizer_state,
                        lr_scheduler.state_dict(),
                        state,
                        config.checkpoints_total_limit,
                    )
                    bus.emit("checkpoint", {"step": state.global_step, "path": str(path)})
                except CheckpointDiskFull as error:
                    if not config.skip_checkpoint_on_disk_full:
                        raise CheckpointDiskFull(
                            f"{error}. To train on without a checkpoint when the disk is full, set "
                            "skip_checkpoint_on_disk_full: true"
                        ) from None
                    bus.emit("warning", {"message": f"{error}; training goes on without this checkpoint"})
        if state.global_step < total_steps:  # the last step's validation is the final one
            result.validation_paths += maybe_validate(validation, state.global_step)
        features.maybe_evaluate(model, state.global_step, bus.emit)
        if stop_after_steps is not None and state.global_step >= stop_after_steps:
            result.interrupted = True
            break

    # -- output -------------------------------------------------------------------------------
    result.global_step = state.global_step
    accelerator.wait_for_everyone()
    if not result.interrupted:
        use_averaged_weights(optimizer, config)  # the run ends with the weights it is saved with
    full_state = full_trainable_state(model) if sharded and not result.interrupted else None
    if accelerator.is_main_process and not result.interrupted:
        result.lora_path, result.model_path = save_final_weights(
            family, model, config, output_dir, full_state
        )
        if text_encoders is not None:
            text_encoders.save(result.lora_path)
        bus.emit("saved", {"step": state.global_step, "path": str(result.lora_path or result.model_path)})
    if not result.interrupted:
        result.validation_paths += maybe_validate(validation, state.global_step, final=True)
    if accelerator.is_main_process and not result.interrupted:
        from difftune.training.plot import plot_loss

        result.loss_plot = plot_loss(output_dir / "events.jsonl", output_dir / "loss.png")
        features.finish(output_dir, model, result, loaded, bus.emit)
        bus.emit(
            "finished",
            {
                "step": state.global_step,
                "lora": str(result.lora_path or ""),
                "model": str(result.model_path or ""),
                "loss_plot": str(result.loss_plot or ""),
            },
        )
    features.close()
    bus.close()
    accelerator.end_training()
    return result


def adapter_strength(model, config):
    """validation_lycoris_strength for a LyCORIS run (a no-op otherwise)."""
    if config.model_type != "lycoris":
        return contextlib.nullcontext()
    from difftune.training.lycoris import lycoris_strength

    return lycoris_strength(model, config.validation_lycoris_strength)


@dataclass
class Validation:
    """What validation needs, gathered once in set-up. `runs_here` is False on the processes that sit
    validation out; `write` False on the other processes of a sharded denoiser, which only join the
    forward passes."""

    family: Any
    components: Any
    model: torch.nn.Module
    config: Any
    bus: EventBus
    conditioning_image: Any
    features: TrainingFeatures
    optimizer: Any
    prompts: list[tuple[str, str]]
    runs_here: bool
    write: bool


def maybe_validate(validation: Validation, step: int, final: bool = False) -> list[Path]:
    """Validation images when due: every validation_steps (with a schedule-free optimizer's averaged
    weights in the model), or once at the end (`final`), with the weights the run was saved
    with. Then the features see the images (CLIP score, eval loss). Returns the files written."""
    config = validation.config
    if not validation.prompts or config.validation_disable or not validation.runs_here:
        return []
    if final:
        weights = contextlib.nullcontext()
    elif config.validation_steps and step % config.validation_steps == 0:
        weights = averaged_weights(validation.optimizer, config)
    else:
        return []
    with weights:
        paths = _validation_images(validation, step)
    validation.features.after_validation(
        validation.model, paths, validation.prompts, step, validation.bus.emit
    )
    return paths


def _validation_images(validation: Validation, step: int) -> list[Path]:
    """Validation images of every pass ema_validation asks for (the trained weights, the EMA average)."""
    from difftune.validation.generate import run_validation

    v = validation
    paths: list[Path] = []
    for suffix, weights in v.features.validation_weights(v.model):
        with weights, adapter_strength(v.model, v.config):
            paths += run_validation(
                v.family,
                v.components,
                v.model,
                v.config,
                step,
                Path(v.config.output_dir),
                v.bus.emit,
                v.conditioning_image,
                suffix=suffix,
                write=v.write,
            )
    return paths
