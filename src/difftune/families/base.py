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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from difftune.errors import ConfigError

if TYPE_CHECKING:
    from difftune.config.schema import DatasetConfig, TrainConfig
    from difftune.families.registry import FamilySpec

# What a training sample is conditioned on besides its prompt:
# "prompt_image": a source image, in the prompt embeddings and as batch["conditioning_latents"] (I2I);
# "first_frame": the clip's first frame encoded alone, as batch["conditioning_latents"] (I2V).
Conditioning = Literal["none", "prompt_image", "first_frame"]
Emit = Callable[[str, dict[str, Any]], None]


def _nowhere(event_type: str, data: dict[str, Any]) -> None:
    """The event sink of a family used outside a run (tests, one-off scripts)."""


@dataclass(frozen=True)
class KohyaTextEncoder:
    """How the ComfyUI / kohya LoRA layout names the modules of one text encoder: "<name>_<module path,
    dots as underscores>", the path as in the encoder's own checkpoint, which starts at `module_root`
    (prepended when the module names that peft saves leave it out)."""

    name: str
    module_root: str = ""


@dataclass
class Components:
    """The loaded parts of a model. `denoiser` is the module that is trained (UNet or transformer)."""

    denoiser: torch.nn.Module
    vae: torch.nn.Module | None
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    scheduler: Any


@dataclass(frozen=True)
class GenerationRequest:
    """One validation sample: what `Family.generate` turns into the arguments of its pipeline.

    Sizes in pixels; `num_frames` only for video families (None: validation_num_video_frames);
    `image` is the PIL conditioning image of image-conditioned flavours; `on_step_end` is a diffusers
    `callback_on_step_end` (validation previews).
    """

    prompt: str
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    generator: torch.Generator
    negative_prompt: str | None = None
    guidance_rescale: float = 0.0
    num_frames: int | None = None
    image: Any = None
    on_step_end: Callable[..., dict] | None = None


