"""The Family protocol: everything the trainer needs to know about one kind of model.

A family answers for its models: how to load them, how to turn prompts and pixels into the tensors
that are cached, what the training objective is, how the denoiser is called, which modules an
adapter wraps, and how validation images (or videos) are generated through the stock diffusers
pipeline. The trainer knows nothing of a family beyond this class.

Tensor layouts at this boundary:
- pixels: (B, C, H, W) for images, (B, C, T, H, W) for videos, float in [-1, 1]
- latents: whatever the family's VAE gives, already scaled (and shifted) for the denoiser,
  (B, C, H, W) for 2D VAEs and (B, C, T, H, W) for 3D VAEs
- timesteps: (B,) in the convention of the family's denoiser (0..999 for SDXL, 0..1 for flow models)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from difftune.config.schema import TrainConfig
    from difftune.families.registry import FamilySpec


@dataclass
class Components:
    """The loaded parts of a model. `denoiser` is the module that is trained (UNet or transformer)."""

    denoiser: torch.nn.Module
    vae: torch.nn.Module | None
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    scheduler: Any
    extras: dict[str, Any] = field(default_factory=dict)


class Objective(ABC):
    """What the denoiser learns to predict, and how noise levels are drawn and applied."""

    @abstractmethod
    def sample_timesteps(self, batch_size: int, generator: torch.Generator, device) -> torch.Tensor: ...

    @abstractmethod
    def add_noise(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor: ...

    @abstractmethod
    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights (B,), e.g. min-SNR; None means uniform."""
        return None

    def sample_timesteps_for(
        self, latent_shape: tuple[int, ...], batch_size: int, generator: torch.Generator, device
    ) -> torch.Tensor:
        """Timesteps for latents of `latent_shape` (B, C, [F,] H, W); resolution-aware schedules override it."""
        return self.sample_timesteps(batch_size, generator, device)

    def noise_fraction(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Each timestep's place on the noise scale, 0 (clean) to 1 (pure noise), (B,) fp32.

        The default reads the timesteps as flow sigmas (x_t = (1 - sigma) x0 + sigma noise).
        """
        return timesteps.float()

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio per sample (B,), fp32; the default reads flow sigmas: ((1 - s) / s)^2."""
        sigma = self.noise_fraction(timesteps).clamp(1e-6, 1.0)
        return ((1.0 - sigma) / sigma) ** 2


class Family(ABC):
    """Base class of model families; a family module subclasses it and names its registry row in `spec`."""

    spec: ClassVar[FamilySpec]

    def __init__(self, config: TrainConfig):
        self.config = config

    # -- identity (the registry row) ------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pixel_multiple(self) -> int:
        """Bucket and validation widths and heights are multiples of this."""
        return self.spec.pixel_multiple

    @property
    def is_video(self) -> bool:
        return self.spec.is_video

    @property
    def adapter_prefix(self) -> str:
        """Key prefix of saved LoRA weights ("unet" / "transformer")."""
        return self.spec.adapter_prefix

    def model_id(self) -> str:
        """Hub id or local folder the weights come from."""
        if self.config.pretrained_model_name_or_path:
            return str(self.config.pretrained_model_name_or_path)
        return self.spec.flavour(self.config.model_flavour).hub_id

    def cache_identity(self) -> str:
        """A string that changes whenever cached embeddings or latents would change."""
        path = Path(self.model_id())
        if path.exists():
            return f"{self.name}:{path.resolve()}:{_tree_mtime(path)}"
        return f"{self.name}:{self.model_id()}:{self.config.revision or 'main'}"

    # -- loading ------------------------------------------------------------------------------
    @abstractmethod
    def load(self, device: torch.device, weight_dtype: torch.dtype) -> Components: ...

    # -- conditioning -------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, components: Components, texts: list[str]) -> list[dict[str, torch.Tensor]]:
        """Encode prompts; one dict of tensors per text, without a batch dimension (what is cached)."""
        ...

    def collate_prompts(self, embeds: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Batch cached prompt tensors; the default stacks each key."""
        return {key: torch.stack([e[key] for e in embeds]) for key in embeds[0]}

    @abstractmethod
    def encode_pixels(
        self,
        components: Components,
        pixels: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Pixels in [-1, 1] -> latents: a sample of the VAE's posterior, in the family's layout.

        generator: the sampling noise; a list holds one generator per row (what the latent cache
        passes, so each entry is fixed by its own key). None: the family's own choice.
        """
        ...

    @abstractmethod
    def decode_latents(self, components: Components, latents: torch.Tensor) -> torch.Tensor: ...

    def decode_pipeline_latents(self, components: Components, latents: torch.Tensor) -> torch.Tensor:
        """Pixels from the latents a pipeline holds mid-sampling (validation previews); the default
        assumes the pipeline keeps them in the Family layout."""
        return self.decode_latents(components, latents)

    # -- training -----------------------------------------------------------------------------
    @abstractmethod
    def objective(self, components: Components) -> Objective: ...

    @abstractmethod
    def model_forward(
        self,
        components: Components,
        denoiser: torch.nn.Module,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        batch: dict[str, Any],
    ) -> torch.Tensor:
        """Run the denoiser on a batch; returns a prediction shaped like the latents."""
        ...

    def loss_mask(self, batch: dict[str, Any], latents: torch.Tensor) -> torch.Tensor | None:
        """Mask broadcastable to the latents (1 = counted in the loss); None means all of it."""
        return None

    @abstractmethod
    def lora_targets(self) -> list[str]:
        """Module names (peft target_modules) that a LoRA wraps."""
        ...

    # -- output -------------------------------------------------------------------------------
    @abstractmethod
    def pipeline(self, components: Components, denoiser: torch.nn.Module):
        """The stock diffusers pipeline around these components, the trained denoiser in place."""
        ...

    @abstractmethod
    def generate(
        self,
        pipeline,
        *,
        prompt: str,
        negative_prompt: str | None,
        width: int,
        height: int,
        num_inference_steps: int,
        guidance_scale: float,
        generator: torch.Generator,
        **kwargs,
    ) -> list:
        """Generate with the pipeline; a list of PIL images (one video: a list of frames in a list)."""
        ...

    def lora_metadata(self) -> dict[str, Any]:
        """peft LoraConfig arguments saved with the weights, so loaders scale by lora_alpha / r (without
        them diffusers rebuilds the adapter with lora_alpha = r)."""
        return {
            "r": self.config.lora_rank,
            "lora_alpha": self.config.effective_lora_alpha,
            "target_modules": self.lora_targets(),
            "use_dora": self.config.use_dora,
            "lora_dropout": self.config.lora_dropout,
        }

    @abstractmethod
    def save_lora(self, output_dir: Path, lora_state_dict: dict[str, torch.Tensor]) -> Path:
        """Write pytorch_lora_weights.safetensors (weights and `lora_metadata()`) that the pipeline's
        load_lora_weights reads."""
        ...

    def text_encoder_lora_targets(self) -> list[str]:
        """Module names a LoRA wraps in each text encoder (train_text_encoder); [] when the family does
        not train its text encoders."""
        return []

    def encode_prompts_with_gradients(
        self, components: Components, texts: list[str]
    ) -> dict[str, torch.Tensor]:
        """Batch prompt tensors (as collate_prompts gives them) encoded with gradients through the text
        encoders (train_text_encoder). Only families with text_encoder_lora_targets."""
        raise NotImplementedError(f"{self.name} does not train its text encoders")

    def save_text_encoder_lora(
        self, lora_file: Path, layers: list[dict[str, torch.Tensor]], metadata: dict[str, Any]
    ) -> None:
        """Add the text encoders' LoRA layers (peft keys, one dict per encoder) to a saved LoRA file, in the
        layout the pipeline's load_lora_weights reads. Only families with text_encoder_lora_targets."""
        raise NotImplementedError(f"{self.name} does not train its text encoders")

    def denoiser_block_count(self) -> int | None:
        """How many transformer blocks the denoiser has (the list TREAD and CREPA index), read from the
        model's config without loading weights; None when that is not known before the load."""
        return None

    def validate_config(self) -> list[str]:
        """Family-specific checks of the config; returns warnings, raises ConfigError for errors."""
        return []


def _tree_mtime(path: Path) -> int:
    """Newest modification time (ns) of the weight files under a local model folder."""
    if path.is_file():
        return path.stat().st_mtime_ns
    times = [p.stat().st_mtime_ns for p in path.rglob("*") if p.suffix in (".safetensors", ".bin", ".json")]
    return max(times, default=0)
