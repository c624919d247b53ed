"""Eval loss that is comparable across a run: fixed batches, fixed noise, fixed timesteps.

The timesteps are quantiles (0.1 .. 0.9 by default) of the family's own training timestep distribution,
found once by drawing many timesteps from `objective.sample_timesteps` with a seeded generator; so the
numbers mean the same for epsilon/v models (timesteps 0..999) and flow models (0..1). Noise is drawn
once per batch and reused on every call. Only the Family protocol is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difftune.families.base import Components, Family
from difftune.training.losses import LossKind, diffusion_loss

DEFAULT_QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_DISTRIBUTION_SAMPLES = 8192


@dataclass
class EvalResult:
    """Mean loss over every batch and timestep, and per timestep (keyed by the timestep's value)."""

    loss: float
    per_timestep: dict[float, float]

    def as_event(self, step: int) -> dict[str, Any]:
        """Flat numbers for an `eval` event: eval_loss and eval_loss_t<timestep>."""
        event: dict[str, Any] = {"step": step, "eval_loss": self.loss}
        event.update({f"eval_loss_t{t:g}": value for t, value in self.per_timestep.items()})
        return event


class EvalLoss:
    """Loss of a denoiser on held-out cached batches (dicts as the trainer's load_batch gives, with "latents")."""

    def __init__(
        self,
        family: Family,
        components: Components,
        batches: Sequence[dict[str, Any]],
        seed: int = 0,
        quantiles: Sequence[float] = DEFAULT_QUANTILES,
        timesteps: Sequence[float] | None = None,
        device: str | torch.device = "cpu",
        loss_kind: LossKind | None = None,
    ) -> None:
        if not batches:
            raise ValueError(
                "eval loss needs at least one batch; give it an eval dataset or held-out samples"
            )
        self.family = family
        self.components = components
        self.batches = list(batches)
        self.device = torch.device(device)
        self.loss_kind = loss_kind  # loss_type as in training (None: squared error)
        self.objective = family.objective(components)
        generator = torch.Generator().manual_seed(seed)
        self.timesteps = self._fixed_timesteps(generator, quantiles, timesteps)
        # Noise per batch, drawn once on the CPU so the numbers do not depend on the device's RNG.
        self.noise = [
            torch.randn(batch["latents"].shape, generator=generator, dtype=torch.float32)
            for batch in self.batches
        ]

    def _fixed_timesteps(
        self, generator: torch.Generator, quantiles: Sequence[float], timesteps: Sequence[float] | None
    ) -> torch.Tensor:
        """(K,) timesteps in the family's convention, in the dtype its sampler returns."""
        drawn = self.objective.sample_timesteps(_DISTRIBUTION_SAMPLES, generator, torch.device("cpu"))
        if timesteps is not None:
            return torch.tensor(list(timesteps), dtype=drawn.dtype)
        if not all(0.0 <= q <= 1.0 for q in quantiles):
            raise ValueError(f"eval loss quantiles must be in [0, 1], got {list(quantiles)}")
        values = torch.quantile(drawn.double(), torch.tensor(list(quantiles), dtype=torch.float64))
        if not drawn.is_floating_point():
            values = values.round()
        return values.to(drawn.dtype)

    @torch.no_grad()
    def __call__(self, denoiser: torch.nn.Module) -> EvalResult:
        """Evaluate; the denoiser is put in eval mode for the call and its mode restored after."""
        was_training = denoiser.training
        denoiser.eval()
        try:
            sums = torch.zeros(len(self.timesteps), dtype=torch.float64)
            counts = torch.zeros(len(self.timesteps), dtype=torch.float64)
            for batch, noise_cpu in zip(self.batches, self.noise):
                latents = batch["latents"].to(self.device)
                noise = noise_cpu.to(self.device, dtype=latents.dtype)
                for k, value in enumerate(self.timesteps.tolist()):
                    timesteps = torch.full(
                        (latents.shape[0],), value, dtype=self.timesteps.dtype, device=self.device
                    )
                    losses = self._losses(denoiser, batch, latents, noise, timesteps)
                    sums[k] += losses.double().sum().cpu()
                    counts[k] += losses.numel()
        finally:
            denoiser.train(was_training)
        means = (sums / counts).tolist()
        keys = [round(float(t), 6) for t in self.timesteps.tolist()]
        return EvalResult(loss=float(sum(means) / len(means)), per_timestep=dict(zip(keys, means)))

    def _losses(self, denoiser, batch, latents, noise, timesteps) -> torch.Tensor:
        """Each sample's training loss (B,) at `timesteps`: loss_type and the loss masks as in training.
        Min-SNR weights are left out: they only rescale a fixed timestep's loss, and without them the
        numbers compare across runs with different snr_gamma."""
        noisy = self.objective.add_noise(latents, noise, timesteps)
        prediction = self.family.model_forward(self.components, denoiser, noisy, timesteps, batch)
        target = self.objective.target(latents, noise, timesteps)
        return diffusion_loss(
            self.family,
            self.objective,
            batch,
            latents,
            prediction,
            target,
            timesteps,
            self.loss_kind,
            reduction="none",
            timestep_weights=False,
        )


def plot_eval(events_path: str | Path, out_png: str | Path) -> Path | None:
    """Plot eval_loss by step (and each fixed timestep's loss) from events.jsonl; None if there is none."""
    from difftune.events import read_events

    evals = [e for e in read_events(Path(events_path), "eval") if "eval_loss" in e]
    if not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    steps = [int(e["step"]) for e in evals]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for key in sorted(k for k in evals[0] if k.startswith("eval_loss_t")):
        ax.plot(
            steps, [e.get(key, float("nan")) for e in evals], alpha=0.35, label=key.removeprefix("eval_loss_")
        )
    ax.plot(steps, [e["eval_loss"] for e in evals], color="black", linewidth=2, label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss at fixed timesteps and noise")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