@dataclass(frozen=True)
class SampleGeometry:
    """Where one training sample's pixels come from, which the data pipeline records for every sample:
    the source's (height, width), the (top, left) of the window cropped from it once resized, and the
    (height, width) trained at (its bucket). A family that conditions on these turns a batch's
    records into its inputs with `Family.batch_extras`."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]


@dataclass(frozen=True)
class BlockArgument:
    """One argument of a block's forward: where it is passed positionally, and its keyword name."""

    position: int
    name: str

    def get(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        """This argument's value in a call (None when the call leaves it out)."""
        return args[self.position] if len(args) > self.position else kwargs.get(self.name)

    def replace(self, args: tuple, kwargs: dict[str, Any], value: Any) -> tuple[tuple, dict[str, Any]]:
        """The call's (args, kwargs) with this argument set to `value`, passed the way the call passed it."""
        if len(args) > self.position:
            return (*args[: self.position], value, *args[self.position + 1 :]), kwargs
        return args, {**kwargs, self.name: value}


@dataclass(frozen=True)
class RoutableBlock:
    """How the denoiser calls each of its `transformer_blocks`, as token routing (TREAD) needs to know it.

    tokens: the token sequence (B, N, D) a block takes (and returns, same shape);
    call: a tensor the denoiser passes, as the same object, to every block of one forward call (so the
    routing of that call is found again at each block);
    positions: a per-token tensor (B or 1, N, ...), such as RoPE, gathered with the kept tokens; None
    when the blocks take none;
    must_be_none: arguments routing cannot honour unless they are None, each with the message (what
    to do instead) raised when one is set.
    """

    tokens: BlockArgument
    call: BlockArgument
    positions: BlockArgument | None = None
    must_be_none: tuple[tuple[BlockArgument, str], ...] = ()


class TokenGrid(ABC):
    """How the tokens a denoiser's `transformer_blocks` pass on lay out its latents, so that one block's
    output can be read as frames of a token grid (CREPA aligns those with image features)."""

    @abstractmethod
    def hidden_size(self, denoiser: torch.nn.Module) -> int:
        """D: the width of one token of the blocks."""

    @abstractmethod
    def layout_of_call(
        self, denoiser: torch.nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """From one call of the denoiser's forward (its args and kwargs): the function that lays out a
        block's output tokens of that call, (B, N, D), as the grid (B, T', h, w, D) of latent frames,
        rows and columns (T' = 1 for images)."""


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
    # The longest prompt, in tokens, that the family's text encoders and pipelines take (None: no
    # limit), and who sets it, for the message that refuses a longer tokenizer_max_length.
    max_prompt_tokens: ClassVar[int | None] = None
    prompt_limit_owner: ClassVar[str] = "the text encoders"

    def __init__(self, config: TrainConfig, emit: Emit | None = None):
        self.config = config
        self.emit: Emit = emit or _nowhere  # the run's event bus: warnings go through it

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

    @property
    def conditioning(self) -> Conditioning:
        """What samples are conditioned on besides the prompt (see `Conditioning`); "none" by default."""
        return "none"

    def encode_condition(
        self,
        components: Components,
        pixels: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Latents of the conditioning frame of clips (B, 3, T, H, W): the first frame, encoded alone."""
        return self.encode_pixels(components, pixels[:, :, :1], generator)

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

    def batch_extras(self, geometry: Sequence[SampleGeometry]) -> dict[str, Any]:
        """Batch entries `model_forward` needs from the samples' geometry (one record per row, in batch
        order), added to every batch the data pipeline loads; none by default."""
        return {}

    def loss_mask(self, batch: dict[str, Any], latents: torch.Tensor) -> torch.Tensor | None:
        """Mask broadcastable to the latents (1 = counted in the loss); None means all of it."""
        return None

    def row_order(self, batch: dict[str, Any]) -> list[int] | None:
        """Batch rows in the order the denoiser's blocks see them, when it runs the batch in groups
        (so hidden states captured from a block line up with the rows); None: in batch order."""
        return None

    @abstractmethod
    def lora_targets(self) -> list[str]:
        """Module names (peft target_modules) that a LoRA wraps."""
        ...

    def transformer_blocks(self, denoiser: torch.nn.Module) -> torch.nn.ModuleList:
        """The denoiser's main stack of blocks, which TREAD routes tokens around and CREPA reads hidden
        states from (found inside peft / accelerate wrappers too). The default has none: a family
        whose denoiser has such a stack says which it is."""
        raise ConfigError(
            f"{self.name}: its denoiser has no stack of transformer blocks for tread_config or crepa_enabled; "
            "turn those off for this family"
        )

    def routable_block(self) -> RoutableBlock | None:
        """How the denoiser calls its `transformer_blocks`, for token routing (tread_config); None (the
        default): its blocks cannot have tokens routed around them."""
        return None

    def token_grid(self) -> TokenGrid | None:
        """How block outputs lay out the latents as frames of tokens, for CREPA (crepa_enabled); None
        (the default): its block outputs cannot be read as frames."""
        return None

    def vae_encoder_parts(self) -> tuple[str, ...]:
        """Names of the VAE's submodules that only encode pixels, which crepa_drop_vae_encoder frees once
        latents are cached. The default: diffusers' autoencoders' `encoder` and `quant_conv`."""
        return ("encoder", "quant_conv")

    # -- output -------------------------------------------------------------------------------
    @abstractmethod
    def pipeline(self, components: Components, denoiser: torch.nn.Module):
        """The stock diffusers pipeline around these components, the trained denoiser in place."""
        ...

    @abstractmethod
    def generate(self, pipeline, request: GenerationRequest) -> list:
        """Run the pipeline for one request; a list of PIL images (a video: a list of frames in a list)."""
        ...

    def save_sample(self, sample: list, path: Path) -> Path:
        """Write one generated sample at `path` without its suffix: the first image as .png (the
        default), or a video family's frames as .mp4. Returns the file written."""
        path = Path(path).with_suffix(".png")
        sample[0].save(path)
        return path

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

    def kohya_text_encoders(self) -> dict[str, KohyaTextEncoder]:
        """The ComfyUI / kohya name of each text encoder whose LoRA a saved file may hold, by the encoder's
        key prefix in pytorch_lora_weights.safetensors; {} when the family does not train its text encoders."""
        return {}

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

    def fp32_weight_modules(self) -> tuple[str, ...]:
        """Names (a path part) of denoiser modules whose weights stay fp32 beside bf16 ones because the
        model calls them with fp32 inputs: a norm whose weight's dtype differs from its input's misses
        the fused kernel. None by default."""
        return ()

    def denoiser_block_count(self) -> int | None:
        """How many transformer blocks the denoiser has (the list TREAD and CREPA index), read from the
        model's config without loading weights; None when that is not known before the load."""
        return None

    def check(self, datasets: Sequence[DatasetConfig]) -> list[str]:
        """Every check of the config and its datasets that needs no weights; runs when the config loads.

        Returns warnings; raises ConfigError naming the key, the value and the fix. The default refuses
        validation sizes off the family's pixel grid, validation settings its pipeline cannot take
        (`validation_settings_refused`) and training features its denoiser cannot take
        (`training_settings_refused`).
        """
        multiple = self.validation_pixel_multiple
        for width, height in self.config.validation_sizes:
            if width % multiple or height % multiple:
                fix = f"{width // multiple * multiple}x{height // multiple * multiple}"
                raise ConfigError(
                    f"'validation_resolution' is '{width}x{height}', but {self.name} sizes must be multiples "
                    f"of {multiple}; use {fix} or {_round_up(width, multiple)}x{_round_up(height, multiple)}"
                )
        refused = [
            f"'{key}' is {getattr(self.config, key)!r}, but {why}"
            for key, why in (self.validation_settings_refused() | self.training_settings_refused()).items()
        ]
        if refused:
            raise ConfigError("; ".join(refused))
        return []

    @property
    def validation_pixel_multiple(self) -> int:
        """What validation widths and heights must be multiples of; the registry row's pixel grid."""
        return self.pixel_multiple

    def validation_settings_refused(self) -> dict[str, str]:
        """Validation keys set to a value this family's pipeline cannot honour -> why, and what to use.

        The default: video frames for an image family. A family whose pipeline lacks a setting (such as
        guidance rescale) adds it here.
        """
        refused = {}
        if not self.is_video and self.config.validation_num_video_frames is not None:
            refused["validation_num_video_frames"] = (
                f"{self.name} generates images; remove it (it applies to video families)"
            )
        return refused

    def training_settings_refused(self) -> dict[str, str]:
        """Training keys set to a value this family's denoiser cannot honour -> why, and what to use.

        The default: a tokenizer_max_length over `max_prompt_tokens` (refused, never cut), token
        routing without a `routable_block`, CREPA without a `token_grid`.
        """
        refused = {}
        limit, asked = self.max_prompt_tokens, self.config.tokenizer_max_length
        if limit is not None and asked is not None and asked > limit:
            refused["tokenizer_max_length"] = (
                f"{self.prompt_limit_owner} take prompts of at most {limit} tokens; "
                f"use {limit} or less (or remove it for their own length)"
            )
        if self.config.tread_config and self.routable_block() is None:
            refused["tread_config"] = (
                f"{self.name}'s denoiser has no blocks that TREAD can route tokens around; remove tread_config"
            )
        if self.config.crepa_enabled and self.token_grid() is None:
            refused["crepa_enabled"] = (
                f"{self.name}'s denoiser blocks do not hold its latents as frames of tokens for CREPA to "
                "align; remove crepa_enabled"
            )
        return refused


def _round_up(value: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= `value`."""
    return -(-value // multiple) * multiple


def _tree_mtime(path: Path) -> int:
    """Newest modification time (ns) of the weight files under a local model folder."""
    if path.is_file():
        return path.stat().st_mtime_ns
    times = [p.stat().st_mtime_ns for p in path.rglob("*") if p.suffix in (".safetensors", ".bin", ".json")]
    return max(times, default=0)
