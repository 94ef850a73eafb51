"""Byte-level BPE tokenizer: trained on a sample of the corpus, or loaded from a local folder."""

from __future__ import annotations

import hashlib
import json
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from data_pipeline import arrow

EOS = "<|endoftext|>"
PAD = "<|pad|>"
# The chat template's role headers and end of turn (`training.posttrain.chat`): one id each, so a
# turn ends on one token and an exported model's generation stops on it. In documents they are text.
CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
TOKENIZER_FILE = "tokenizer.json"
# GPT-2's pre-tokenization pattern, which the ByteLevel pre-tokenizer (use_regex) applies: it cuts a
# word at every combining mark (category M: the vowel signs of Devanagari, Bengali, Tamil, ...), so
# no merge can span a syllable of those scripts. Tokenizers that loaded it keep it.
BYTE_LEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The same with marks part of a word, what the build trains with: on held-out parallel text the
# Indic scripts' token premium over English falls from 1.8-2.5x to 1.3-1.5x (docs/benchmarks.md).
PRETOKENIZE_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[\p{L}\p{M}]+| ?\p{N}+| ?[^\s\p{L}\p{M}\p{N}]+|\s+(?!\S)|\s+"""


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD, *CHAT_MARKERS],
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


def tokenizer_spec(tokenizer: Tokenizer | dict) -> dict:
    """The tokenizer's JSON as a dict (given one, as is: a worker parses its file once for both
    `text_only` and `fast_encoder`)."""
    return tokenizer if isinstance(tokenizer, dict) else json.loads(tokenizer.to_str())


def text_only(tokenizer: Tokenizer | dict) -> Tokenizer:
    """The tokenizer without its added tokens, for document text: a literal `<|endoftext|>`, `<|pad|>`
    or chat role in a document is encoded as the characters it is, never as the control token
    (tiktoken's `encode_ordinary` does the same), so both encoders give the same ids."""
    return Tokenizer.from_str(json.dumps({**tokenizer_spec(tokenizer), "added_tokens": []}))


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """Content hash: the shards and the trainer must agree on it."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


def special_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    eos = tokenizer.token_to_id(EOS)
    pad = tokenizer.token_to_id(PAD)
    return eos, eos if pad is None else pad


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


def fast_encoder(tokenizer: Tokenizer | dict):
    """The same byte-level BPE as a tiktoken encoding behind a word cache (several times faster per
    core than `tokenizers`), or None when the tokenizer is not a plain byte-level BPE tiktoken can
    reproduce. Callers check a sample against `tokenizer` before trusting it (`encode_batch` below)."""
    spec = tokenizer_spec(tokenizer)
    model = spec.get("model") or {}
    pattern = _pretokenize_pattern(spec.get("pre_tokenizer") or {})
    plain = (
        model.get("type") == "BPE"
        and not model.get("dropout")
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
        and not model.get("byte_fallback")
        and spec.get("normalizer") is None
        and pattern is not None
    )
    if not plain:
        return None
    import tiktoken

    alphabet = _byte_alphabet()
    special = {t["content"] for t in spec.get("added_tokens", [])}
    try:
        ranks = {bytes(alphabet[c] for c in token): i for token, i in model["vocab"].items() if token not in special}
        encoding = tiktoken.Encoding("bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    except (KeyError, ValueError):  # a token outside the byte alphabet, or ranks tiktoken refuses
        return None
    return WordCachedEncoder(encoding.encode_ordinary)


def _pretokenize_pattern(pre: dict) -> str | None:
    """The pattern of a byte-level pre-tokenizer whose pieces never cross the space before a word
    (what `WordCachedEncoder` relies on): GPT-2's, or the build's own; None for any other."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
    if pre == {**byte_level, "use_regex": True}:
        return BYTE_LEVEL_PATTERN
    split = {"type": "Split", "pattern": {"Regex": PRETOKENIZE_PATTERN}, "behavior": "Isolated", "invert": False}
    if pre == {"type": "Sequence", "pretokenizers": [split, {**byte_level, "use_regex": False}]}:
        return PRETOKENIZE_PATTERN
    return None


class _WordCache(dict):
    """word (with its leading space, where it has one) -> its entry in the encoder's table of pieces,
    encoded on a miss; once the encoder is full, a new word gets an entry for the current batch only
    (as the BPE cache of `tokenizers` stops adding: the words seen first are mostly the frequent ones)."""

    def __init__(self, encoder: WordCachedEncoder):
        super().__init__()
        self.encoder = encoder

    def __missing__(self, word: str) -> int:
        entry = self.encoder._entry(self.encoder.encode(word), cached=len(self) < self.encoder.capacity)
        if entry >= 0:
            self[word] = entry
        return entry


# A space followed by whitespace as the GPT-2 pattern's `\s` sees it (Unicode White_Space), or by
# the end of the text: where a text's pieces can cross the boundary of its words (`WordCachedEncoder`).
SPACE_BEFORE_WHITESPACE = " (?:[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]|$)"


class WordCachedEncoder:
    """`encode` (a byte-level BPE's encode_ordinary under the GPT-2 pattern, or the build's with
    combining marks inside words: letters below stand for letters and marks) with a cache of words.

    Cut a text before every space into words (" word"; the first has no space). Where every space
    is followed by a character that is not whitespace, no piece of the pattern crosses a cut: such a
    space starts the piece after it (` ?\\p{L}+`, ` ?\\p{N}+`, ` ?[^\\s\\p{L}\\p{N}]+`); a piece before it
    cannot hold it (letters, digits and other characters stop at whitespace), and a run of whitespace
    before it (a newline, say) leaves it out (`\\s+(?!\\S)`), as that run ends the word's own text. So
    the text encodes as its words' ids laid end to end, each word encoded on its own: once per
    distinct word, then a dict lookup. A text with a space before whitespace (a run of spaces,
    indentation, a space before a newline) or at its end is encoded whole: exact either way.

    A batch is one UTF-8 buffer: numpy finds the cuts, Arrow the distinct words and the texts to
    encode whole, so Python runs once per distinct word, not per word; one gather from the flat
    table of the cached words' ids gives the ids as the one int32 array the caller stores (~1.8x
    faster than `encode` on prose, multi-paragraph text included).
    """

    def __init__(self, encode, capacity: int = 1 << 16):
        self.encode, self.capacity = encode, capacity  # capacity: cached words
        self._cache = _WordCache(self)
        self._pieces: list[list[int]] = []  # entry (>= 0) -> ids; entries < 0: the batch's `_uncached`
        self._uncached: list[list[int]] = []
        self._ids, self._starts, self._lengths = np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64)

    def _entry(self, ids: list[int], cached: bool) -> int:
        if cached:
            self._pieces.append(ids)
            return len(self._pieces) - 1
        self._uncached.append(ids)
        return -len(self._uncached)

    def encode_ordinary(self, text: str) -> list[int]:
        return self.encode_texts([text])[0].tolist()

    def encode_texts(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The ids of `texts` end to end (int32) and each text's count of them."""
        import pyarrow.compute as pc  # here: importing it costs every user of this module 0.05-0.15 s

        self._uncached = []
        encoded, whole = [], np.zeros(len(texts), bool)
        for t, text in enumerate(texts):
            try:
                encoded.append(text.encode())
            except UnicodeEncodeError:  # a lone surrogate (`encode` replaces it): no UTF-8 to cut
                encoded.append(b"")
                whole[t] = True
        buffer = pa.py_buffer(b"".join(encoded))
        offsets = np.zeros(len(texts) + 1, np.int64)
        np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)), out=offsets[1:])
        batch = pa.LargeStringArray.from_buffers(len(texts), pa.py_buffer(offsets), buffer)
        whole |= np.array(pc.match_substring_regex(batch, SPACE_BEFORE_WHITESPACE).to_pylist(), bool)
        whole |= offsets[1:] == offsets[:-1]  # empty
        cut = np.frombuffer(buffer, np.uint8) == ord(" ")
        cut[offsets[:-1][offsets[1:] > offsets[:-1]]] = True  # every text's start
        starts = np.flatnonzero(cut)
        words = pa.LargeStringArray.from_buffers(len(starts), pa.py_buffer(np.append(starts, len(buffer))), buffer)
        counts = np.diff(np.searchsorted(starts, offsets))  # words per text
        distinct = pc.dictionary_encode(words)
        index = arrow.to_numpy(distinct.indices)[np.repeat(~whole, counts)]  # the words of the texts cut
        used = np.zeros(len(distinct.dictionary), bool)
        used[index] = True
        table = np.zeros(len(used), np.int64)
        keys, values = np.flatnonzero(used), distinct.dictionary.to_pylist()
        table[keys] = np.fromiter((self._cache[values[k]] for k in keys.tolist()), np.int64, len(keys))
        entries = table[index]
        if whole.any():  # one entry each, where the text is
            cut_counts = np.where(whole, 0, counts)
            before = np.cumsum(cut_counts) - cut_counts
            ids = [self._entry(self.encode(texts[t]), cached=False) for t in np.flatnonzero(whole).tolist()]
            entries = np.insert(entries, before[whole], ids)
        return self._gather(entries, np.where(whole, 1, counts))

    def _gather(self, entries: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(self._pieces) > len(self._lengths):  # words cached since the last batch: into the flat table
            new = self._pieces[len(self._lengths) :]
            self._ids, self._starts, self._lengths = _appended(self._ids, self._starts, self._lengths, new)
        ids, starts, lengths = self._ids, self._starts, self._lengths
        if self._uncached:  # after the table, for this batch only
            ids, starts, lengths = _appended(ids, starts, lengths, self._uncached)
            entries = np.where(entries < 0, len(self._lengths) - 1 - entries, entries)
        piece_lengths = lengths[entries]
        ends = np.cumsum(piece_lengths)
        total = int(ends[-1]) if len(ends) else 0
        shift = np.repeat(starts[entries] - (ends - piece_lengths), piece_lengths)  # table position - output position
        text_ends = ends[np.cumsum(counts) - 1] if len(ends) else np.zeros(len(counts), np.int64)
        return ids[np.arange(total) + shift], np.diff(text_ends, prepend=0)


def _flatten(encoded: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ids as one int32 array of them end to end and each list's length."""
    lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
    return np.fromiter(chain.from_iterable(encoded), np.int32, int(lengths.sum())), lengths


def _appended(ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray, pieces: list[list[int]]):
    """The flat table (`ids`, each entry's start and length) with `pieces` added as new entries."""
    new_ids, new_lengths = _flatten(pieces)
    new_starts = len(ids) + np.cumsum(new_lengths) - new_lengths
    return np.concatenate([ids, new_ids]), np.concatenate([starts, new_starts]), np.concatenate([lengths, new_lengths])


def encode_batch(
    tokenizer: Tokenizer, fast, texts: list[str], check: bool = True
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Token ids of `texts` end to end (int32) and each text's count, by `fast` when given and (with
    `check`) it agrees with `tokenizer` on the batch's first text; False when it disagreed (the
    caller should stop using it)."""
    if fast is not None and texts:
        ids, lengths = fast.encode_texts(texts)
        if not check or ids[: lengths[0]].tolist() == tokenizer.encode(texts[0], add_special_tokens=False).ids:
            return ids, lengths, True
    ids, lengths = _flatten([e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)])
    return ids, lengths, fast is None
