"""A tiny stand-in Family and image helpers for the data and cache tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F

from difftune.families.base import Components, Family, Objective
from difftune.families.registry import FamilySpec, Flavour


class FakeFamily(Family):
    """encode_pixels: 8x average pool, 3 -> 4 channels; encode_prompts: a tensor seeded by the prompt's hash."""

    spec = FamilySpec(
        name="fake",
        title="Fake",
        module="tests.data.fakes:FakeFamily",
        tiny_model="tests.data.fakes:fake_components",
        flavours={"v1": Flavour("fake/fake-v1", "a stand-in", "t2i")},
        default_flavour="v1",
        pixel_multiple=16,
    )

    def __init__(self, config, identity: str = "fake-model-v1"):
        super().__init__(config)
        self.identity = identity
        self.encoded_prompts: list[str] = []
        self.encoded_images = 0
        self.pixel_dtypes: list[torch.dtype] = []

    def cache_identity(self) -> str:
        return self.identity

    def load(self, device, weight_dtype) -> Components:
        return fake_components()

    def encode_prompts(self, components, texts):
        self.encoded_prompts += list(texts)
        out = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")
            generator = torch.Generator().manual_seed(seed)
            out.append(
                {
                    "prompt_embeds": torch.randn(3, 8, generator=generator),
                    "pooled_prompt_embeds": torch.randn(8, generator=generator),
                }
            )
        return out

    def encode_pixels(self, components, pixels, generator=None):
        self.encoded_images += pixels.shape[0]
        self.pixel_dtypes.append(pixels.dtype)
        pooled = F.avg_pool2d(pixels.float(), 8)
        return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)

    def decode_latents(self, components, latents):
        return F.interpolate(latents[:, :3], scale_factor=8)

    def objective(self, components) -> Objective:
        raise RuntimeError("the data tests do not train")

    def batch_extras(self, geometry):
        """Each sample's sizes and crop as long tensors (B, 2), so the data tests can read them back."""
        return {
            "original_sizes": torch.tensor([g.original_size for g in geometry]),
            "crop_coords": torch.tensor([g.crop_top_left for g in geometry]),
            "target_sizes": torch.tensor([g.target_size for g in geometry]),
        }

    def model_forward(self, components, denoiser, noisy_latents, timesteps, batch):
        return noisy_latents

    def lora_targets(self):
        return []

    def pipeline(self, components, denoiser):
        return None

    def generate(self, pipeline, request):
        return []

    def save_lora(self, output_dir: Path, lora_state_dict):
        return output_dir


def fake_components(dtype: torch.dtype = torch.float32) -> Components:
    return Components(
        denoiser=torch.nn.Identity(),
        vae=torch.nn.Linear(1, 1).to(dtype),
        text_encoders=[],
        tokenizers=[],
        scheduler=None,
    )


def save_image(
    path: Path, size: tuple[int, int], colour=(200, 30, 30), exif_orientation: int | None = None
) -> Path:
    """Write a solid-colour image of (width, height) = size (stored as is; EXIF may say to rotate it)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour)
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif
    image.save(path, **kwargs)
    return path
