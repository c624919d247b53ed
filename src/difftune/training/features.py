"""Optional parts of a run (TREAD, EMA, eval loss, CLIP score, Hub upload) as small calls the recipe makes."""

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
    tread: Any = None
    ema: Any = None
    evaluator: Any = None

    @classmethod
    def build(
        cls,
        family,
        components,
        data,
        config: TrainConfig,
        model: torch.nn.Module,
        device,
        generator: torch.Generator,
        state,
    ) -> TrainingFeatures:
        """Set up what the config turns on; restores EMA state from a resumed checkpoint."""
        features = cls(config=config, family=family)
        if config.tread_config:
            from difftune.training.tread import apply_tread

            # The noise generator drives the routing, so a checkpoint's generator state resumes it exactly.
            blocks = family.transformer_blocks(model)
            features.tread = apply_tread(model, blocks, config.tread_config, generator)
        if config.use_ema:
            from difftune.training.ema import EMAModel

            features.ema = EMAModel(model, config.ema_decay, config.ema_device)
            if state.extra.get("ema"):
                features.ema.load_state_dict(state.extra["ema"])
        # an eval dataset turns the eval loss on (at every validation unless eval_steps_interval says)
        if config.eval_steps_interval or config.evaluation_type != "none" or data.held_out_batches:
            from difftune.training.evaluation import Evaluator

            features.evaluator = Evaluator(family, components, data, config, device)
        return features

    def after_optimizer_step(self, model: torch.nn.Module, step: int) -> None:
        """After optimizer step `step` (counted from 1): the EMA update, every ema_update_interval steps."""
        if self.ema is not None and step % (self.config.ema_update_interval or 1) == 0:
            self.ema.update(model)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint stores for these features."""
        return {"ema": self.ema.state_dict()} if self.ema is not None else {}

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
        if self.tread is not None:
            self.tread.remove()
