"""Byte-level BPE tokenizer: trained on a sample of the corpus, or loaded from a local folder."""

from __future__ import annotations

import hashlib
import json
from itertools import chain, islice
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


def text_only(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer without its added tokens, for document text: a literal `<|endoftext|>`, `<|pad|>`
    or chat role in a document is encoded as the characters it is, never as the control token
    (tiktoken's `encode_ordinary` does the same), so both encoders give the same ids."""
    spec = json.loads(tokenizer.to_str())
    spec["added_tokens"] = []
    return Tokenizer.from_str(json.dumps(spec))


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """Content hash: the shards and the trainer must agree on it."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


def special_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    eos = tokenizer.token_to_id(EOS)
    pad = tokenizer.token_to_id(PAD)
    return eos, eos if pad is None else pad


# GPT-2's pre-tokenization pattern, which the ByteLevel pre-tokenizer (use_regex) applies.
BYTE_LEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _byte_alphabet() -> dict[str, int]:
    """The ByteLevel character that stands for each byte (GPT-2's printable remapping)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def fast_encoder(tokenizer: Tokenizer):
    """The same byte-level BPE as a tiktoken encoding behind a word cache (several times faster per
    core than `tokenizers`), or None when the tokenizer is not a plain byte-level BPE tiktoken can
    reproduce. Callers check a sample against `tokenizer` before trusting it (`encode_batch` below)."""
    spec = json.loads(tokenizer.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    plain = (
        model.get("type") == "BPE"
        and not model.get("dropout")
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
        and not model.get("byte_fallback")
        and spec.get("normalizer") is None
        and pre == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    )
    if not plain:
        return None
    import tiktoken

    alphabet = _byte_alphabet()
    special = {t["content"] for t in spec.get("added_tokens", [])}
    try:
        ranks = {bytes(alphabet[c] for c in token): i for token, i in model["vocab"].items() if token not in special}
        encoding = tiktoken.Encoding("bpe", pat_str=BYTE_LEVEL_PATTERN, mergeable_ranks=ranks, special_tokens={})
    except (KeyError, ValueError):  # a token outside the byte alphabet, or ranks tiktoken refuses
        return None
    return WordCachedEncoder(encoding.encode_ordinary)


class _WordCache(dict):
    """word -> the ids of `prefix + word`, encoded on a miss; full, it stops adding (as the BPE
    cache of `tokenizers` does): the words seen first are mostly the frequent ones."""

    def __init__(self, encode, prefix: str, capacity: int):
        super().__init__()
        self.encode, self.prefix, self.capacity = encode, prefix, capacity

    def __missing__(self, word: str) -> tuple[int, ...]:
        ids = tuple(self.encode(self.prefix + word))
        if len(self) < self.capacity:
            self[word] = ids
        return ids


class WordCachedEncoder:
    """`encode` (a byte-level BPE's encode_ordinary under the GPT-2 pattern) with a cache of words.

    The pattern's pieces never cross a single space or newline that stands between two characters
    that are not whitespace: no piece holds whitespace after other characters, a space joins the
    word after it (` ?\\p{L}+`, ...), and an isolated newline is a piece of its own (`\\s+(?!\\S)`
    fails before a non-space, `\\s+` takes it alone). So a text whose lines are words separated by
    single spaces encodes as its words' ids laid end to end: each line's first word, then " word"
    for every further one, and "\\n" between lines. Most prose is such text; ~1.5x faster than
    `encode` on it (a dict lookup per word instead of the regex and merges). Any other text
    (tabs, runs of spaces, blank lines, non-printable characters) is encoded whole: exact either way.
    """

    def __init__(self, encode, capacity: int = 1 << 16):
        self.encode = encode
        self._first = _WordCache(encode, "", capacity)
        self._spaced = _WordCache(encode, " ", capacity)
        self._newline = tuple(encode("\n"))

    def encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, line in enumerate(text.split("\n")):
            # printable: no whitespace but " " (the others are control or separator characters)
            if not (line.isprintable() and line and "  " not in line and " " not in (line[0], line[-1])):
                return self.encode(text)
            words = line.split(" ")
            if i:
                ids += self._newline
            ids += self._first[words[0]]
            ids.extend(chain.from_iterable(map(self._spaced.__getitem__, islice(words, 1, None))))
        return ids


def encode_batch(tokenizer: Tokenizer, fast, texts: list[str], check: bool = True) -> tuple[list[list[int]], bool]:
    """Token ids of `texts`, by `fast` when given and (with `check`) it agrees with `tokenizer` on the
    batch's first text. Returns the ids and False when it disagreed (the caller should stop using it)."""
    if fast is not None and texts:
        # A loop, not encode_ordinary_batch: with one thread its pool costs ~20% of the encoding.
        ids = [fast.encode_ordinary(text) for text in texts]
        if not check or ids[0] == tokenizer.encode(texts[0], add_special_tokens=False).ids:
            return ids, True
    return [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)], fast is None
