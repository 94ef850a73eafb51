"""What a data build is asked to do (`BuildConfig`, loaded from YAML with dotted overrides) and the
checks that can run before a document is read."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from common.config import ConfigError, to_dict
from data_pipeline.engine import ENGINES
from data_pipeline.languages import family_of, language_hint, language_table
from data_pipeline.mixing import read_ratios
from data_pipeline.sources import SourceConfig

PACKINGS = ("concat", "best_fit")
SPEED_KNOBS = ("workers", "engine", "ray_address", "staging_dir", "batch_docs")  # where and how fast, not what


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096
    path: str | None = None  # an existing tokenizer.json or HF tokenizer folder; trained when unset
    # Training sample: every language the same characters (times its UTF-8 bytes per character), drawn
    # at random from every file (`data_pipeline.tokenizer_sample`); fewer when no language has as many.
    sample_chars_per_language: int = 1_000_000

    def __post_init__(self):
        for key in ("vocab_size", "sample_chars_per_language"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"tokenizer.{key} must be > 0, got {getattr(self, key)}")


@dataclass
class NearDedupConfig:
    """MinHash near-duplicate removal: a document whose Jaccard similarity of shingles (word
    `ngram`-grams, or characters for unspaced scripts) with an earlier kept one is at least
    `threshold` is dropped. LSH bands find candidates (a pair at the threshold with probability
    >= 0.95, `dedup.lsh_bands`), and each is checked exactly, so nothing below it is removed."""

    threshold: float = 0.8
    num_perm: int = 64
    ngram: int = 5


@dataclass
class BuildConfig:
    output_dir: str
    sources: list[SourceConfig]
    seq_len: int = 256
    total_tokens: int = 1_000_000  # training tokens in the mixture, drawn by `ratios`; 0: all available once
    # family -> weight; empty = natural proportions; "from FILE": a YAML/JSON mapping, e.g. the one
    # `python -m training.scaling_laws optimal-mix` writes
    ratios: dict[str, float] | str = field(default_factory=dict)
    temperature: float | None = None  # with no ratios: sample families with p ~ tokens^(1/T)
    dedup: bool = True  # drop exact duplicate documents (by content hash)
    near_dedup: NearDedupConfig | None = None
    packing: str = "concat"  # concat (cut documents at sequence ends, no padding) | best_fit (whole documents)
    valid_docs_per_family: int = 20  # held out before mixing (the store's `valid` split)
    # Also write the plan packed, as Arrow shards of `sequences_per_shard` rows (train, and valid per
    # family), for tools that read packed rows. Training reads the token store (`store/`) either way.
    shards: bool = False
    sequences_per_shard: int = 1024
    families_file: str | None = None
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    workers: int = 0  # processes (local engine); 0 = every core, 1 = in this process
    engine: str = "local"  # local (a process pool) | ray (tasks on a Ray cluster); same output either way
    ray_address: str | None = None  # engine ray: "auto", "HOST:PORT", or None for a Ray started here
    staging_dir: str | None = None  # output_dir on an object store: build here, then upload (default: temp)
    batch_docs: int = 1024  # documents per tokenizer call in a worker (and at most 4M characters: bounds its memory)
    seed: int = 0
    # No family is repeated more than this many times to meet its ratio (data-constrained scaling:
    # up to about 4 epochs is worth nearly as much as new data); its share then falls short, with a
    # warning. None: no cap.
    max_epochs: float | None = 4.0

    def __post_init__(self):
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.total_tokens < 0 or self.sequences_per_shard <= 0:
            raise ConfigError("total_tokens must be >= 0 and sequences_per_shard positive")
        if self.packing not in PACKINGS:
            raise ConfigError(f"packing {self.packing!r} is not one of {PACKINGS}")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine {self.engine!r} is not one of {ENGINES}")
        if self.ray_address and self.engine != "ray":
            raise ConfigError(f"ray_address {self.ray_address!r} is only used with engine: ray")
        if self.max_epochs is not None and self.max_epochs <= 0:
            raise ConfigError(f"max_epochs must be > 0 (or null for no cap), got {self.max_epochs}")
        if self.total_tokens == 0 and (self.ratios or self.temperature is not None):
            raise ConfigError(
                "total_tokens: 0 takes every token once, in the data's own proportions; "
                "ratios or temperature would resample it (set total_tokens to mix)"
            )


def check_config(config: BuildConfig) -> None:
    """What can be checked before a document is read: ratio families and source languages against the
    family table, with the nearest name for a misspelling."""
    table = language_table(config.families_file)
    known = sorted(set(table.values()))
    ratios = read_ratios(config.ratios)
    for family in ratios:
        if family not in known:
            near = difflib.get_close_matches(family, known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f" (families: {', '.join(known)})"
            raise ConfigError(f"ratios.{family}: no such language family{hint}")
    for i, source in enumerate(config.sources):
        if source.lang and source.lang != "auto":
            try:
                family_of(source.lang, table)
            except KeyError as err:
                raise ConfigError(f"sources[{i}].lang: {err.args[0]}{language_hint(source.lang, table)}") from None


def output_config(config: BuildConfig) -> dict:
    """The config without the knobs that change only where and how fast it runs (`SPEED_KNOBS`), as
    the manifest records it: the same build gives the same manifest on any engine and batch size."""
    return {k: v for k, v in to_dict(config).items() if k not in SPEED_KNOBS}
