"""The project tokenizer (DESIGN.md "Tokenizer"): dataset words, 1024 location tokens, specials.

Built once by the dataset command from the train split's words with the `tokenizers` library
(a word-level model: the vocabulary is small and closed, so every word of the train split has
its own id) and saved as `tokenizer.json` beside the dataset statistics; it travels into every
checkpoint and export bundle. Location tokens `<loc0000>` ... `<loc1023>` follow PaliGemma: a
point is written as (y, x), each in 1024 bins of the image. A pretrained tokenizer is loaded
from a local path with `load_tokenizer` the same way.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import models, normalizers, pre_tokenizers

PAD, UNK, BOS, EOS, SEP = "<pad>", "<unk>", "<bos>", "<eos>", "<sep>"
SPECIALS = (PAD, UNK, BOS, EOS, SEP)  # ids 0..4; <pad> is 0 so padding is all zeros
NUM_LOCATION_BINS = 1024
LOCATION_TOKENS = tuple(f"<loc{i:04d}>" for i in range(NUM_LOCATION_BINS))  # ids 5..1028


def build_tokenizer(texts: Iterable[str]) -> tokenizers.Tokenizer:
    """A word-level tokenizer over the lower-cased words of `texts`, plus specials and locations."""
    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    pre = pre_tokenizers.Whitespace()  # words and punctuation runs
    words = set()
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + LOCATION_TOKENS + tuple(sorted(words)))}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.add_special_tokens(list(SPECIALS + LOCATION_TOKENS))  # matched whole, never split
    return tok


def save_tokenizer(tok: tokenizers.Tokenizer, path: pathlib.Path) -> None:
    tok.save(str(path))


def load_tokenizer(path: str | pathlib.Path) -> tokenizers.Tokenizer:
    """Loads a `tokenizer.json` (or a directory holding one), local or gs://; clear error if
    absent."""
    from etils import epath  # here, not at the top: the bundle runtime imports this module

    path = epath.Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}; the dataset command (`pewm data`) "
                                "writes tokenizer.json beside the dataset statistics")
    return tokenizers.Tokenizer.from_str(path.read_text())


def encode_batch(tok: tokenizers.Tokenizer, texts: Sequence[str], max_tokens: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(B, max_tokens) int32 ids, 0-padded and truncated, and the bool mask of real tokens."""
    ids = np.zeros((len(texts), max_tokens), np.int32)
    for i, enc in enumerate(tok.encode_batch(list(texts), add_special_tokens=False)):
        row = enc.ids[:max_tokens]
        ids[i, :len(row)] = row
    return ids, ids != 0


def location_tokens(xy: np.ndarray, image_size: int) -> str:
    """'<locY><locX>' for a pixel point (x, y) of an image_size frame (PaliGemma order)."""
    bins = np.clip(np.floor(np.asarray(xy) / image_size * NUM_LOCATION_BINS), 0,
                   NUM_LOCATION_BINS - 1).astype(int)
    return f"{LOCATION_TOKENS[bins[1]]}{LOCATION_TOKENS[bins[0]]}"
