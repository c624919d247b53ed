"""Stand-in video and image-to-image families for the data tests, built on tests.data.fakes.FakeFamily."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from difftune.families.registry import FamilySpec, Flavour
from tests.data.fakes import FakeFamily


class FakeVideoFamily(FakeFamily):
    """encode_pixels: (B, 3, T, H, W) -> (B, 4, (T - 1) / 4 + 1, H / 8, W / 8): every 4th frame, 8x pooled."""

    spec = FamilySpec(
        name="fake-video",
        title="Fake video",
        module="tests.data.video_fakes:FakeVideoFamily",
        tiny_model="tests.data.fakes:fake_components",
        flavours={"v1": Flavour("fake/fake-video-v1", "a stand-in", "t2v")},
        default_flavour="v1",
        pixel_multiple=16,
        frames_per_latent=4,
    )

    def __init__(self, config, identity: str = "fake-video-v1", i2v: bool = False):
        super().__init__(config, identity)
        self.i2v = i2v
        self.frame_counts: list[int] = []
        self.first_frames_encoded = 0

    def encode_pixels(self, components, pixels, generator=None):
        if pixels.ndim != 5:
            raise ValueError(f"video pixels must be (B, C, T, H, W), got {tuple(pixels.shape)}")
        self.encoded_images += pixels.shape[0]
        self.frame_counts.append(pixels.shape[2])
        pooled = F.avg_pool3d(pixels.float(), (1, 8, 8))[:, :, ::4]
        return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)

    @property
    def conditioning(self):
        return "first_frame" if self.i2v else "none"

    def encode_condition(self, components, pixels, generator=None):
        self.first_frames_encoded += pixels.shape[0]
        return super().encode_condition(components, pixels, generator)


class FakeI2IFamily(FakeFamily):
    """An image family whose prompt embeddings depend on the source image (the mean colour is added)."""

    @property
    def conditioning(self):
        return "prompt_image"

    def __init__(self, config, identity: str = "fake-i2i-v1"):
        super().__init__(config, identity)
        self.prompt_images: list[tuple[str, tuple[int, int]]] = []

    def encode_prompts(self, components, texts, images=None):
        if images is None:
            raise ValueError("image-to-image prompts need images")
        out = super().encode_prompts(components, texts)
        for text, image, embeds in zip(texts, images, out):
            self.prompt_images.append((text, image.size))
            mean = torch.tensor(image.getpixel((0, 0)), dtype=torch.float32).mean() / 255
            embeds["pooled_prompt_embeds"] = embeds["pooled_prompt_embeds"] + mean
        return out
