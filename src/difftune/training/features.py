"""Optional parts of a run (input perturbation, scheduled sampling, CREPA, text-encoder training, TREAD,
EMA, prior preservation, eval loss, CLIP score, Hub upload) as one object the recipe calls at named
points.

Built in two phases, because the optimizer needs CREPA's projector and the text encoders' LoRA, and
EMA and prior preservation need the model as accelerate prepared it:

- `TrainingFeatures.build(...)`, before the optimizer: input perturbation, scheduled sampling, CREPA
  (its hooks go on the denoiser; `trainable_parameters()` gives its projector to the optimizer) and
  the text encoders' LoRA (train_text_encoder; `add_parameter_groups` gives it a group of its own).
- `attach(model, data)`, after accelerate's prepare and the checkpoint's weights: TREAD, EMA (which
  starts from the weights it averages), prior preservation (regularisation datasets) and the evaluator.

Then `load_state_dict(state.extra)` restores what a checkpoint holds of them ("ema", "crepa",
"text_encoder_lora"), and `state_dict()` is what the next checkpoint stores.

The step calls `noisy_inputs` (the denoiser's input: add_noise of the perturbed noise, or the
rollout), `target` (regularisation rows: the base model's prediction), `encode_batch` (the captions
through the trained text encoders), `sample_weights` (prior_loss_weight), `extra_loss` (CREPA's term),
`average_gradients` (before clipping) and `after_optimizer_step` (EMA); the run calls
`validation_weights`, `after_validation`, `maybe_evaluate`, `finish` and `close`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difftune.config.schema import TrainConfig

Emit = Callable[[str, dict[str, Any]], None]


@dataclass
class TrainingFeatures:
    config: TrainConfig
    family: Any
    components: Any = None
    objective: Any = None
    device: Any = "cpu"
    generator: torch.Generator | None = None  # the run's noise generator, saved with every checkpoint
    num_processes: int = 1
    process_index: int = 0
    scheduled_sampler: Any = None
    crepa: Any = None
    text_encoders: Any = None  # TextEncoderTraining (train_text_encoder)
    tread: Any = None
    ema: Any = None
    prior: Any = None  # PriorPreservation (regularisation datasets)
    evaluator: Any = None

    @classmethod
    def build(
        cls,
        family,
        components,
        objective,
        config: TrainConfig,
        denoiser: torch.nn.Module | None,
        device,
        generator: torch.Generator,
        num_processes: int = 1,
        process_index: int = 0,
    ) -> TrainingFeatures:
        """The features the optimizer must know of, set up before it: scheduled sampling, CREPA and the
        text encoders' LoRA.

        `denoiser` is the trained model before accelerate's prepare (CREPA hooks one of its blocks);
        `generator` draws the perturbation and the rollouts, for the rows `process_index` holds of a
        global batch of `num_processes` processes.
        """
        features = cls(
            config=config,
            family=family,
            components=components,
            objective=objective,
            device=device,
            generator=generator,
            num_processes=num_processes,
            process_index=process_index,
        )
        from difftune.training.scheduled_sampling import ScheduledSampler, rollout_enabled

        if rollout_enabled(config):
            features.scheduled_sampler = ScheduledSampler(
                family, components, objective, config, num_processes, process_index, generator
            )
        if config.crepa_enabled:
            from difftune.training.crepa import Crepa, drop_vae_encoder

            blocks = family.transformer_blocks(denoiser)
            frames = family.spec.frames_per_latent
            grid = family.token_grid()
            features.crepa = Crepa(
                config, denoiser, blocks, device, token_grid=grid, frames_per_latent=frames
            )
            if config.crepa_drop_vae_encoder and components.vae is not None:
                drop_vae_encoder(components.vae, family.vae_encoder_parts())
        if config.train_text_encoder:
            from difftune.training.text_encoders import TextEncoderTraining

            features.text_encoders = TextEncoderTraining(family, components, config)
        return features

    def attach(self, model: torch.nn.Module, data) -> None:
        """The features of the prepared model (with a resumed run's weights): TREAD, EMA, prior
        preservation (when `data` holds regularisation datasets), the evaluator."""
        config = self.config
        if config.tread_config:
            from difftune.training.tread import apply_tread

            # The noise generator drives the routing, so a checkpoint's generator state resumes it exactly.
            blocks = self.family.transformer_blocks(model)
            self.tread = apply_tread(
                model, blocks, self.family.routable_block(), config.tread_config, self.generator
            )
        if config.use_ema:
            from difftune.training.ema import EMAModel

            self.ema = EMAModel(model, config.ema_decay, config.ema_device)
        if data.regularisation_datasets:
            from difftune.training.prior import PriorPreservation

            self.prior = PriorPreservation(
                self.family, self.components, model, config.model_type, config.prior_loss_weight
            )
        # an eval dataset turns the eval loss on (at every validation unless eval_steps_interval says)
        if config.eval_steps_interval or config.evaluation_type != "none" or data.held_out_batches:
            from difftune.training.evaluation import Evaluator

            self.evaluator = Evaluator(self.family, self.components, data, config, self.device)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the features train beside the denoiser (CREPA's projector): give it to the optimizer."""
        return self.crepa.trainable_parameters() if self.crepa is not None else []

    def add_parameter_groups(self, optimizer: torch.optim.Optimizer, lr_scale: float) -> None:
        """What the features train at a learning rate of their own: the text encoders' LoRA, at
        text_encoder_lr x `lr_scale` (the scaling the denoiser's learning rate got)."""
        if self.text_encoders is not None:
            self.text_encoders.add_to(optimizer, lr_scale)

    def noisy_inputs(
        self,
        model: torch.nn.Module,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        batch: dict[str, Any],
        step: int,
    ) -> torch.Tensor:
        """The denoiser's input (B, ...) at optimizer step `step`: add_noise of `noise` plus the input
        perturbation, or with scheduled sampling some rows rolled out by `model` (the unwrapped
        denoiser, called without gradients). The target keeps the unperturbed noise."""
        from difftune.training.distributed import perturb_inputs
        from difftune.training.noise import input_perturbation_scale

        config = self.config
        scale = input_perturbation_scale(config.input_perturbation, config.input_perturbation_steps, step)
        noise = perturb_inputs(noise, scale, self.generator, self.num_processes, self.process_index)
        if self.scheduled_sampler is None:
            return self.objective.add_noise(latents, noise, timesteps)
        return self.scheduled_sampler(model, latents, noise, timesteps, batch, step)

    def target(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, batch: dict[str, Any], target: torch.Tensor
    ) -> torch.Tensor:
        """The objective's `target` (B, ...), with regularisation rows replaced by the base model's own
        prediction on `noisy` (prior preservation; from the batch's cached prompts, before the trained pass
        so that CREPA's hook sees that one)."""
        return target if self.prior is None else self.prior.target(noisy, timesteps, batch, target)

    def encode_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch the denoiser sees: with train_text_encoder its captions encoded now, with gradients."""
        return batch if self.text_encoders is None else self.text_encoders.encode(batch)

    def sample_weights(self, batch: dict[str, Any], device) -> torch.Tensor | None:
        """(B,) loss weights (prior_loss_weight on regularisation rows), or None for uniform ones."""
        return None if self.prior is None else self.prior.weights(batch, device)

    def extra_loss(self, batch: dict[str, Any], latents: torch.Tensor) -> torch.Tensor | float:
        """What the features add to the diffusion loss after the forward pass: CREPA's term (0.0 without
        CREPA), from the batch's clean frames or the clean latents decoded."""
        if self.crepa is None:
            return 0.0
        frames = batch.get("pixels")
        if frames is None:
            with torch.no_grad():
                frames = self.family.decode_latents(self.components, latents)
        return self.crepa.loss(frames, row_order=self.family.row_order(batch))

    def average_gradients(self, accelerator) -> None:
        """Before clipping: average over processes the gradients DDP does not (the text encoders')."""
        if self.text_encoders is not None:
            self.text_encoders.average_gradients(accelerator)

    def after_optimizer_step(self, model: torch.nn.Module, step: int) -> None:
        """After optimizer step `step` (counted from 1): the EMA update, every ema_update_interval steps."""
        if self.ema is not None and step % (self.config.ema_update_interval or 1) == 0:
            self.ema.update(model)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint stores for these features: "ema" (the average), "crepa" (the projector),
        "text_encoder_lora" (the text encoders' LoRA weights)."""
        state: dict[str, Any] = {}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.crepa is not None:
            state["crepa"] = self.crepa.state_dict()
        if self.text_encoders is not None:
            state |= self.text_encoders.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a checkpoint's extra state; a feature the checkpoint lacks (turned on since)
        keeps its fresh start."""
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        if self.crepa is not None and state.get("crepa"):
            self.crepa.load_state_dict(state["crepa"])
        if self.text_encoders is not None:
            self.text_encoders.load_state_dict(state)

    def validation_weights(self, model: torch.nn.Module) -> list[tuple[str, Any]]:
        """(file-name suffix, weights context) of each validation pass, as ema_validation says: the trained
        weights ("none", or no EMA), the average ("ema_only"), or both, the average's files ending in
        "-ema" ("comparison")."""
        trained = ("", contextlib.nullcontext(model))
        if self.ema is None or self.config.ema_validation == "none":
            return [trained]
        if self.config.ema_validation == "ema_only":
            return [("", self.ema.averaged(model))]
        return [trained, ("-ema", self.ema.averaged(model))]

    def after_validation(self, model, paths: list[Path], prompts, step: int, emit: Emit) -> None:
        if self.evaluator is None:
            return
        self.evaluator.score_images(paths, prompts, step, emit)
        if not self.config.eval_steps_interval:
            self.evaluator.evaluate(model, step, emit)

    def maybe_evaluate(self, model, step: int, emit: Emit) -> None:
        interval = self.config.eval_steps_interval
        if self.evaluator is not None and interval and step % interval == 0:
            self.evaluator.evaluate(model, step, emit)

    def finish(self, output_dir: Path, model: torch.nn.Module, result, loaded, emit: Emit) -> None:
        """EMA weights beside the final ones, the eval plot, and the Hub upload."""
        if self.ema is not None:
            from difftune.training.setup import save_final_weights

            with self.ema.averaged(model):
                save_final_weights(self.family, model, self.config, output_dir / "ema")
        if self.evaluator is not None:
            from difftune.validation.eval_loss import plot_eval

            plot_eval(output_dir / "events.jsonl", output_dir / "eval_loss.png")
        if self.config.push_to_hub:
            from difftune.hub import push_to_hub

            repo = push_to_hub(
                output_dir,
                self.config.hub_model_id,
                self.config,
                result.validation_paths,
                datasets=loaded.datasets,
                private=self.config.hub_private,
            )
            emit("log", {"message": f"uploaded to the Hub: {repo}"})

    def close(self) -> None:
        """Take the features' hooks off the denoiser."""
        if self.tread is not None:
            self.tread.remove()
        if self.crepa is not None:
            self.crepa.remove()
