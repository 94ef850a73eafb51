"""Batched generation with a KV cache: greedy (evaluation) or sampled (rollouts for DPO pairs).

Runs on one process with the full model, or on every rank of a tensor-parallel group with the
model as training shards it (each rank caches its own KV heads; the vocab-sharded logits are
gathered for the choice, which every rank makes alike). Prompts are grouped by token length, so a
batch needs no padding and every row's positions (and its S2 blocks) are the same as in training.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.distributed.tensor import DTensor

from training.models.phi import KVCache, PhiModel


@torch.no_grad()
def generate(
    model: PhiModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop: list[list[int]],
    temperature: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
    reduce_s2: bool = True,
) -> list[list[int]]:
    """New tokens for each prompt, up to (not including) the first of the `stop` token sequences;
    greedy when `temperature` is 0, sampled otherwise. S2 layers cache only the key blocks their
    pattern lets a later token read (`reduce_s2`; the output is the same either way)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        if not 0 < len(prompt) < model.config.max_seq_len:
            raise ValueError(
                f"prompt {i} has {len(prompt)} tokens; it must have 1 to {model.config.max_seq_len - 1} "
                f"(model.max_seq_len {model.config.max_seq_len}, one position left to generate)"
            )
        by_length[len(prompt)].append(i)
    outputs: list[list[int]] = [[] for _ in prompts]
    for length, indices in sorted(by_length.items()):
        budget = min(max_new_tokens, model.config.max_seq_len - length)
        for start in range(0, len(indices), batch_size):
            rows = indices[start : start + batch_size]
            tokens = torch.tensor([prompts[i] for i in rows], device=device)
            new = _generate_batch(model, tokens, budget, stop, temperature, generator, reduce_s2)
            for row, completion in zip(rows, new, strict=True):
                outputs[row] = completion
    model.train(was_training)
    return outputs


def _crosses_longrope_switch(config, cached: int) -> bool:
    """The next token (at position `cached`) is the first whose forward needs LongRoPE's long factors."""
    return config.longrope is not None and cached == config.longrope.original_max_seq_len


def _last_logits(model, tokens, cache) -> torch.Tensor:
    """The last position's logits, whole (under tensor parallel they come sharded over the vocabulary)."""
    logits = model(tokens, cache=cache)[:, -1]
    return logits.full_tensor() if isinstance(logits, DTensor) else logits


def _generate_batch(model, tokens, budget, stop, temperature, generator, reduce_s2) -> list[list[int]]:
    cache = KVCache(model, tokens.shape[1] + budget, reduce_s2)
    logits = _last_logits(model, tokens, cache)
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    new_tokens = torch.empty(tokens.shape[0], 0, dtype=torch.long, device=tokens.device)
    ends = [budget] * tokens.shape[0]  # where each row's output stops
    for step in range(budget):
        if temperature > 0:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            next_token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            next_token = logits.argmax(-1)
        new_tokens = torch.cat([new_tokens, next_token[:, None]], dim=1)
        for sequence in stop:
            if step + 1 < len(sequence):
                continue
            hit = (new_tokens[:, -len(sequence) :] == new_tokens.new_tensor(sequence)).all(1) & ~done
            for row in hit.nonzero().flatten().tolist():
                ends[row] = step + 1 - len(sequence)
            done |= hit
        if done.all() or step == budget - 1:
            break
        if _crosses_longrope_switch(model.config, cache.length):
            # The cached keys were rotated with the short factors; from here on every position uses the
            # long ones, so recompute the whole sequence (what transformers does at the same step).
            cache = KVCache(model, tokens.shape[1] + budget, reduce_s2)
            logits = _last_logits(model, torch.cat([tokens, new_tokens], dim=1), cache)
        else:
            logits = _last_logits(model, next_token[:, None], cache)
    return [row[:end] for row, end in zip(new_tokens.tolist(), ends, strict=True)]
