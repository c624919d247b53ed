"""Weights that make a tiny VAE reproduce colours: each latent pixel holds its 8x8 block's colour.

For `AutoencoderKL` (images) and `AutoencoderKLHunyuanVideo` (videos, causal 3D convolutions whose
time padding repeats the first frame: the first latent frame holds the first frame, each later one
the last of the four frames it stands for, and the decoder repeats it over them).

A random tiny VAE turns any latent into noise and any image into a latent that barely depends on
its colour, so nothing trained through it can be seen. Here every block is set by hand instead:
the encoder carries (r, -r, g, -g, b, -b, +A, -A) through residual blocks whose branches are
zeroed, 2x2-averaging downsamplers and an attention whose output projection is zero. The final
GroupNorm (one group) then sees a mean of exactly zero and a spread dominated by the constant
channels A, so it scales every channel by nearly the same number, and SiLU(x) - SiLU(-x) = x undoes
the nonlinearity exactly. The decoder runs the same path backwards with nearest upsampling. The
scaled latents (times scaling_factor) are M @ rgb for a seeded matrix M with unit rows; rgb in
[-1, 1] comes back to within 0.5 %. The posterior keeps a small spread (std 0.02 of the scaled
latent) so that drawing a sample still draws something new.
"""

from __future__ import annotations

import math

import torch

REFERENCE = 20.0  # the constant channels' value: the GroupNorm's scale error is under (3 / REFERENCE^2) / 2
POSTERIOR_STD = 0.02  # of the scaled latent


def _conv(module: torch.nn.Module) -> torch.nn.Module:
    """The torch conv of a plain conv or of a causal 3D conv wrapper."""
    from diffusers.models.autoencoders.autoencoder_kl_hunyuan_video import HunyuanVideoCausalConv3d

    return module.conv if isinstance(module, HunyuanVideoCausalConv3d) else module


def _tap(weight: torch.Tensor) -> tuple:
    """The kernel position of 'this pixel (and this frame)': the spatial centre; in time the last tap,
    which a causal conv's front padding puts at the current frame."""
    centre = weight.shape[-1] // 2
    return (centre, centre) if weight.ndim == 4 else (weight.shape[2] - 1, centre, centre)


