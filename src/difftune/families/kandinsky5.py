"""What Kandinsky 5.0 image and video families share: loading, prompt encoding, batching, the transformer
call, the flow-matching objective, LoRA files and the pipeline; `Kandinsky5Family` is their base class.

Prompt tensors (one prompt, as cached):
- "prompt_embeds_qwen": (L, D_qwen) Qwen2.5-VL last hidden states after the template crop; L varies
- "prompt_embeds_clip": (D_clip,) CLIP pooled output
Batched (see `collate_prompt_embeds`): "prompt_embeds_qwen" (B, L_max, D) zero-padded,
"prompt_cu_seqlens" (B + 1,) int32 cumulative lengths, "prompt_embeds_clip" (B, D_clip).

The transformer works on channels-last latents (B, T, H, W, C) and has no text attention mask, so
padding would change its output; `transformer_forward` therefore runs each group of equal text
length on its own, which is what the pipelines do for a single prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from difftune.families.base import (
    BlockArgument,
    Components,
    Family,
    GenerationRequest,
    Objective,
    RoutableBlock,
    TokenGrid,
)
from difftune.families.flow_matching import FlowMatchingObjective
from difftune.families.vae_source import load_vae

# Attention and feed-forward projections of the text and visual blocks. Suffixes with the parent
# name, because "out_layer" alone would also match the modulation, time-embedding and output layers.
LORA_TARGETS: tuple[str, ...] = (
    "self_attention.to_query",
    "self_attention.to_key",
    "self_attention.to_value",
    "self_attention.out_layer",
    "cross_attention.to_query",
    "cross_attention.to_key",
    "cross_attention.to_value",
    "cross_attention.out_layer",
    "feed_forward.in_layer",
    "feed_forward.out_layer",
)

# The longest Qwen prompt (tokenizer_max_length) the pipelines take.
MAX_PROMPT_TOKENS = 1024

# Sigma in [0, 1] -> the `timestep` the pipelines pass (FlowMatchEulerDiscreteScheduler timesteps).
DEFAULT_NUM_TRAIN_TIMESTEPS = 1000


def visual_block_count(model_id: str) -> int | None:
    """`num_visual_blocks` of the transformer of a local folder or a cached Hub snapshot, else None."""
    import json
    from pathlib import Path

    path: Path | str | None = Path(model_id) / "transformer" / "config.json"
    if not Path(path).is_file():
        from huggingface_hub import try_to_load_from_cache

        try:
            path = try_to_load_from_cache(model_id, "transformer/config.json")
        except ValueError:  # neither a folder nor a Hub id: the load reports it
            return None
    if not isinstance(path, (str, Path)):
        return None
    count = json.loads(Path(path).read_text()).get("num_visual_blocks")
    return count if isinstance(count, int) else None


def load_qwen_tokenizer(index: dict[str, Any], model_id: str, revision: str | None = None):
    """The pipeline's `tokenizer` as model_index.json names it; a `Qwen2VLProcessor` (the Hub folders)
    is loaded without torchvision (see `qwen_processor`)."""
    import transformers

    from difftune.families.qwen_processor import PROCESSOR_CLASS, load_qwen2_vl_processor

    class_name = index["tokenizer"][1]
    if class_name == PROCESSOR_CLASS:
        return load_qwen2_vl_processor(model_id, "tokenizer", revision)
    return getattr(transformers, class_name).from_pretrained(
        model_id, subfolder="tokenizer", revision=revision
    )


def text_pipeline(pipeline_cls: type, text_encoder, tokenizer, text_encoder_2, tokenizer_2):
    """A stock Kandinsky 5 pipeline holding only the text encoders, to call its own `encode_prompt`."""
    return pipeline_cls(
        transformer=None,
        vae=None,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        scheduler=None,
    )


@torch.no_grad()
def encode_prompt_embeds(
    pipeline,
    texts: Sequence[str],
    *,
    device: torch.device,
    dtype: torch.dtype,
    images: Sequence[Any] | None = None,
    max_sequence_length: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Encode each text alone through `pipeline.encode_prompt` (template, crop, CLIP pooling as the pipeline).

    `images` (one PIL image per text) are for the image-conditioned pipelines, whose Qwen template
    holds the source image. Returns one dict per text, tensors on the CPU, without a batch dimension.
    """
    if images is not None and len(images) != len(texts):
        raise ValueError(
            f"got {len(images)} conditioning images for {len(texts)} prompts; pass one per prompt"
        )
    results = []
    for index, text in enumerate(texts):
        kwargs: dict[str, Any] = {"prompt": [text], "device": device, "dtype": dtype}
        if images is not None:
            kwargs["image"] = images[index]
        if max_sequence_length is not None:
            kwargs["max_sequence_length"] = max_sequence_length
        qwen, clip, cu_seqlens = pipeline.encode_prompt(**kwargs)
        length = int(cu_seqlens[1] - cu_seqlens[0])
        results.append({"prompt_embeds_qwen": qwen[0, :length].cpu(), "prompt_embeds_clip": clip[0].cpu()})
    return results


