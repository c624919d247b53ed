"""CLIP's real BPE tokenizer, built offline from the vocabulary file that ships with open_clip.

The files written are the ones the Hub's CLIP tokenizer folders hold (vocab.json, merges.txt and the
tokenizer config), so the tokenizer gives the same ids as `openai/clip-vit-large-patch14`.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

CLIP_VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# The BPE file's first line is a header; CLIP uses the next 49152 - 256 - 2 merges.
NUM_MERGES = 49152 - 256 - 2


def _byte_characters() -> list[str]:
    """The 256 printable stand-ins of GPT-2 byte-level BPE, in CLIP's vocabulary order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def bpe_vocabulary_file() -> Path:
    """open_clip's BPE file, found without importing open_clip (its import pulls in torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        candidate = Path(folder) / BPE_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{BPE_FILE} not found (looked in the open_clip package: {locations or 'not installed'}); "
        "install it with `pip install open_clip_torch`"
    )


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's token -> id table (49408 entries) and its merge rules ("a b" lines)."""
    lines = gzip.open(bpe_vocabulary_file()).read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    bytes_ = _byte_characters()
    tokens = bytes_ + [b + "</w>" for b in bytes_] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    if len(tokens) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{bpe_vocabulary_file()}: expected {CLIP_VOCAB_SIZE} tokens, built {len(tokens)}")
    return {token: i for i, token in enumerate(tokens)}, merges


def write_clip_tokenizer_files(path: Path, pad_token: str = EOS) -> Path:
    """Write vocab.json, merges.txt and the tokenizer config of CLIP under `path` (no tokenizer.json:
    the same tokenizer, which transformers loads in a third of the time from the two files).

    SDXL's second tokenizer pads with "!" (id 0), its first with "<|endoftext|>"; `pad_token` picks.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(
        vocab=dict(vocab),
        merges=[tuple(m.split()) for m in merges],
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=pad_token,
        model_max_length=77,
    )
    tokenizer.save_pretrained(path)
    (path / "tokenizer.json").unlink()
    return path


def clip_tokenizer(path: Path, pad_token: str = EOS):
    """CLIP's tokenizer saved under `path` and loaded back with `CLIPTokenizer.from_pretrained`.

    "a photo of a cat" -> [49406, 320, 1125, 539, 320, 2368, 49407].
    """
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(Path(path), pad_token=pad_token)
    return CLIPTokenizer.from_pretrained(str(path))
