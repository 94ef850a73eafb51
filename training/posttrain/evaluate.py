"""Verifier-checked math accuracy of greedy generations, and sampled rollouts turned into DPO pairs.

Prompts come in two formats: `plain` is how the base corpus writes a problem ("Question: ...
Solution:"), the fair format for a base model; `chat` is the template the SFT and DPO stages train on.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from common.files import atomic_write_text
from data_pipeline.shards import read_manifest
from data_pipeline.synthetic.math_problems import MathProblem, generate_problems, overlap, verify_solution
from data_pipeline.tokenizer import EOS, load_tokenizer
from training.model_setup import checkpoint_model_config, load_model_weights
from training.models.hf import import_hf
from training.models.phi import PhiModel
from training.posttrain.chat import HFChatTemplate, PhiChat, chat_format
from training.posttrain.data import FINGERPRINTS, chat_prompt
from training.posttrain.generate import generate

FORMATS = ("plain", "chat")


@dataclass
class Policy:
    model: PhiModel
    tokenizer: Tokenizer
    chat: PhiChat | HFChatTemplate | None = None  # how `chat` prompts are written; default the built-in
    data_path: str | None = None  # the dataset the model last trained on (None for an HF folder)

    def __post_init__(self):
        if self.chat is None:
            self.chat = PhiChat(self.tokenizer)


def load_policy(checkpoint: str, tokenizer: str | None = None, chat_template: str | None = None) -> Policy:
    """A run's checkpoint (or its `checkpoints/` folder) as a single-process model, with the tokenizer
    of the dataset it trained on; or an HF Phi3 folder with its own tokenizer. `tokenizer` overrides.
    Chat prompts use `chat_template` (an HF folder), else the template the model was trained with:
    an HF folder's own, or the one its dataset was built with (`chat_template` in its manifest)."""
    data_path = None
    if Path(checkpoint, "config.json").is_file():
        model_config, state = import_hf(checkpoint)
        tokenizer = tokenizer or checkpoint
        if chat_template is None and HFChatTemplate.present(checkpoint):
            chat_template = checkpoint
    else:
        found, model_config, run_config = checkpoint_model_config(checkpoint)
        state = load_model_weights(found, model_config)
        data_path = run_config["data"]["path"]
        tokenizer = tokenizer or data_path
        if chat_template is None:
            chat_template = read_manifest(data_path).get("config", {}).get("chat_template")
    model = PhiModel(model_config)
    model.load_state_dict(state)
    loaded = load_tokenizer(tokenizer)
    return Policy(model.eval(), loaded, chat_format(loaded, chat_template, tokenizer), data_path)


def prompt_ids(policy: Policy, question: str, fmt: str) -> list[int]:
    if fmt == "plain":
        return policy.tokenizer.encode(f"Question: {question}\nSolution:\n", add_special_tokens=False).ids
    if fmt == "chat":
        return policy.chat.prompt(chat_prompt(question))
    raise ValueError(f"prompt format {fmt!r} is not one of {FORMATS}")


def stop_sequences(policy: Policy, fmt: str) -> list[list[int]]:
    eos = policy.tokenizer.token_to_id(EOS)
    stops = [] if eos is None else [[eos]]
    turn_end = policy.chat.turn_end() if fmt == "chat" else []
    return stops + [turn_end] if turn_end else stops


