import pytest
import torch
from PIL import Image

from difftune.testing.tokenizers import clip_tokenizer
from difftune.validation.clip_score import ClipScorer, clip_score_from_embeddings


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIPModel saved with CLIP's tokenizer and a PIL image processor config."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    path = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(path)
    clip_tokenizer(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        path
    )
    return path


def _images() -> list[Image.Image]:
    generator = torch.Generator().manual_seed(1)
    arrays = [(torch.rand(40, 48, 3, generator=generator) * 255).to(torch.uint8).numpy() for _ in range(2)]
    return [Image.fromarray(a) for a in arrays]


def test_scores_are_in_range_deterministic_and_pairwise(tiny_clip, tmp_path):
    scorer = ClipScorer(tiny_clip)
    first_image, second_image = _images()
    prompts = ["a red square", "a photo of a cat"]
    first = scorer.score([first_image, second_image], prompts)
    assert len(first) == 2 and all(0.0 <= s <= 100.0 for s in first)
    assert scorer.score([first_image, second_image], prompts) == first
    # each pair is scored on its own: the same pair alone or from a file gives the same number
    first_image.save(tmp_path / "first.png")
    alone = scorer.score([tmp_path / "first.png"], ["a red square"])[0]
    assert alone == pytest.approx(first[0], abs=1e-3)
    assert scorer.score([], []) == []


def test_score_matches_the_models_own_embeddings(tiny_clip):
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    scorer = ClipScorer(tiny_clip)
    images, prompts = _images(), ["a dog", "a long prompt " * 40]  # the second is truncated to 77 tokens
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    pixels = CLIPImageProcessorPil.from_pretrained(tiny_clip)(images=images, return_tensors="pt")[
        "pixel_values"
    ]
    tokens = CLIPTokenizer.from_pretrained(tiny_clip)(
        prompts, padding=True, truncation=True, max_length=77, return_tensors="pt"
    )
    with torch.no_grad():
        outputs = model(pixel_values=pixels, **tokens)
    cosine = (outputs.image_embeds * outputs.text_embeds).sum(-1)
    expected = (100 * cosine).clamp_min(0).tolist()
    assert scorer.score(images, prompts) == pytest.approx(expected, abs=1e-4)


def test_cosine_math_with_known_embeddings():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    text = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, -1.0], [4.0, 3.0]])
    scores = clip_score_from_embeddings(image, text)
    assert scores == pytest.approx([100.0, 0.0, 0.0, 96.0])  # 24/25 for the last pair
    # the matching pair scores higher than a mismatched one
    assert (
        clip_score_from_embeddings(image[:1], text[:1])[0]
        > clip_score_from_embeddings(image[:1], text[3:])[0]
    )


def test_errors_name_the_problem(tiny_clip, tmp_path):
    scorer = ClipScorer(tiny_clip)
    with pytest.raises(ValueError, match="one prompt per image: got 1 images and 2 prompts"):
        scorer.score(_images()[:1], ["a", "b"])
    with pytest.raises(OSError, match="cannot load the CLIP model"):
        ClipScorer(tmp_path / "no-such-model")