def _centre_tap(module: torch.nn.Module, matrix: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """A conv that maps channels by `matrix` (out, in) at each pixel, no spatial or temporal mixing."""
    conv = _conv(module)
    weight = torch.zeros_like(conv.weight)
    weight[(slice(None), slice(None), *_tap(weight))] = matrix
    conv.weight.data = weight
    if conv.bias is not None:
        conv.bias.data = torch.zeros_like(conv.bias) if bias is None else bias.clone()


def _identity(out_channels: int, in_channels: int) -> torch.Tensor:
    return torch.eye(out_channels, in_channels)


def _zero_branches(module: torch.nn.Module) -> None:
    """Residual blocks and attentions pass their input through unchanged (the branch outputs zero)."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.autoencoders.autoencoder_kl_hunyuan_video import HunyuanVideoResnetBlockCausal3D
    from diffusers.models.resnet import ResnetBlock2D

    for block in module.modules():
        if isinstance(block, (ResnetBlock2D, HunyuanVideoResnetBlockCausal3D)):
            _conv(block.conv2).weight.data.zero_()
            _conv(block.conv2).bias.data.zero_()
            if block.conv_shortcut is not None:
                _centre_tap(block.conv_shortcut, _identity(*_conv(block.conv_shortcut).weight.shape[:2]))
        elif isinstance(block, Attention):
            block.to_out[0].weight.data.zero_()
            block.to_out[0].bias.data.zero_()


def _carried(channels: int) -> torch.Tensor:
    """(channels, 3): rgb -> (r, -r, g, -g, b, -b, 0, 0, ...)."""
    matrix = torch.zeros(channels, 3)
    for colour in range(3):
        matrix[2 * colour, colour] = 1.0
        matrix[2 * colour + 1, colour] = -1.0
    return matrix


def _reference_bias(channels: int) -> torch.Tensor:
    bias = torch.zeros(channels)
    bias[6], bias[7] = REFERENCE, -REFERENCE
    return bias


def _norm_out(norm: torch.nn.GroupNorm) -> None:
    """The one-group norm's spread is that of the two reference channels: scale back by it."""
    if norm.num_groups != 1:
        raise ValueError(f"a colour VAE needs norm_num_groups=1, got {norm.num_groups}")
    norm.weight.data.fill_(REFERENCE * math.sqrt(2.0 / norm.num_channels))
    norm.bias.data.zero_()


def _uncarried(channels: int) -> torch.Tensor:
    """(3, channels): SiLU(x) - SiLU(-x) = x for each colour pair."""
    matrix = torch.zeros(3, channels)
    for colour in range(3):
        matrix[colour, 2 * colour] = 1.0
        matrix[colour, 2 * colour + 1] = -1.0
    return matrix


def colour_mixing(latent_channels: int, seed: int) -> torch.Tensor:
    """(latent_channels, 3): scaled latents = M @ rgb; seeded rows of unit length, full column rank."""
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(latent_channels, 3, generator=generator)
    return matrix / matrix.norm(dim=1, keepdim=True)


@torch.no_grad()
def make_colour_vae(vae, seed: int = 0):
    """Set the weights of a tiny `AutoencoderKL` or `AutoencoderKLHunyuanVideo` in place
    (norm_num_groups=1, first block >= 8 channels).

    See the module docstring; returns `vae`. Weights that the path does not use stay random.
    """
    encoder, decoder = vae.encoder, vae.decoder
    latent_channels = vae.config.latent_channels
    scale = vae.config.scaling_factor
    mixing = colour_mixing(latent_channels, seed)
    _zero_branches(vae)

    first = _conv(encoder.conv_in).weight.shape[0]
    _centre_tap(encoder.conv_in, _carried(first), _reference_bias(first))
    for block in encoder.down_blocks:
        for down in block.downsamplers or []:
            conv = _conv(down.conv)
            weight = torch.zeros_like(conv.weight)
            # the 2x2 average: a 2D input is padded right/bottom (taps 0, 1), a causal 3D one on all sides
            start = 0 if weight.ndim == 4 else 1
            window = (slice(start, start + 2), slice(start, start + 2))
            if weight.ndim == 5:
                window = (weight.shape[2] - 1, *window)
            for channel in range(weight.shape[0]):
                weight[(channel, channel, *window)] = 0.25
            conv.weight.data = weight
            conv.bias.data.zero_()
    last = encoder.conv_norm_out.num_channels
    _norm_out(encoder.conv_norm_out)
    moments = torch.zeros(2 * latent_channels, last)
    moments[:latent_channels] = mixing @ _uncarried(last) / scale
    log_variance = torch.full((latent_channels,), 2.0 * math.log(POSTERIOR_STD / scale))
    _centre_tap(encoder.conv_out, moments, torch.cat([torch.zeros(latent_channels), log_variance]))
    if vae.quant_conv is not None:  # plain 1x1 convs
        _centre_tap(vae.quant_conv, _identity(2 * latent_channels, 2 * latent_channels))

    if vae.post_quant_conv is not None:
        _centre_tap(vae.post_quant_conv, _identity(latent_channels, latent_channels))
    width = _conv(decoder.conv_in).weight.shape[0]
    unmix = torch.linalg.pinv(mixing) * scale  # (3, latent_channels): latents -> rgb
    _centre_tap(decoder.conv_in, _carried(width) @ unmix, _reference_bias(width))
    for block in decoder.up_blocks:
        for up in block.upsamplers or []:
            _centre_tap(up.conv, _identity(*_conv(up.conv).weight.shape[:2]))
    _norm_out(decoder.conv_norm_out)
    _centre_tap(decoder.conv_out, _uncarried(decoder.conv_norm_out.num_channels))
    return vae
