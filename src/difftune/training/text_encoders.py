"""train_text_encoder: a LoRA on each of the family's text encoders, trained with the denoiser's adapter.

With it, each step encodes the batch's captions (after caption dropout) with the adapted encoders, with
gradients, instead of reading the text cache; the encoders' LoRA weights train in their own optimizer
parameter group at `text_encoder_lr` (default learning_rate), follow the same schedule, are averaged
over processes like the denoiser's gradients, are stored in checkpoints, and are saved into
pytorch_lora_weights.safetensors in the pipeline's layout (`Family.save_text_encoder_lora`: keys under
each encoder's prefix, such as "text_encoder."), so the stock pipeline's load_lora_weights loads them.
Validation runs with them. The run's features (`TrainingFeatures`) build it and call it at their named
points.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from difftune.errors import ConfigError

STATE_KEY = "text_encoder_lora"


def check_text_encoder_training(family, config) -> None:
    """Before the model load: ConfigError when train_text_encoder asks for what difftune does not do."""
    if not config.train_text_encoder:
        return
    if not family.text_encoder_lora_targets():
        raise ConfigError(
            f"train_text_encoder: {family.name} ({family.spec.title}) keeps its text encoders frozen in "
            "difftune, which trains only its denoiser; remove train_text_encoder"
        )
    if config.model_type != "lora":
        raise ConfigError(
            f"train_text_encoder trains LoRA adapters on the text encoders with a LoRA on the denoiser; "
            f"model_type is {config.model_type}, so use model_type lora or remove train_text_encoder"
        )
    if config.fsdp_enable:
        raise ConfigError("train_text_encoder does not work with fsdp_enable; remove one of them")


class TextEncoderTraining:
    """The adapted text encoders of a run; see the module docstring."""

    def __init__(self, family, components, config) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        self.family = family
        self.components = components
        self.metadata = {
            "r": config.lora_rank,
            "lora_alpha": config.effective_lora_alpha,
            "target_modules": family.text_encoder_lora_targets(),
            "lora_dropout": config.lora_dropout,
        }
        self.encoders: list[torch.nn.Module] = list(components.text_encoders)
        for encoder in self.encoders:
            encoder.requires_grad_(False)
            inject_adapter_in_model(LoraConfig(init_lora_weights="gaussian", **self.metadata), encoder)
            for parameter in encoder.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.to(torch.float32)
            encoder.train()
        self.learning_rate = (
            config.text_encoder_lr if config.text_encoder_lr is not None else config.learning_rate
        )

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for encoder in self.encoders for p in encoder.parameters() if p.requires_grad]

    def add_to(self, optimizer: torch.optim.Optimizer, lr_scale: float) -> None:
        """Train the encoders' LoRA in a parameter group of their own, at text_encoder_lr x lr_scale."""
        optimizer.add_param_group({"params": self.parameters(), "lr": self.learning_rate * lr_scale})

    def encode(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with its prompt tensors encoded now from its captions, with gradients."""
        return {
            **batch,
            **self.family.encode_prompts_with_gradients(self.components, list(batch["captions"])),
        }

    def average_gradients(self, accelerator) -> None:
        """Average the encoders' gradients over processes (DDP averages only the denoiser's)."""
        if accelerator.num_processes == 1:
            return
        for parameter in self.parameters():
            if parameter.grad is not None:
                parameter.grad = accelerator.reduce(parameter.grad, "mean")

    def layers(self) -> list[dict[str, torch.Tensor]]:
        """Each encoder's LoRA weights with peft's key names, detached."""
        from peft.utils import get_peft_model_state_dict

        return [
            {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(encoder).items()}
            for encoder in self.encoders
        ]

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint stores: {STATE_KEY: [per-encoder LoRA weights]}."""
        return {STATE_KEY: [{k: v.cpu() for k, v in layer.items()} for layer in self.layers()]}

    def load_state_dict(self, extra: dict[str, Any]) -> None:
        """Restore the encoders' LoRA weights from a checkpoint's extra state."""
        from peft.utils import set_peft_model_state_dict

        for encoder, layer in zip(self.encoders, extra.get(STATE_KEY, [])):
            set_peft_model_state_dict(encoder, layer)

    def save(self, lora_file: Path) -> None:
        """Add the encoders' LoRA layers to the saved pytorch_lora_weights file."""
        self.family.save_text_encoder_lora(lora_file, self.layers(), self.metadata)
