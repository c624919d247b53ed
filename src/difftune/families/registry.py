"""What each model family is, as data: one row per family, read by everything that needs to know.

The config loader, the wizard (its quickstart presets), the web form, the model card, the demo and the
benchmarks read these rows; the family module (`module`) holds the behaviour. This module imports nothing heavy, so a
config loads without torch or diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from difftune.errors import ConfigError, nearest

Kind = Literal["t2i", "i2i", "t2v", "i2v"]


@dataclass(frozen=True)
class Flavour:
    """One checkpoint of a family: its Hub id, a one-line description, and what it generates from what."""

    hub_id: str
    description: str
    kind: Kind


@dataclass(frozen=True)
class Quickstart:
    """What the quickstart of one family recommends, as `difftune configure` writes it. A family without
    one gets these neutral recommendations."""

    resolution: int = 1024
    validation_prompt: str = "a photo of a cat sitting on a windowsill, soft morning light"
    config: dict[str, Any] = field(default_factory=dict)  # written into config.json over the family defaults
    memory: dict[int, dict[str, Any]] = field(default_factory=dict)  # VRAM tier (GB) -> memory settings
    dataset: dict[str, Any] = field(default_factory=dict)
    minimum_vram_gb: int = 12
    validation_resolution: str | None = None  # None: square, at the training resolution


@dataclass(frozen=True)
class FamilySpec:
    """A family's identity. `defaults` win over the schema's global defaults for keys the user did not set."""

    name: str
    title: str
    module: str  # "package.module:Class", imported on use
    tiny_model: str  # "package.module:function(folder) -> folder", a tiny random model for tests and the demo
    flavours: dict[str, Flavour]
    default_flavour: str
    defaults: dict[str, Any] = field(default_factory=dict)
    pixel_multiple: int = 64  # bucket and validation sizes are multiples of this (VAE factor x patch size)
    frames_per_latent: int = 1  # >1: a video VAE compressing time that much; clips have k * n + 1 frames
    adapter_prefix: str = "transformer"  # key prefix of saved LoRA weights ("unet" / "transformer")
    flow_matching: bool = True  # False: a DDPM-style (epsilon / v) model, which the flow_* keys do not shape
    # diffusers classes a LyCORIS adapter wraps (apply_preset.target_module of the wizard's lycoris_config)
    lycoris_targets: tuple[str, ...] = ("Attention", "FeedForward")
    quickstart: Quickstart = field(default_factory=Quickstart)

    @property
    def is_video(self) -> bool:
        """True when the family generates videos (its flavours are t2v / i2v)."""
        return any(flavour.kind in ("t2v", "i2v") for flavour in self.flavours.values())

    def flavour(self, name: str | None) -> Flavour:
        """The named flavour (the default for None); ConfigError naming the valid ones otherwise."""
        chosen = self.default_flavour if name is None else name
        if chosen not in self.flavours:
            hint = nearest(chosen, self.flavours)
            guess = f"; did you mean '{hint}'?" if hint else "."
            raise ConfigError(
                f"model_flavour '{chosen}' is not a flavour of {self.name}{guess} "
                f"Valid flavours: {', '.join(self.flavours)} (default {self.default_flavour})"
            )
        return self.flavours[chosen]

    def usable_frame_count(self, frames: int) -> int:
        """The largest frame count <= `frames` that the VAE takes ((frames - 1) % frames_per_latent == 0)."""
        return (frames - 1) // self.frames_per_latent * self.frames_per_latent + 1

    def frame_count_problem(self, frames: int) -> str | None:
        """None when a clip of `frames` suits the VAE, else why not and the two nearest valid counts."""
        step = self.frames_per_latent
        if frames >= 1 and (frames - 1) % step == 0:
            return None
        lower = max(1, (frames - 1) // step * step + 1)
        choices = f"{lower + step}" if frames < 1 else f"{lower} or {lower + step}"
        return (
            f"{self.name} needs (frames - 1) divisible by {step} (its VAE compresses time {step}x); "
            f"use {choices}"
        )


_K5_HUB = "kandinskylab/Kandinsky-5.0-{}-Diffusers"
_GROUP_OFFLOAD = {
    "enable_group_offload": True,
    "group_offload_type": "block_level",
    "group_offload_blocks_per_group": 1,
    "group_offload_use_stream": True,  # CUDA only; elsewhere the trainer warns and goes without
    "offload_during_startup": True,
}

SDXL = FamilySpec(
    name="sdxl",
    title="Stable Diffusion XL",
    module="difftune.families.sdxl:SDXLFamily",
    tiny_model="difftune.testing.sdxl:build_tiny_sdxl",
    flavours={"base-1.0": Flavour("stabilityai/stable-diffusion-xl-base-1.0", "SDXL 1.0 base", "t2i")},
    default_flavour="base-1.0",
    defaults={"validation_guidance": 7.5, "validation_resolution": "1024x1024"},
    pixel_multiple=64,
    adapter_prefix="unet",
    flow_matching=False,
    # the original tool's LyCORIS guide keeps SDXL to Attention: its FeedForward layers can send the loss to NaN
    lycoris_targets=("Attention",),
    quickstart=Quickstart(
        resolution=1024,
        validation_prompt="a photo of a cat sitting on a windowsill, soft morning light",
        config={"validation_guidance": 4.2},
        memory={
            48: {},
            24: {},
            16: {"vae_enable_slicing": True},
            12: {
                "base_model_precision": "int8-quanto",
                "optimizer": "optimi-lion",
                "vae_enable_slicing": True,
            },
        },
        dataset={"crop": True, "crop_aspect": "square", "crop_style": "random", "repeats": 0},
    ),
)

KANDINSKY5_IMAGE = FamilySpec(
    name="kandinsky5-image",
    title="Kandinsky 5.0 Image",
    module="difftune.families.kandinsky5_image:Kandinsky5ImageFamily",
    tiny_model="difftune.testing.kandinsky5:build_tiny_kandinsky5_image",
    flavours={
        "t2i-lite-sft": Flavour(
            _K5_HUB.format("T2I-Lite-sft"), "standard SFT checkpoint; best for styles and characters", "t2i"
        ),
        "t2i-lite-pretrain": Flavour(
            _K5_HUB.format("T2I-Lite-pretrain"),
            "pretraining checkpoint; for teaching new concepts from scratch",
            "t2i",
        ),
        "i2i-lite-sft": Flavour(
            _K5_HUB.format("I2I-Lite-sft"), "image-to-image (needs conditioning images)", "i2i"
        ),
        "i2i-lite-pretrain": Flavour(
            _K5_HUB.format("I2I-Lite-pretrain"),
            "image-to-image pretraining checkpoint (needs conditioning images)",
            "i2i",
        ),
    },
    default_flavour="t2i-lite-sft",
    defaults={
        "validation_guidance": 5.0,
        "flow_schedule_shift": 1.0,
        "validation_resolution": "1024x1024",
        "lora_rank": 16,
    },
    pixel_multiple=16,  # 8x VAE downsampling times 2x2 patches
    lycoris_targets=("Kandinsky5Attention", "Kandinsky5FeedForward"),
    quickstart=Quickstart(
        resolution=1024,
        validation_prompt="A high quality portrait of a woman, cinematic lighting, 8k",
        memory={
            48: {},
            24: dict(_GROUP_OFFLOAD),
            16: {**_GROUP_OFFLOAD, "base_model_precision": "int8-quanto", "base_model_default_dtype": "bf16"},
            12: {
                **_GROUP_OFFLOAD,
                "base_model_precision": "int8-quanto",
                "base_model_default_dtype": "bf16",
                "vae_enable_tiling": True,
            },
        },
        dataset={"crop": True, "crop_aspect": "square", "repeats": 10},
        minimum_vram_gb=16,
    ),
)

KANDINSKY5_VIDEO = FamilySpec(
    name="kandinsky5-video",
    title="Kandinsky 5.0 Video",
    module="difftune.families.kandinsky5_video:Kandinsky5VideoFamily",
    tiny_model="difftune.testing.kandinsky5_video:build_tiny_kandinsky5_video",
    flavours={
        "t2v-lite-sft-5s": Flavour(_K5_HUB.format("T2V-Lite-sft-5s"), "Lite, ~5 s clips", "t2v"),
        "t2v-lite-pretrain-5s": Flavour(
            _K5_HUB.format("T2V-Lite-pretrain-5s"), "Lite pretraining checkpoint, ~5 s", "t2v"
        ),
        "t2v-lite-sft-10s": Flavour(_K5_HUB.format("T2V-Lite-sft-10s"), "Lite, ~10 s clips", "t2v"),
        "t2v-lite-pretrain-10s": Flavour(
            _K5_HUB.format("T2V-Lite-pretrain-10s"), "Lite pretraining checkpoint, ~10 s", "t2v"
        ),
        "t2v-pro-sft-5s-hd": Flavour(
            _K5_HUB.format("T2V-Pro-sft-5s"),
            "Pro, ~5 s, high definition (needs group offload on one GPU)",
            "t2v",
        ),
        "t2v-pro-sft-10s-hd": Flavour(
            _K5_HUB.format("T2V-Pro-sft-10s"),
            "Pro, ~10 s, high definition (needs group offload on one GPU)",
            "t2v",
        ),
        "t2v-pro-pretrain-5s-hd": Flavour(
            _K5_HUB.format("T2V-Pro-pretrain-5s"), "Pro pretraining checkpoint, ~5 s", "t2v"
        ),
        "t2v-pro-pretrain-10s-hd": Flavour(
            _K5_HUB.format("T2V-Pro-pretrain-10s"), "Pro pretraining checkpoint, ~10 s", "t2v"
        ),
        "i2v-lite-5s": Flavour(
            _K5_HUB.format("I2V-Lite-5s"), "image-to-video Lite, 5 s (first frame conditions the clip)", "i2v"
        ),
        "i2v-pro-sft-5s": Flavour(_K5_HUB.format("I2V-Pro-sft-5s"), "image-to-video Pro SFT, 5 s", "i2v"),
    },
    default_flavour="t2v-lite-sft-5s",
    defaults={
        "validation_guidance": 5.0,
        "flow_schedule_shift": 1.0,
        "validation_resolution": "512x768",
        "validation_num_video_frames": 61,
        "framerate": 24,
    },
    pixel_multiple=16,
    frames_per_latent=4,  # HunyuanVideo VAE: 4x in time, 8x in space
    lycoris_targets=("Kandinsky5Attention", "Kandinsky5FeedForward"),
    quickstart=Quickstart(
        resolution=512,
        validation_resolution="512x768",
        validation_prompt="a cat walking through a sunny garden, camera pans right",
        memory={
            48: {},
            24: dict(_GROUP_OFFLOAD),
            16: {**_GROUP_OFFLOAD, "vae_enable_patch_conv": True},
            12: {
                **_GROUP_OFFLOAD,
                "vae_enable_patch_conv": True,
                "vae_enable_tiling": True,
                "base_model_precision": "int8-quanto",
            },
        },
        dataset={
            "repeats": 10,
            "video": {
                "num_frames": 61,
                "min_frames": 61,
                "frame_rate": 24,
                "bucket_strategy": "aspect_ratio",
            },
        },
    ),
)

# model_family -> its row, in the order the wizard and the web form list them.
FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in (SDXL, KANDINSKY5_IMAGE, KANDINSKY5_VIDEO)}


def register(spec: FamilySpec) -> None:
    """Add a family's row (a package's own family, or a test's); its name must be new."""
    if spec.name in FAMILIES:
        raise ValueError(f"a family named '{spec.name}' is already registered")
    if spec.default_flavour not in spec.flavours:
        raise ValueError(f"{spec.name}: default_flavour '{spec.default_flavour}' is not one of its flavours")
    FAMILIES[spec.name] = spec


def unregister(name: str) -> None:
    """Remove a family added with `register` (the built-in rows stay)."""
    if name in (SDXL.name, KANDINSKY5_IMAGE.name, KANDINSKY5_VIDEO.name):
        raise ValueError(f"'{name}' is built in and cannot be removed")
    FAMILIES.pop(name, None)


def canonical_name(name: str) -> str:
    """`kandinsky5_image` and `Kandinsky5-Image` both name `kandinsky5-image`."""
    return name.strip().lower().replace("_", "-")


def spec(name: str) -> FamilySpec:
    """The row of a family (any accepted spelling); ConfigError with the nearest valid name otherwise."""
    canonical = canonical_name(name)
    if canonical not in FAMILIES:
        hint = nearest(canonical, FAMILIES)
        guess = f"did you mean '{hint}'? " if hint else ""
        raise ConfigError(
            f"model_family '{name}' is not a family difftune trains; {guess}"
            f"Valid families: {', '.join(FAMILIES)}"
        )
    return FAMILIES[canonical]


def flavour_hub_id(family: str, flavour: str | None = None) -> str:
    """Hub id of a family's flavour (its default flavour when `flavour` is None)."""
    return spec(family).flavour(flavour).hub_id