def complete(
    policy: Policy,
    problems: list[MathProblem],
    fmt: str,
    max_new_tokens: int = 96,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[str]:
    prompts = [prompt_ids(policy, p.question, fmt) for p in problems]
    out = generate(policy.model, prompts, max_new_tokens, stop_sequences(policy, fmt), temperature, seed=seed)
    return [policy.tokenizer.decode(ids) for ids in out]


def training_fingerprints(data_paths: list[str]) -> dict[str, np.ndarray]:
    """The question fingerprints each dataset recorded when it was built (stage datasets do;
    others have none and are left out)."""
    found = {}
    for path in data_paths:
        file = Path(path) / FINGERPRINTS
        if file.is_file():
            found[path] = np.load(file)
    return found


def check_held_out(problems: list[MathProblem], training: dict[str, np.ndarray], seed: int) -> None:
    """Refuse to evaluate on problems a training set holds, saying how many and where."""
    for path, keys in training.items():
        seen = overlap(problems, keys)
        if seen:
            raise ValueError(
                f"{len(seen)} of {len(problems)} evaluation problems (seed {seed}) are in the training data {path} "
                f"(by question text or arithmetic chain), e.g. {seen[0].question!r}: an accuracy on them would not "
                "measure held-out skill; rebuild that data with generated problems (held out by construction) or "
                "remove these problems from it"
            )


def math_accuracy(policy: Policy, count: int, fmt: str, seed: int, max_steps: int = 3,
                  training: dict[str, np.ndarray] | None = None) -> dict:  # fmt: skip
    """Greedy accuracy on `count` held-out generated problems (arithmetic chains no training set
    holds: `math_problems.is_held_out`), checked by the verifier; first checked against the
    `training` datasets' question fingerprints (none may appear there)."""
    problems = generate_problems(count, seed, max_steps, held_out=True)
    check_held_out(problems, training or {}, seed)
    completions = complete(policy, problems, fmt)
    correct = [verify_solution(c, p.answer) for c, p in zip(completions, problems, strict=True)]
    return {
        "format": fmt,
        "problems": count,
        "seed": seed,
        "checked_against": sorted(training or {}),
        "accuracy": sum(correct) / count,
        "correct": [int(ok) for ok in correct],  # per problem: the report pairs stages problem by problem
        "answered": sum("Answer:" in c for c in completions) / count,
        "examples": [
            {"question": p.question, "completion": c, "answer": p.answer, "correct": ok}
            for p, c, ok in list(zip(problems, completions, correct, strict=True))[:5]
        ],
    }


def rollout_pairs(
    policy: Policy,
    count: int,
    samples: int,
    temperature: float,
    seed: int,
    gold_fallback: bool = False,
    max_steps: int = 3,
) -> tuple[list[dict], dict]:
    """DPO pairs from `samples` sampled chat completions per problem: one of the policy's own
    verified-correct completions against an incorrect one (on-policy, as rollout DPO does). With
    `gold_fallback`, problems it never solves pair the reference solution with a wrong completion."""
    problems = generate_problems(count, seed, max_steps)
    repeated = [p for p in problems for _ in range(samples)]
    completions = complete(policy, repeated, "chat", temperature=temperature, seed=seed)
    rng = random.Random(seed)
    pairs, solved = [], 0
    for i, problem in enumerate(problems):
        mine = completions[i * samples : (i + 1) * samples]
        verdicts = [verify_solution(c, problem.answer) for c in mine]
        right = [c for c, ok in zip(mine, verdicts, strict=True) if ok]
        wrong = [c for c, ok in zip(mine, verdicts, strict=True) if not ok]
        solved += bool(right)
        if wrong and (right or gold_fallback):
            chosen = rng.choice(right) if right else problem.solution
            pairs.append({"prompt": problem.question, "chosen": chosen, "rejected": rng.choice(wrong)})
    stats = {"problems": count, "samples": samples, "pairs": len(pairs), "solved_at_least_once": solved / count}
    return pairs, stats


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound near 0 and 1, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return centre - half, centre + half


def paired_difference(after: list[int], before: list[int], z: float = 1.96) -> tuple[float, float | None, float | None]:
    """Mean of after - before over the same problems and its 95% interval (normal, paired). When no
    problem changed its score there is no variation to estimate an interval from: (0, None, None),
    which reports say as "no variation", not as a zero-width interval."""
    if len(after) != len(before) or not after:
        raise ValueError(f"paired results need the same problems ({len(after)} vs {len(before)})")
    diffs = [a - b for a, b in zip(after, before, strict=True)]
    if not any(diffs):
        return 0.0, None, None
    n, mean = len(diffs), sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / max(n - 1, 1)
    half = z * (var / n) ** 0.5
    return mean, mean - half, mean + half


def stage_summary(results: list[dict]) -> list[dict]:
    """Per stage (in order of appearance), every evaluation of it pooled (several problem seeds):
    accuracy with its 95% interval, and the paired gain over the stage before on the same problems."""
    stages: dict[str, dict] = {}
    for r in results:
        entry = stages.setdefault(r["stage"], {"stage": r["stage"], "format": r["format"], "by_seed": {}})
        entry["by_seed"][(r.get("seed"), r["problems"])] = r.get("correct")
    rows, previous = [], None
    for entry in stages.values():
        correct = [c for per_seed in entry["by_seed"].values() if per_seed for c in per_seed]
        k, n = sum(correct), len(correct)
        low, high = wilson_interval(k, n)
        row = {"stage": entry["stage"], "format": entry["format"], "problems": n, "seeds": len(entry["by_seed"]),
               "accuracy": k / n if n else float("nan"), "low": low, "high": high}  # fmt: skip
        if previous is not None:
            shared = sorted(set(entry["by_seed"]) & set(previous["by_seed"]))
            after = [c for key in shared for c in entry["by_seed"][key] or []]
            before = [c for key in shared for c in previous["by_seed"][key] or []]
            if after and len(after) == len(before):
                row["gain"], row["gain_low"], row["gain_high"] = paired_difference(after, before)
        rows.append(row)
        previous = entry
    return rows
