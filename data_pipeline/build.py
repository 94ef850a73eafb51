"""`build`: sources -> families -> tokenizer -> mixture -> packed sequences -> Arrow shards + manifest."""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tqdm import tqdm

from data_pipeline.config import ConfigError, to_dict
from data_pipeline.languages import language_table
from data_pipeline.mixing import draw_documents, normalize_ratios
from data_pipeline.packing import pack_documents
from data_pipeline.shards import write_dataset
from data_pipeline.sources import SourceConfig, read_documents
from data_pipeline.tokenizer import load_tokenizer, special_ids, train_bpe


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096
    path: str | None = None  # an existing tokenizer.json or HF tokenizer folder; trained when unset
    sample_docs_per_family: int = 400


@dataclass
class BuildConfig:
    output_dir: str
    sources: list[SourceConfig]
    seq_len: int = 256
    total_tokens: int = 1_000_000  # training tokens in the mixture, drawn by `ratios`
    # family -> weight; empty = natural proportions; "from FILE": a YAML/JSON mapping, e.g. the one
    # `python -m training.scaling_laws optimal-mix` writes
    ratios: dict[str, float] | str = field(default_factory=dict)
    temperature: float | None = None  # with no ratios: sample families with p ~ tokens^(1/T)
    dedup: bool = True  # drop exact duplicate documents (by content hash)
    valid_docs_per_family: int = 20  # held out before mixing, packed into the `valid` split
    sequences_per_shard: int = 1024
    families_file: str | None = None
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seed: int = 0

    def __post_init__(self):
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.total_tokens <= 0 or self.sequences_per_shard <= 0:
            raise ConfigError("total_tokens and sequences_per_shard must be positive")


def read_ratios(ratios: dict[str, float] | str) -> dict[str, float]:
    if isinstance(ratios, dict):
        return ratios
    if not ratios.startswith("from "):
        raise ConfigError(f"ratios: {ratios!r} is neither a mapping nor 'from FILE'")
    path = Path(ratios[5:].strip())
    if not path.is_file():
        raise ConfigError(f"ratios: file {path} not found")
    loaded = yaml.safe_load(path.read_text())
    if not isinstance(loaded, dict) or not all(isinstance(v, (int, float)) for v in loaded.values()):
        raise ConfigError(f"ratios: {path} must map family names to numbers")
    return {str(k): float(v) for k, v in loaded.items()}


def build(config: BuildConfig) -> dict:
    out = Path(config.output_dir)
    table = language_table(config.families_file)
    docs_by_family: dict[str, list[str]] = defaultdict(list)
    seen: set[bytes] = set()
    duplicates = 0
    for source in config.sources:
        for doc in tqdm(read_documents(source, table), desc=f"read {source.paths[0]}", unit="doc", leave=False):
            if config.dedup:
                key = hashlib.blake2b(doc.text.encode(), digest_size=16).digest()
                if key in seen:
                    duplicates += 1
                    continue
                seen.add(key)
            docs_by_family[doc.family].append(doc.text)
    if not docs_by_family:
        raise ConfigError("sources: no documents found")
    families = sorted(docs_by_family)

    rng = random.Random(config.seed)
    valid_texts, train_texts = {}, {}
    for family in families:
        texts = docs_by_family[family][:]
        rng.shuffle(texts)
        held = min(config.valid_docs_per_family, len(texts) // 5)
        valid_texts[family], train_texts[family] = texts[:held], texts[held:]

    if config.tokenizer.path:
        tokenizer = load_tokenizer(config.tokenizer.path)
    else:
        sample = [t for f in families for t in train_texts[f][: config.tokenizer.sample_docs_per_family]]
        tokenizer = train_bpe(sample, config.tokenizer.vocab_size)
    eos, pad = special_ids(tokenizer)

    def encode(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]

    train_tokens = {f: encode(train_texts[f]) for f in tqdm(families, desc="tokenize", unit="family")}
    ratios = normalize_ratios(
        read_ratios(config.ratios), {f: sum(len(d) + 1 for d in train_tokens[f]) for f in families}, config.temperature
    )
    mixture, draws = draw_documents(train_tokens, ratios, config.total_tokens, config.seed)
    family_index = {f: i for i, f in enumerate(families)}
    train = pack_documents([(family_index[f], d) for f, d in mixture], config.seq_len, eos, pad)
    valid_docs = [(family_index[f], d) for f in families for d in encode(valid_texts[f])]
    valid = pack_documents(valid_docs, config.seq_len, eos, pad)

    stats = {
        d.family: {
            "ratio": round(d.ratio, 6),
            "available_tokens": d.available_tokens,
            "tokens": d.drawn_tokens,
            "documents": d.drawn_docs,
            "epochs": round(d.epochs, 4),
        }
        for d in draws
    }
    manifest = write_dataset(
        out,
        tokenizer,
        {"train": train, "valid": valid},
        families,
        config.sequences_per_shard,
        family_stats=stats,
        duplicates_removed=duplicates,
        config=to_dict(config),
    )
    return manifest