def collate_prompt_embeds(embeds: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Batch cached prompts: zero-pad Qwen embeddings to the longest and record cumulative lengths."""
    qwen = [e["prompt_embeds_qwen"] for e in embeds]
    lengths = torch.tensor([q.shape[0] for q in qwen], dtype=torch.int32)
    padded = qwen[0].new_zeros(len(qwen), int(lengths.max()), qwen[0].shape[-1])
    for row, tensor in enumerate(qwen):
        padded[row, : tensor.shape[0]] = tensor
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
    return {
        "prompt_embeds_qwen": padded,
        "prompt_cu_seqlens": cu_seqlens,
        "prompt_embeds_clip": torch.stack([e["prompt_embeds_clip"] for e in embeds]),
    }


def visual_rope_positions(transformer, latents_bthwc: torch.Tensor) -> list[torch.Tensor]:
    """RoPE positions per axis (T, H, W) in patches, as the pipelines build them."""
    patch = transformer.config.patch_size
    _, frames, height, width, _ = latents_bthwc.shape
    device = latents_bthwc.device
    return [
        torch.arange(frames // patch[0], device=device),
        torch.arange(height // patch[1], device=device),
        torch.arange(width // patch[2], device=device),
    ]


def with_visual_condition(
    transformer,
    latents_bthwc: torch.Tensor,
    condition_bthwc: torch.Tensor | None,
    mask_bthwc: torch.Tensor | None = None,
) -> torch.Tensor:
    """Append [condition latents, mask] channels when the transformer has `visual_cond`.

    Mirrors the pipelines: image-conditioned models get the encoded source and a mask of ones;
    a visual_cond model without a source gets zeros for both. `mask_bthwc` (B, T, H, W, 1), when
    given, replaces that mask (the I2V pipeline marks only the first frame). Returns (B, T, H, W, C').
    """
    if not transformer.config.visual_cond:
        if condition_bthwc is not None or mask_bthwc is not None:
            raise ValueError("conditioning latents were given but this transformer has no visual_cond input")
        return latents_bthwc
    if condition_bthwc is None:
        condition = torch.zeros_like(latents_bthwc)
        mask = torch.zeros_like(latents_bthwc[..., :1])
    else:
        condition = condition_bthwc.to(latents_bthwc.dtype)
        mask = torch.ones_like(latents_bthwc[..., :1])
    if mask_bthwc is not None:
        mask = mask_bthwc.to(device=latents_bthwc.device, dtype=latents_bthwc.dtype).expand_as(mask)
    return torch.cat([latents_bthwc, condition, mask], dim=-1)


def text_length_groups(cu_seqlens: torch.Tensor) -> list[list[int]]:
    """Batch rows grouped by prompt length, shortest first: the order `transformer_forward` calls in."""
    lengths = cu_seqlens.diff().tolist()
    return [[i for i, n in enumerate(lengths) if n == length] for length in sorted(set(lengths))]


def transformer_forward(
    transformer,
    latents_bthwc: torch.Tensor,
    sigmas: torch.Tensor,
    prompt: dict[str, torch.Tensor],
    *,
    condition_bthwc: torch.Tensor | None = None,
    mask_bthwc: torch.Tensor | None = None,
    scale_factor: Sequence[float] = (1.0, 1.0, 1.0),
    sparse_params: dict[str, Any] | None = None,
    num_train_timesteps: int = DEFAULT_NUM_TRAIN_TIMESTEPS,
) -> torch.Tensor:
    """Call the transformer as the pipelines' denoising loop does; returns the velocity (B, T, H, W, C).

    latents_bthwc: (B, T, H, W, C) noisy latents; sigmas: (B,) in [0, 1] (passed as sigma * 1000,
    the scheduler's timesteps); prompt: the output of `collate_prompt_embeds`; condition_bthwc and
    mask_bthwc: see `with_visual_condition`.
    """
    hidden = with_visual_condition(transformer, latents_bthwc, condition_bthwc, mask_bthwc)
    dtype = latents_bthwc.dtype
    timestep = (sigmas.to(device=hidden.device, dtype=torch.float32) * num_train_timesteps).to(dtype)
    qwen = prompt["prompt_embeds_qwen"].to(device=hidden.device, dtype=dtype)
    clip = prompt["prompt_embeds_clip"].to(device=hidden.device, dtype=dtype)
    lengths = prompt["prompt_cu_seqlens"].diff().tolist()
    rope = visual_rope_positions(transformer, latents_bthwc)

    outputs, order = [], []
    for rows in text_length_groups(prompt["prompt_cu_seqlens"]):
        length = lengths[rows[0]]
        index = torch.tensor(rows, device=hidden.device)
        out = transformer(
            hidden_states=hidden[index],
            encoder_hidden_states=qwen[index, :length],
            pooled_projections=clip[index],
            timestep=timestep[index],
            visual_rope_pos=rope,
            text_rope_pos=torch.arange(length, device=hidden.device),
            scale_factor=list(scale_factor),
            sparse_params=sparse_params,
            return_dict=True,
        ).sample
        outputs.append(out)
        order.extend(rows)
    prediction = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    if order != sorted(order):
        prediction = prediction[torch.argsort(torch.tensor(order, device=prediction.device))]
    return prediction


def find_visual_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The `visual_transformer_blocks` of a Kandinsky 5 transformer, inside peft / accelerate wrappers too."""
    for module in model.modules():
        blocks = getattr(module, "visual_transformer_blocks", None)
        if isinstance(blocks, torch.nn.ModuleList):
            return blocks
    raise ValueError(
        f"{type(model).__name__} has no visual_transformer_blocks: not a Kandinsky 5 transformer"
    )


# The visual block's forward: (visual_embed (B, N, D), text_embed, time_embed (B, time_dim),
# rope (B or 1, N, 1, head_dim/2, 2, 2), sparse_params). The transformer passes the same time_embed
# to every visual block of one call.
VISUAL_BLOCK_CALL = RoutableBlock(
    tokens=BlockArgument(0, "visual_embed"),
    call=BlockArgument(2, "time_embed"),
    positions=BlockArgument(3, "rope"),
    must_be_none=(
        (
            BlockArgument(4, "sparse_params"),
            "tread_config cannot be used with sparse (nabla) attention: its block mask covers the full "
            "token grid; train with attention_type 'regular' or remove tread_config",
        ),
    ),
)


class VisualTokenGrid(TokenGrid):
    """The visual blocks' tokens: the patched latent grid (B, T/pt, H/ph, W/pw) flattened frame by frame,
    row by row, or in 8x8 tiles when sparse attention asks for its fractal order (`to_fractal`)."""

    def hidden_size(self, denoiser: torch.nn.Module) -> int:
        """The transformer's model_dim."""
        return int(denoiser.config.model_dim)

    def layout_of_call(
        self, denoiser: torch.nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The grid of the call's channels-last `hidden_states` (B, T, H, W, C) in patches, and its token order."""
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        batch, frames, height, width = hidden.shape[:4]
        pt, ph, pw = denoiser.config.patch_size
        sparse = kwargs.get("sparse_params")
        fractal = bool(sparse.get("to_fractal", False)) if sparse else False
        return partial(
            _visual_tokens_to_grid, shape=(batch, frames // pt, height // ph, width // pw), fractal=fractal
        )


def _visual_tokens_to_grid(
    tokens: torch.Tensor, shape: tuple[int, int, int, int], fractal: bool
) -> torch.Tensor:
    """A visual block's output (B, N, D) -> (B, T', h, w, D), undoing the transformer's token order."""
    from diffusers.models.transformers.transformer_kandinsky import fractal_unflatten

    if tokens.ndim == 3:
        tokens = fractal_unflatten(tokens, shape, block_mask=fractal)
    return tokens.reshape(*shape, tokens.shape[-1])


class Kandinsky5Family(Family):
    """Kandinsky 5.0 image and video: Qwen2.5-VL + CLIP text, a flow-matching DiT on channels-last latents.

    Subclasses give the pipeline classes, the layout changes of `model_forward` and `generate`.
    """

    max_prompt_tokens = MAX_PROMPT_TOKENS
    prompt_limit_owner = "the Kandinsky 5 pipelines"

    def pipeline_class(self) -> type:
        """The stock pipeline of this flavour (text- or image-conditioned)."""
        raise NotImplementedError

    # -- loading ------------------------------------------------------------------------------
    def load(self, device: torch.device, weight_dtype: torch.dtype) -> Components:
        """Each component from its subfolder, with the class model_index.json names (the replacement VAE
        of pretrained_vae_model_name_or_path too)."""
        import diffusers
        import transformers

        model_id, revision = self.model_id(), self.config.revision
        index = diffusers.DiffusionPipeline.load_config(model_id, revision=revision)

        def part_class(name: str) -> type:
            library, class_name = index[name]
            return getattr(diffusers if library == "diffusers" else transformers, class_name)

        def load_part(name: str, **kwargs):
            return part_class(name).from_pretrained(model_id, subfolder=name, revision=revision, **kwargs)

        transformer = load_part("transformer", torch_dtype=weight_dtype).to(device)
        vae_source = self.config.pretrained_vae_model_name_or_path
        if vae_source:
            vae = load_vae(part_class("vae"), vae_source, torch_dtype=weight_dtype)
        else:
            vae = load_part("vae", torch_dtype=weight_dtype)
        text_encoder = load_part("text_encoder", dtype=weight_dtype).to(device).eval()
        text_encoder_2 = load_part("text_encoder_2", dtype=weight_dtype).to(device).eval()
        for module in (vae, text_encoder, text_encoder_2):
            module.requires_grad_(False)
        return Components(
            denoiser=transformer,
            vae=vae.to(device).eval(),
            text_encoders=[text_encoder, text_encoder_2],
            tokenizers=[load_qwen_tokenizer(index, model_id, revision), load_part("tokenizer_2")],
            scheduler=load_part("scheduler"),
        )

    # -- conditioning -------------------------------------------------------------------------
    def encode_prompts(
        self, components: Components, texts: list[str], images: Sequence[Any] | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """Per text: {"prompt_embeds_qwen": (L, D) with L varying, "prompt_embeds_clip": (D2,)}.

        Computed by the stock pipeline's `encode_prompt`, one prompt at a time (no padding); `images`
        (one PIL image per text) for flavours whose prompt template holds the source image.
        """
        qwen, clip = components.text_encoders
        pipeline = text_pipeline(
            self.pipeline_class(), qwen, components.tokenizers[0], clip, components.tokenizers[1]
        )
        return encode_prompt_embeds(
            pipeline,
            texts,
            device=qwen.device,
            dtype=qwen.dtype,
            images=images,
            max_sequence_length=self.config.tokenizer_max_length,
        )

    def collate_prompts(self, embeds: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Zero-padded Qwen embeddings (B, L_max, D), their cu_seqlens (B + 1,) and CLIP pooled (B, D2)."""
        return collate_prompt_embeds(embeds)

    @torch.no_grad()
    def encode_pixels(
        self,
        components: Components,
        pixels: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Pixels in [-1, 1] -> a posterior sample times scaling_factor, as the pipelines encode (no
        shift_factor); `generator` draws the sample."""
        vae = components.vae
        posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        return posterior.sample(generator=generator) * vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, components: Components, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> pixels in [-1, 1] (unclamped), as the pipelines decode."""
        vae = components.vae
        return vae.decode(latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor).sample

    def pipeline_latents(self, components: Components, latents: torch.Tensor) -> torch.Tensor:
        """The pipelines sample channels-last (B, T, h, w, C + condition channels) -> (B, C, T, h, w)."""
        channels = components.denoiser.config.in_visual_dim
        return latents[..., :channels].permute(0, 4, 1, 2, 3)

    # -- training -----------------------------------------------------------------------------
    def objective(self, components: Components) -> Objective:
        """Flow matching with the config's shift, schedule, sigmoid scale and min-SNR weighting."""
        return FlowMatchingObjective.from_config(self.config, self.num_train_timesteps(components))

    def num_train_timesteps(self, components: Components) -> int:
        """The scheduler's timestep scale (sigma -> timestep)."""
        return int(components.scheduler.config.get("num_train_timesteps", DEFAULT_NUM_TRAIN_TIMESTEPS))

    def row_order(self, batch: dict[str, Any]) -> list[int]:
        """Rows in the order the transformer sees them: grouped by prompt length (see `transformer_forward`)."""
        return [row for group in text_length_groups(batch["prompt_cu_seqlens"]) for row in group]

    def lora_targets(self) -> list[str]:
        """Attention (query, key, value, out) and feed-forward projections; modulation layers excluded."""
        return list(LORA_TARGETS)

    def fp32_weight_modules(self) -> tuple[str, ...]:
        """The attention's query and key RMSNorms, which the diffusers processor calls on fp32 queries and
        keys (`attn.query_norm(query.float())`)."""
        return ("query_norm", "key_norm")

    def denoiser_block_count(self) -> int | None:
        """The transformer's visual blocks, from its config.json."""
        return visual_block_count(self.model_id())

    def transformer_blocks(self, denoiser: torch.nn.Module) -> torch.nn.ModuleList:
        """The visual transformer blocks (the text blocks run once per prompt, before them)."""
        return find_visual_blocks(denoiser)

    def routable_block(self) -> RoutableBlock:
        """The visual blocks' call (see `VISUAL_BLOCK_CALL`)."""
        return VISUAL_BLOCK_CALL

    def token_grid(self) -> TokenGrid:
        """The visual tokens' layout (see `VisualTokenGrid`)."""
        return VisualTokenGrid()

    # -- output -------------------------------------------------------------------------------
    def pipeline(self, components: Components, denoiser: torch.nn.Module):
        """The stock pipeline of this flavour with `denoiser` as its transformer."""
        qwen, clip = components.text_encoders
        return self.pipeline_class()(
            transformer=denoiser,
            vae=components.vae,
            text_encoder=qwen,
            tokenizer=components.tokenizers[0],
            text_encoder_2=clip,
            tokenizer_2=components.tokenizers[1],
            scheduler=components.scheduler,
        )

    def pipeline_arguments(self, request: GenerationRequest) -> dict[str, Any]:
        """The arguments every Kandinsky 5 pipeline takes, from a request (no guidance rescale: refused
        at load time, see `validation_settings_refused`)."""
        arguments: dict[str, Any] = {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "width": request.width,
            "height": request.height,
            "num_inference_steps": request.num_inference_steps,
            "guidance_scale": request.guidance_scale,
            "generator": request.generator,
        }
        if request.on_step_end is not None:
            arguments["callback_on_step_end"] = request.on_step_end
        if self.config.tokenizer_max_length is not None:  # the prompt length the model was trained with
            arguments["max_sequence_length"] = self.config.tokenizer_max_length
        return arguments

    def save_lora(self, output_dir: Path, lora_state_dict: dict[str, torch.Tensor]) -> Path:
        """Write pytorch_lora_weights.safetensors with "transformer." keys and `lora_metadata()`, via the
        pipeline's own saver. `lora_state_dict`: peft's state dict of the transformer."""
        prefix = f"{self.adapter_prefix}."
        layers = {key.removeprefix(prefix): value for key, value in lora_state_dict.items()}
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.pipeline_class().save_lora_weights(
            output_dir, transformer_lora_layers=layers, transformer_lora_adapter_metadata=self.lora_metadata()
        )
        return output_dir / "pytorch_lora_weights.safetensors"

    def validation_settings_refused(self) -> dict[str, str]:
        """The Kandinsky 5 pipelines have no guidance rescale (0, the original tool's examples, is fine)."""
        refused = super().validation_settings_refused()
        if self.config.validation_guidance_rescale:
            refused["validation_guidance_rescale"] = (
                "the Kandinsky 5 pipelines have no guidance rescale; set it to 0 or remove it"
            )
        return refused
