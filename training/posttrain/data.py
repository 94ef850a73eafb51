"""Datasets of the three reasoning stages, in the pretraining shard format and the base model's tokenizer.

- `cot`: chain-of-thought text packed like pretraining, plus a share of replayed base sequences
  (so mid-training does not forget the base mixture);
- `sft`: conversations in the chat template, whole samples per sequence (best-fit) with document ids
  and a loss mask on the assistant turns;
- `dpo`: preference pairs as consecutive rows (chosen, rejected), one per row, loss mask on the response.

The data is the generator's verified math problems, or user JSONL: `{"text"}` (cot),
`{"messages"}` (sft), `{"prompt", "chosen", "rejected"}` (dpo; `prompt` a string or messages).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.config import ConfigError, to_dict
from common.files import atomic_write
from data_pipeline.mixed import MixConfig, MixedDataset
from data_pipeline.packing import PackedSequences, pack_best_fit, pack_bins, pack_documents
from data_pipeline.shards import read_manifest, write_dataset
from data_pipeline.synthetic.math_problems import MathProblem, generate_problems, question_fingerprints
from data_pipeline.tokenizer import load_tokenizer, special_ids, text_only
from training.posttrain.chat import chat_format

KINDS = ("cot", "sft", "dpo")
FAMILY = "synthetic"  # the base mixture's family of generated math, where reasoning data belongs


@dataclass
class GeneratedProblems:
    count: int = 2000
    seed: int = 1  # problem sets with different seeds never overlap (evaluation uses its own)
    max_steps: int = 3


@dataclass
class ReasoningDataConfig:
    kind: str  # cot | sft | dpo
    output_dir: str
    base_data: str = "data/default"  # the base model's dataset: tokenizer, seq_len, families, replay
    chat_template: str | None = None  # an HF tokenizer folder whose chat template formats conversations
    jsonl: str | None = None  # user data instead of generated problems
    generated: GeneratedProblems = field(default_factory=GeneratedProblems)
    replay_ratio: float = 0.0  # cot: share of the sequences replayed from the base training split
    valid_fraction: float = 0.05
    sequences_per_shard: int = 1024
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"kind {self.kind!r} is not one of {KINDS}")
        if not 0 < self.valid_fraction < 1:
            raise ConfigError(f"valid_fraction must be in (0, 1) (a valid split is needed), got {self.valid_fraction}")
        if not 0 <= self.replay_ratio < 1:
            raise ConfigError(f"replay_ratio must be in [0, 1), got {self.replay_ratio}")
        if self.replay_ratio and self.kind != "cot":
            raise ConfigError("replay_ratio applies to kind=cot only")


def chat_prompt(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def read_jsonl(path: str, required: tuple[str, ...]) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            missing = [key for key in required if key not in record]
            if missing:
                raise ConfigError(f"{path}:{number}: missing field(s) {missing}")
            records.append(record)
    if not records:
        raise ConfigError(f"{path}: no records")
    return records


def _problems(config: ReasoningDataConfig) -> list[MathProblem]:
    g = config.generated
    return generate_problems(g.count, g.seed, g.max_steps)


def cot_texts(config: ReasoningDataConfig) -> list[str]:
    if config.jsonl:
        return [r["text"] for r in read_jsonl(config.jsonl, ("text",))]
    return [p.text for p in _problems(config)]


def conversation_statement(turns: list[dict[str, str]]) -> str:
    """A conversation written as a problem: its user turns as the question, the rest as the solution
    (what `question_fingerprints` reads)."""
    question = " ".join(t["content"] for t in turns if t["role"] == "user")
    return f"Question: {question}\nSolution:\n" + "\n".join(t["content"] for t in turns if t["role"] != "user")


def sft_conversations(config: ReasoningDataConfig) -> list[list[dict[str, str]]]:
    if config.jsonl:
        return [r["messages"] for r in read_jsonl(config.jsonl, ("messages",))]
    return [chat_prompt(p.question) + [{"role": "assistant", "content": p.solution}] for p in _problems(config)]


def dpo_pairs(config: ReasoningDataConfig) -> list[tuple[list[dict[str, str]], str, str]]:
    if not config.jsonl:
        raise ConfigError("kind=dpo needs `jsonl` pairs (write them with `python -m training.posttrain rollouts`)")
    pairs = []
    for r in read_jsonl(config.jsonl, ("prompt", "chosen", "rejected")):
        prompt = chat_prompt(r["prompt"]) if isinstance(r["prompt"], str) else r["prompt"]
        pairs.append((prompt, r["chosen"], r["rejected"]))
    return pairs


def _split(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, valid), valid being `fraction` of the items (at least one when there are two or more)."""
    items = items[:]
    random.Random(seed).shuffle(items)
    held = max(int(len(items) * fraction), 1 if len(items) > 1 and fraction > 0 else 0)
    return items[held:], items[:held]


