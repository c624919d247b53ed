"""CLIP score of validation images against their prompts: 100 * cosine(image, text), floored at 0.

Loads a CLIP checkpoint (Hub id or local folder) with transformers' CLIPModel, CLIPTokenizer and the
PIL-backed CLIP image processor (the default one needs torchvision).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


def clip_score_from_embeddings(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> list[float]:
    """Row-wise CLIP scores of (N, D) image and text embeddings: max(100 * cosine, 0)."""
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"image and text embeddings differ in shape: {tuple(image_embeds.shape)} vs "
            f"{tuple(text_embeds.shape)}"
        )
    cosine = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
    return (100.0 * cosine).clamp_min(0.0).tolist()


def _image_processor(model_name_or_path: str):
    """The PIL CLIP image processor when this transformers has it, else the classic one."""
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:  # transformers 4.x: CLIPImageProcessor works on PIL/numpy without torchvision
        from transformers import CLIPImageProcessor as processor_class
    return processor_class.from_pretrained(model_name_or_path)


class ClipScorer:
    """Scores (image, prompt) pairs with one CLIP model, loaded once."""

    def __init__(
        self,
        model_name_or_path: str | Path = DEFAULT_CLIP_MODEL,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from transformers import CLIPModel, CLIPTokenizer

        from difftune.offline import check_fetchable

        name = str(model_name_or_path)
        check_fetchable(name, "pretrained_evaluation_model_name_or_path")
        try:
            self.model = CLIPModel.from_pretrained(name).to(device, dtype=dtype).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(name)
            self.image_processor = _image_processor(name)
        except OSError as exc:
            raise OSError(
                f"cannot load the CLIP model {name!r} for CLIP score: {exc}. Give a local folder "
                "with config.json, the weights, tokenizer files and preprocessor_config.json, or a "
                "Hub id that is downloadable here"
            ) from exc
        self.device = torch.device(device)
        self.max_length = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image | str | Path], prompts: Sequence[str]) -> list[float]:
        """CLIP score of each image against the prompt at the same index."""
        if len(images) != len(prompts):
            raise ValueError(
                f"CLIP score needs one prompt per image: got {len(images)} images and {len(prompts)} prompts"
            )
        if not images:
            return []
        pil_images = [_as_rgb(image) for image in images]
        pixels = self.image_processor(images=pil_images, return_tensors="pt")["pixel_values"]
        text = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        outputs = self.model(
            input_ids=text["input_ids"].to(self.device),
            attention_mask=text["attention_mask"].to(self.device),
            pixel_values=pixels.to(self.device, dtype=self.model.dtype),
        )
        return clip_score_from_embeddings(outputs.image_embeds, outputs.text_embeds)


def _as_rgb(image: Image.Image | str | Path) -> Image.Image:
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    return image.convert("RGB")
