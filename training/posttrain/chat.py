"""Chat template and tokenisation of conversations, with a loss mask that trains on assistant turns only.

Phi-style template: `<|system|>...<|end|>`, `<|user|>...<|end|>`, `<|assistant|>...<|end|>`, each
followed by a newline. The mask covers an assistant turn's content and its `<|end|>` (the model must
learn to stop), never the role header or other turns.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

ROLES = ("system", "user", "assistant")
END = "<|end|>"


@dataclass
class Encoded:
    ids: list[int]
    loss_mask: list[bool]  # True where the token is a training target


def render(messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """Text pieces of the conversation and whether each is trained on."""
    pieces = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES or not isinstance(content, str):
            raise ValueError(f"message {i}: needs role in {ROLES} and string content, got {message!r}")
        pieces.append((f"<|{role}|>\n", False))
        pieces.append((content + END, role == "assistant"))
        pieces.append(("\n", False))
    return pieces


def encode_conversation(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> Encoded:
    """Token ids and loss mask; pieces are encoded separately so the mask boundaries are exact."""
    ids, mask = [], []
    for text, trained in render(messages):
        piece = tokenizer.encode(text, add_special_tokens=False).ids
        ids.extend(piece)
        mask.extend([trained] * len(piece))
    return Encoded(ids, mask)