def replay_rows(base_data: str, count: int, seed: int) -> PackedSequences:
    """`count` sequences drawn without replacement (repeating once exhausted) from the base training
    split, as its pretraining read it (the token store with the build's own mix)."""
    base = MixedDataset(base_data, MixConfig(), "train")
    rng = np.random.default_rng(seed)
    rows = np.concatenate([rng.permutation(len(base)) for _ in range(-(-count // len(base)))])[:count]
    packed = base.sequences(np.sort(rows))
    return PackedSequences(tokens=packed.tokens, doc_ids=packed.doc_ids, family_ids=packed.family_ids.astype(np.int8))


def no_pair_fits(jsonl, split: str, pairs: list, lengths: list[int], seq_len: int, base_data: str) -> str:
    """Why a DPO dataset came out empty, and what to change."""
    if not pairs:
        return f"{jsonl}: no {split} pairs at all (the rollouts found none: see `posttrain rollouts`' stats)"
    shortest = min(lengths)
    return (
        f"{jsonl}: none of the {len(pairs)} {split} pairs fits in seq_len {seq_len} (the shortest needs {shortest} "
        f"tokens, the median {sorted(lengths)[len(lengths) // 2]}): responses that never end their turn run to the "
        "sampling budget, as an undertrained policy's do. Train the SFT stage longer, sample rollouts with "
        f"--gold-fallback, or use a base dataset with a longer seq_len (now {base_data}'s)"
    )


def build_reasoning_data(config: ReasoningDataConfig) -> dict:
    base = read_manifest(config.base_data)
    tokenizer = load_tokenizer(Path(config.base_data) / base["tokenizer_file"])
    seq_len, families = base["seq_len"], list(base["families"])
    if FAMILY not in families:
        families.append(FAMILY)
    family = families.index(FAMILY)
    eos, pad = special_ids(tokenizer)
    encode = chat_format(tokenizer, config.chat_template, config.base_data).encode
    stats: dict = {}
    split = (config.valid_fraction, config.seed)

    if config.kind == "cot":
        texts = cot_texts(config)
        statements = texts
        documents = [e.ids for e in text_only(tokenizer).encode_batch(texts, add_special_tokens=False)]
        train, valid = _split(documents, *split)
        cot = pack_documents([(family, d) for d in train], seq_len, eos, pad)
        replay = round(len(cot) * config.replay_ratio / (1 - config.replay_ratio))
        splits = {
            "train": PackedSequences.concatenate([cot, replay_rows(config.base_data, replay, config.seed)])
            if replay
            else cot,
            "valid": pack_documents([(family, d) for d in valid], seq_len, eos, pad),
        }
        stats = {"cot_sequences": len(cot), "replay_sequences": replay}
    elif config.kind == "sft":
        splits = {}
        every = sft_conversations(config)
        statements = [conversation_statement(c) for c in every]
        for name, conversations in zip(("train", "valid"), _split(every, *split), strict=True):
            encoded = [encode(c) for c in conversations]
            docs, masks = [(family, e.ids) for e in encoded], [e.loss_mask for e in encoded]
            splits[name] = pack_best_fit(docs, seq_len, eos, pad, masks)
            stats[f"{name}_conversations"] = len(conversations)
    else:
        splits = {}
        every = dpo_pairs(config)
        statements = [conversation_statement([*prompt, {"role": "assistant", "content": chosen}])
                      for prompt, chosen, _ in every]  # fmt: skip
        for name, pairs in zip(("train", "valid"), _split(every, *split), strict=True):
            encoded, longest = [], []
            for prompt, chosen, rejected in pairs:  # a cut response would compare the wrong thing
                both = [encode(prompt + [{"role": "assistant", "content": r}]) for r in (chosen, rejected)]
                longest.append(max(len(e.ids) for e in both))
                if all(len(e.ids) < seq_len for e in both):
                    encoded.extend(both)
            if not encoded:
                raise ConfigError(no_pair_fits(config.jsonl, name, pairs, longest, seq_len, config.base_data))
            docs, masks = [(family, e.ids) for e in encoded], [e.loss_mask for e in encoded]
            splits[name] = pack_bins(docs, seq_len, eos, pad, [[i] for i in range(len(docs))], masks)
            stats[f"{name}_pairs"] = len(encoded) // 2
            stats[f"{name}_pairs_too_long"] = len(pairs) - len(encoded) // 2
    stats["truncated_docs"] = {name: packed.truncated_docs for name, packed in splits.items()}
    keys = np.unique(np.array([k for text in statements for k in question_fingerprints(text)], np.uint64))
    manifest = write_dataset(
        config.output_dir,
        tokenizer,
        splits,
        families,
        config.sequences_per_shard,
        reasoning_stats=stats,
        config=to_dict(config),
    )
    atomic_write(Path(config.output_dir) / FINGERPRINTS, lambda tmp: _save_array(tmp, keys))
    return manifest


FINGERPRINTS = "question_fingerprints.npy"  # what evaluation checks its held-out problems against


def _save_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would add ".npy" to a temporary name
        np.save(f, array)
