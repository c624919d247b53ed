"""Qwen2-VL's processor (the Kandinsky 5 pipelines' `tokenizer`) without torchvision.

The Hub folders save the Qwen2.5-VL tokenizer as a `Qwen2VLProcessor`: the BPE tokenizer, an image
processor and a video processor. transformers builds the video processor only with torchvision,
and `Qwen2VLProcessor.from_pretrained` fails without it, although the pipelines never pass videos.
This builds the same processor from the tokenizer and the PIL image processor
(`Qwen2VLImageProcessorPil`, the same resizing and patching in PIL and torch), with no video part.
"""

from __future__ import annotations

from typing import Any

PROCESSOR_CLASS = "Qwen2VLProcessor"


def qwen2_vl_processor_without_video(image_processor, tokenizer):
    """A `Qwen2VLProcessor` of these two parts (its video processor None): images and text work as usual."""
    from transformers import Qwen2VLProcessor

    class ImageTextQwen2VLProcessor(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, argument_name: str, argument: Any):
            if argument_name == "video_processor" and argument is None:
                return None  # its base class exists only with torchvision
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageTextQwen2VLProcessor.__name__ = ImageTextQwen2VLProcessor.__qualname__ = PROCESSOR_CLASS
    return ImageTextQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


def load_qwen2_vl_processor(model_id: str, subfolder: str, revision: str | None = None):
    """The `Qwen2VLProcessor` saved in `model_id`/`subfolder`, loaded without torchvision."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(model_id, subfolder=subfolder, revision=revision)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(
        model_id, subfolder=subfolder, revision=revision
    )
    return qwen2_vl_processor_without_video(image_processor, tokenizer)
