"""The tiny VAEs reproduce colours, so what a model learns can be seen in its decoded samples."""

import pytest
import torch

from difftune.testing.images import make_image_dataset


def _vaes():
    from difftune.testing.kandinsky5 import tiny_flux_vae
    from difftune.testing.sdxl import tiny_sdxl_vae

    return {"sdxl": tiny_sdxl_vae(seed=0), "flux": tiny_flux_vae(seed=0)}


@pytest.mark.parametrize("name", ["sdxl", "flux"])
@torch.no_grad()
def test_shapes_on_a_background_come_back_in_their_colours(tmp_path, name):
    from PIL import Image

    vae = _vaes()[name]
    path = make_image_dataset(tmp_path, n=1, sizes=((64, 64),))[0]
    pixels = torch.tensor(list(Image.open(path).getdata()), dtype=torch.float32)
    pixels = (pixels.T.reshape(1, 3, 64, 64) / 127.5) - 1.0
    latents = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
    decoded = vae.decode(latents / vae.config.scaling_factor).sample
    block_means = torch.nn.functional.avg_pool2d(pixels, 8)  # one latent pixel per 8x8 block
    # the decoder's one-group norm scales by 1 / sqrt(1 + mean(r^2 + g^2 + b^2) / 20^2): at most 0.4 %
    expected = torch.nn.functional.interpolate(block_means, scale_factor=8, mode="nearest")
    assert torch.allclose(decoded, expected, atol=0.01)
    assert latents.abs().max() <= 3.0**0.5 + 1e-4  # unit rows times rgb in [-1, 1]


def test_another_seed_gives_another_latent_space():
    from difftune.testing.sdxl import tiny_sdxl_vae

    a, b = tiny_sdxl_vae(seed=0), tiny_sdxl_vae(seed=1)
    assert not torch.equal(a.encoder.conv_out.weight, b.encoder.conv_out.weight)


@torch.no_grad()
def test_a_video_comes_back_in_its_colours_frame_by_frame():
    from difftune.testing.kandinsky5_video import tiny_hunyuan_video_vae

    vae = tiny_hunyuan_video_vae(seed=0)
    blocks = torch.rand(1, 3, 5, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    video = blocks.repeat_interleave(8, 3).repeat_interleave(8, 4)  # 5 frames of 8x8-pixel blocks
    latents = vae.encode(video).latent_dist.mode() * vae.config.scaling_factor
    decoded = vae.decode(latents / vae.config.scaling_factor).sample
    assert latents.shape == (1, 16, 2, 8, 8)
    # latent frame 0 is frame 0; latent frame 1 stands for frames 1-4 and holds frame 4 (causal time)
    expected = torch.cat([video[:, :, :1], video[:, :, 4:5].expand(-1, -1, 4, -1, -1)], dim=2)
    assert torch.allclose(decoded, expected, atol=0.01)
