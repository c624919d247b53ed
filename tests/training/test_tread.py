"""TREAD routing on a tiny Kandinsky 5 transformer: token counts, exact eval output, training, config errors."""

from __future__ import annotations

import gc

import pytest
import torch

from difftune.families import kandinsky5 as k5
from difftune.families.base import Components
from difftune.testing.kandinsky5 import CLIP_DIM, LATENT_CHANNELS, QWEN_DIM, randomise_modulation
from difftune.training.tread import TreadRoute, TreadRouter, apply_tread

NUM_BLOCKS = 6
ROUTE = {"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}  # blocks 2..4


def config_errors() -> tuple[type[Exception], ...]:
    try:
        from difftune.config import ConfigError
    except ImportError:
        return (ValueError,)
    return (ValueError, ConfigError)


def tiny_transformer(num_blocks: int = NUM_BLOCKS, seed: int = 0):
    """The tiny test transformer's dims with more visual blocks, so routes have blocks on both sides."""
    from diffusers import Kandinsky5Transformer3DModel

    torch.manual_seed(seed)
    transformer = Kandinsky5Transformer3DModel(
        in_visual_dim=LATENT_CHANNELS,
        out_visual_dim=LATENT_CHANNELS,
        in_text_dim=QWEN_DIM,
        in_text_dim2=CLIP_DIM,
        time_dim=32,
        patch_size=(1, 2, 2),
        model_dim=64,
        ff_dim=128,
        num_text_blocks=1,
        num_visual_blocks=num_blocks,
        axes_dims=(4, 6, 6),
    )
    randomise_modulation(transformer, torch.Generator().manual_seed(seed + 1))
    return transformer


def prompt_batch(lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return k5.collate_prompt_embeds(
        [
            {
                "prompt_embeds_qwen": torch.randn(n, QWEN_DIM, generator=generator),
                "prompt_embeds_clip": torch.randn(CLIP_DIM, generator=generator),
            }
            for n in lengths
        ]
    )


def latents_bthwc(batch: int, frames: int, seed: int = 1) -> torch.Tensor:
    """(B, T, 8, 12, C): 4 x 6 patches per frame, 24 * T tokens."""
    return torch.randn(batch, frames, 8, 12, LATENT_CHANNELS, generator=torch.Generator().manual_seed(seed))


def run(transformer, latents: torch.Tensor, prompt: dict[str, torch.Tensor]) -> torch.Tensor:
    sigmas = torch.linspace(0.3, 0.7, latents.shape[0])
    return k5.transformer_forward(transformer, latents, sigmas, prompt)


def record_block_inputs(transformer) -> tuple[dict[int, list[tuple[int, int]]], list]:
    """Per visual block, the (tokens, rope tokens) of each call, as the block itself receives them."""
    seen: dict[int, list[tuple[int, int]]] = {}
    hooks = []
    for index, block in enumerate(transformer.visual_transformer_blocks):

        def hook(module, args, kwargs, index=index):
            seen.setdefault(index, []).append((args[0].shape[1], args[3].shape[1]))

        hooks.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, hooks


@pytest.mark.parametrize(("frames", "ratio"), [(1, 0.5), (3, 0.5), (3, 0.3)])
def test_routed_blocks_see_fewer_tokens_with_matching_rope(frames, ratio):
    transformer = tiny_transformer().train()
    route = {**ROUTE, "selection_ratio": ratio}
    handle = apply_tread(
        transformer,
        k5.find_visual_blocks(transformer),
        k5.VISUAL_BLOCK_CALL,
        {"routes": [route]},
        torch.Generator().manual_seed(0),
    )
    seen, hooks = record_block_inputs(transformer)  # registered after TREAD: sees the routed inputs
    out = run(transformer, latents_bthwc(2, frames), prompt_batch([5, 5]))
    num_tokens = 24 * frames
    kept = round(num_tokens * (1 - ratio))
    assert handle.router.kept_tokens(0, num_tokens) == kept
    for index in range(NUM_BLOCKS):
        expected = kept if 2 <= index <= 4 else num_tokens
        assert seen[index] == [(expected, expected)], f"block {index}"
    assert out.shape == (2, frames, 8, 12, LATENT_CHANNELS)
    for hook in hooks:
        hook.remove()
    handle.remove()


def test_eval_and_no_grad_see_all_tokens_and_match_plain_output():
    transformer = tiny_transformer()
    latents, prompt = latents_bthwc(2, 1), prompt_batch([4, 6])
    transformer.eval()
    with torch.no_grad():
        plain_eval = run(transformer, latents, prompt)
    transformer.train()
    with torch.no_grad():
        plain_train = run(transformer, latents, prompt)
    plain_grad = run(transformer, latents, prompt).detach()

    handle = apply_tread(
        transformer,
        k5.find_visual_blocks(transformer),
        k5.VISUAL_BLOCK_CALL,
        {"routes": [ROUTE]},
        torch.Generator().manual_seed(0),
    )
    seen, hooks = record_block_inputs(transformer)
    transformer.eval()
    assert torch.equal(run(transformer, latents, prompt).detach(), plain_eval)  # eval, grads on
    transformer.train()
    with torch.no_grad():
        assert torch.equal(run(transformer, latents, prompt), plain_train)  # pipeline-style no_grad
    assert all(tokens == (24, 24) for calls in seen.values() for tokens in calls)

    routed = run(transformer, latents, prompt).detach()
    assert not torch.equal(routed, plain_grad)
    handle.remove()
    assert torch.equal(run(transformer, latents, prompt).detach(), plain_grad)
    for hook in hooks:
        hook.remove()


def test_kept_tokens_run_the_routed_blocks_and_the_others_skip_them():
    transformer = tiny_transformer().train()
    generator = torch.Generator().manual_seed(7)
    captured: dict[str, torch.Tensor] = {}
    blocks = transformer.visual_transformer_blocks

    def grab_start(module, args):
        captured["hidden"], captured["text"], captured["time"], captured["rope"] = args[:4]

    first = blocks[2].register_forward_pre_hook(grab_start)  # before TREAD: sees the full sequence
    handle = apply_tread(
        transformer, k5.find_visual_blocks(transformer), k5.VISUAL_BLOCK_CALL, {"routes": [ROUTE]}, generator
    )
    last = blocks[4].register_forward_hook(lambda module, args, out: captured.update(out=out))
    state = generator.get_state()
    run(transformer, latents_bthwc(2, 3), prompt_batch([5, 5]))
    generator.set_state(state)
    indices = handle.router.select(0, 2, 72, torch.device("cpu"))
    handle.remove()
    first.remove()
    last.remove()

    out, hidden = captured["out"].detach(), captured["hidden"].detach()
    assert out.shape == hidden.shape == (2, 72, 64)
    kept = torch.zeros(2, 72, dtype=torch.bool)
    kept[torch.arange(2).unsqueeze(1), indices] = True
    assert torch.equal(out[~kept], hidden[~kept])  # routed-around tokens come back unchanged

    rows = torch.arange(2).unsqueeze(1)
    expected, rope = hidden[rows, indices], captured["rope"][rows, indices]
    with torch.no_grad():
        for block in blocks[2:5]:
            expected = block(expected, captured["text"], captured["time"], rope, None)
    torch.testing.assert_close(out[rows, indices], expected)
    assert not torch.allclose(out[rows, indices], hidden[rows, indices])


def test_draws_are_reproducible_from_the_generator():
    transformer = tiny_transformer().train()
    latents, prompt = latents_bthwc(2, 1), prompt_batch([5, 5])

    def routed_output(seed: int) -> torch.Tensor:
        with apply_tread(
            transformer,
            k5.find_visual_blocks(transformer),
            k5.VISUAL_BLOCK_CALL,
            {"routes": [ROUTE]},
            torch.Generator().manual_seed(seed),
        ):
            return run(transformer, latents, prompt).detach()

    assert torch.equal(routed_output(3), routed_output(3))
    assert not torch.equal(routed_output(3), routed_output(4))
    router = TreadRouter([ROUTE], NUM_BLOCKS, seed=11)
    again = TreadRouter([ROUTE], NUM_BLOCKS, seed=11)
    drawn = router.select(0, 4, 50, torch.device("cpu"))
    assert torch.equal(drawn, again.select(0, 4, 50, torch.device("cpu")))
    assert drawn.shape == (4, 25)
    assert all(len(set(row.tolist())) == 25 for row in drawn)  # distinct tokens per sample
    assert not torch.equal(drawn[0], drawn[1])  # drawn per sample


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    latents, prompt = latents_bthwc(3, 2), prompt_batch([4, 6, 4])  # two transformer calls
    target = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    results = []
    for checkpointing in (False, True):
        transformer = tiny_transformer().train()
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        handle = apply_tread(
            transformer,
            k5.find_visual_blocks(transformer),
            k5.VISUAL_BLOCK_CALL,
            {
                "routes": [
                    {**ROUTE, "start_layer_idx": 1, "end_layer_idx": 2},
                    {**ROUTE, "start_layer_idx": 4},
                ]
            },
            torch.Generator().manual_seed(2),
        )
        loss = (run(transformer, latents, prompt) - target).pow(2).mean()
        loss.backward()
        del loss
        gc.collect()
        assert all(len(route.calls) == 0 for route in handle._route_hooks)  # nothing kept after backward
        grads = torch.cat([p.grad.flatten() for p in transformer.parameters() if p.grad is not None])
        results.append(grads)
        handle.remove()
    torch.testing.assert_close(results[0], results[1])


def test_training_with_tread_lowers_the_loss():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from difftune.config.schema import TrainConfig
    from difftune.families.kandinsky5_image import Kandinsky5ImageFamily

    family = Kandinsky5ImageFamily(TrainConfig(model_family="kandinsky5-image"))
    transformer = tiny_transformer()
    components = Components(
        transformer, None, [], [], FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    )
    objective = family.objective(components)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, LATENT_CHANNELS, 8, 8, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    sigmas = objective.sample_timesteps(2, generator, "cpu")
    noisy, target = objective.add_noise(latents, noise, sigmas), objective.target(latents, noise, sigmas)
    batch = prompt_batch([5, 5])

    def loss_now() -> torch.Tensor:
        prediction = family.model_forward(components, transformer, noisy, sigmas, batch)
        return (prediction.float() - target).pow(2).mean()

    transformer.eval()
    with torch.no_grad():
        before = loss_now().item()
    handle = apply_tread(
        transformer,
        k5.find_visual_blocks(transformer),
        k5.VISUAL_BLOCK_CALL,
        {"routes": [{**ROUTE, "start_layer_idx": 1}]},
        generator,
    )
    seen, hooks = record_block_inputs(transformer)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=2e-3)
    transformer.train()
    for _ in range(20):
        loss = loss_now()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert seen[2][-1] == (8, 8)  # 16 tokens, half routed around blocks 1..4
    transformer.eval()
    with torch.no_grad():
        after = loss_now().item()
    assert after < 0.8 * before
    for hook in hooks:
        hook.remove()
    handle.remove()


def test_tiny_pipeline_transformer_routes_with_negative_indices(tiny_k5_image):
    from diffusers import Kandinsky5Transformer3DModel

    folder = tiny_k5_image
    transformer = Kandinsky5Transformer3DModel.from_pretrained(folder / "transformer").train()
    handle = apply_tread(
        transformer,
        k5.find_visual_blocks(transformer),
        k5.VISUAL_BLOCK_CALL,
        {"routes": [{"selection_ratio": 0.25, "start_layer_idx": -1, "end_layer_idx": -1}]},
        0,
    )
    assert handle.router.routes == [TreadRoute(0.25, 1, 1)]
    seen, hooks = record_block_inputs(transformer)
    run(transformer, latents_bthwc(1, 1), prompt_batch([3]))
    assert seen == {0: [(24, 24)], 1: [(18, 18)]}
    for hook in hooks:
        hook.remove()
    handle.remove()


@pytest.mark.parametrize(
    ("start", "end", "expected"), [(2, -2, (2, 4)), (-6, -1, (0, 5)), (0, 0, (0, 0)), (-3, 4, (3, 4))]
)
def test_negative_indices_count_from_the_end(start, end, expected):
    router = TreadRouter(
        [{"selection_ratio": 0.5, "start_layer_idx": start, "end_layer_idx": end}], 6, seed=0
    )
    assert (router.routes[0].start, router.routes[0].end) == expected


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        ([ROUTE, {**ROUTE, "start_layer_idx": 5, "end_layer_idx": 4}], r"routes\[1\].*start_layer_idx"),
        ([{**ROUTE, "start_layer_idx": -1, "end_layer_idx": 1}], r"routes\[0\].*start_layer_idx"),
        ([{**ROUTE, "selection_ratio": 0.0}], r"routes\[0\]\.selection_ratio"),
        ([{**ROUTE, "selection_ratio": 1.0}], r"routes\[0\]\.selection_ratio"),
        ([ROUTE, {**ROUTE, "selection_ratio": 1.5}], r"routes\[1\]\.selection_ratio"),
        ([{**ROUTE, "end_layer_idx": 6}], r"routes\[0\]\.end_layer_idx"),
        ([{**ROUTE, "start_layer_idx": -7}], r"routes\[0\]\.start_layer_idx"),
        ([{"selection_ratio": 0.5, "start_layer_idx": 2}], r"routes\[0\]: missing key.*end_layer_idx"),
        ([{**ROUTE, "ratio": 0.5}], r"routes\[0\]: unknown key.*ratio"),
        ([ROUTE, {**ROUTE, "start_layer_idx": 4, "end_layer_idx": 5}], r"routes\[0\].*routes\[1\].*overlap"),
    ],
)
def test_invalid_routes_name_the_route_and_key(routes, message):
    with pytest.raises(config_errors(), match=message):
        transformer = tiny_transformer()
        apply_tread(
            transformer, k5.find_visual_blocks(transformer), k5.VISUAL_BLOCK_CALL, {"routes": routes}, 0
        )


