"""What the recipe runs beside validation: stable eval loss and CLIP score of the validation images."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from difftune.config.schema import TrainConfig
from difftune.families.base import Components, Family


class Evaluator:
    """Eval loss on held-out batches (the eval datasets), else on a fixed slice of cached training
    batches, at fixed noise and timesteps; and CLIP score."""

    def __init__(self, family: Family, components: Components, data, config: TrainConfig, device) -> None:
        from difftune.training.losses import LossKind
        from difftune.validation.eval_loss import DEFAULT_QUANTILES, EvalLoss

        # held-out batches of the eval datasets; without any, a fixed slice of the training batches
        batches = data.held_out_batches or [
            data.load_batch(indices, position=(0, i))
            for i, indices in enumerate(data.sampler.epoch_batches(0)[: config.eval_batches])
        ]
        for batch in batches:
            batch["latents"] = batch["latents"].to(device)
        seed = config.seed if config.seed is not None else 0
        quantiles = DEFAULT_QUANTILES
        if config.eval_timesteps is not None:  # evenly spread over the training distribution
            quantiles = tuple((k + 0.5) / config.eval_timesteps for k in range(config.eval_timesteps))
        self.eval_loss = EvalLoss(
            family,
            components,
            batches,
            seed=seed,
            quantiles=quantiles,
            device=device,
            loss_kind=LossKind.from_config(config),
        )
        self.scorer = None
        if config.evaluation_type == "clip":
            from difftune.validation.clip_score import ClipScorer

            self.scorer = ClipScorer(config.pretrained_evaluation_model_name_or_path, device=device)

    def evaluate(self, model, step: int, emit: Callable[[str, dict[str, Any]], None]) -> None:
        """Emit an `eval` event with the eval loss (per timestep too)."""
        emit("eval", self.eval_loss(model).as_event(step))

    def score_images(
        self,
        paths: list[Path],
        prompts: list[tuple[str, str]],
        step: int,
        emit: Callable[[str, dict[str, Any]], None],
    ) -> None:
        """Emit the mean CLIP score of this validation's images against their prompts."""
        if self.scorer is None:
            return
        from difftune.validation.generate import file_stem

        images, texts = [], []
        for name, prompt in prompts:
            for path in paths:
                if Path(path).suffix == ".png" and Path(path).name.startswith(file_stem(name) + "-"):
                    images.append(path)
                    texts.append(prompt)
        if images:
            scores = self.scorer.score(images, texts)
            emit("eval", {"step": step, "clip_score": sum(scores) / len(scores)})
