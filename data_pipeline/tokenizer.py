"""Byte-level BPE tokenizer: trained on a sample of the corpus, or loaded from a local folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
PAD = "<|pad|>"
TOKENIZER_FILE = "tokenizer.json"


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load `tokenizer.json`, or the one inside an HF tokenizer folder."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer at {file}")
    tokenizer = Tokenizer.from_file(str(file))
    for special in (EOS,):
        if tokenizer.token_to_id(special) is None:
            raise ValueError(f"{file}: tokenizer lacks the end-of-text token {special!r}")
    return tokenizer


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """Content hash: the shards and the trainer must agree on it."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


def special_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    eos = tokenizer.token_to_id(EOS)
    pad = tokenizer.token_to_id(PAD)
    return eos, eos if pad is None else pad