@pytest.mark.parametrize("value", [None, {"routes": []}, {"route": [ROUTE]}])
def test_malformed_tread_config_names_the_key(value):
    with pytest.raises(config_errors(), match="tread_config"):
        transformer = tiny_transformer()
        apply_tread(transformer, k5.find_visual_blocks(transformer), k5.VISUAL_BLOCK_CALL, value, 0)


def test_tread_without_a_routable_block_is_refused_at_set_up():
    from difftune.config import ConfigError

    transformer = tiny_transformer()
    with pytest.raises(
        ConfigError, match="tread_config: the family of Kandinsky5Transformer3DModel .*remove tread_config"
    ):
        apply_tread(transformer, k5.find_visual_blocks(transformer), None, {"routes": [ROUTE]}, 0)


def test_sparse_attention_is_refused_with_the_fix():
    transformer = tiny_transformer().train()
    call = k5.VISUAL_BLOCK_CALL
    blocks = k5.find_visual_blocks(transformer)
    with apply_tread(transformer, blocks, call, {"routes": [ROUTE]}, 0):
        hidden = torch.randn(1, 24, 64)
        rope = torch.zeros(1, 24, 1, 4, 2, 2)
        with pytest.raises(ValueError, match="sparse .*attention_type 'regular'"):
            blocks[2](hidden, torch.randn(1, 3, 64), torch.randn(1, 32), rope, {"to_fractal": False})
