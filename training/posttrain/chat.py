"""Chat template and tokenisation of conversations, with a loss mask that trains on assistant turns only.

Phi-style template: `<|system|>...<|end|>`, `<|user|>...<|end|>`, `<|assistant|>...<|end|>`, each
followed by a newline (the markers are special tokens of the build's tokenizer, one id each; the same
template in Jinja, `PHI_CHAT_TEMPLATE`, goes into an exported HF folder); or, for a model imported
from an HF folder, that folder's own chat template (`HFChatTemplate`). Both give `encode`
(training), `prompt` (generation) and `turn_end` (where generation stops), so evaluation and
rollouts format exactly as training did. The mask covers an assistant turn's content and its
`<|end|>` (the model must learn to stop), never the role header or other turns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from data_pipeline.tokenizer import CHAT_MARKERS, text_only

ROLES = ("system", "user", "assistant")
END = CHAT_MARKERS[-1]
# `render` below as an HF chat template: `apply_chat_template` gives the same text, and with the
# markers as special tokens the same ids as `PhiChat` for content that starts with a non-space.
PHI_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass
class Encoded:
    ids: list[int]
    loss_mask: list[bool]  # True where the token is a training target


def render(messages: list[dict[str, str]]) -> list[tuple[str, bool, bool]]:
    """Text pieces of the conversation: (text, trained on, written by the user rather than the template)."""
    pieces = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES or not isinstance(content, str):
            raise ValueError(f"message {i}: needs role in {ROLES} and string content, got {message!r}")
        pieces.append((f"<|{role}|>\n", False, False))
        pieces.append((content, role == "assistant", True))
        pieces.append((END, role == "assistant", False))
        pieces.append(("\n", False, False))
    return pieces


def encode_conversation(tokenizer: Tokenizer, messages: list[dict[str, str]], text_tokenizer=None) -> Encoded:
    """Token ids and loss mask; pieces are encoded separately so the mask boundaries are exact.
    Message content goes through `text_tokenizer` (default `text_only(tokenizer)`), so a literal
    `<|end|>` or `<|user|>` in a message stays text and cannot end or open a turn."""
    text_tokenizer = text_tokenizer or text_only(tokenizer)
    ids, mask = [], []
    for text, trained, content in render(messages):
        piece = (text_tokenizer if content else tokenizer).encode(text, add_special_tokens=False).ids
        ids.extend(piece)
        mask.extend([trained] * len(piece))
    return Encoded(ids, mask)


class PhiChat:
    """The built-in template above, on a dataset's own tokenizer."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.text_tokenizer = tokenizer, text_only(tokenizer)

    def encode(self, messages: list[dict[str, str]]) -> Encoded:
        return encode_conversation(self.tokenizer, messages, self.text_tokenizer)

    def prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation followed by the assistant's header: what generation continues."""
        header = self.tokenizer.encode("<|assistant|>\n", add_special_tokens=False).ids
        return self.encode(messages).ids + header

    def turn_end(self) -> list[int]:
        return self.tokenizer.encode(END, add_special_tokens=False).ids


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


class HFChatTemplate:
    """Conversations formatted by an HF tokenizer folder's own chat template (Phi-4-mini's, say).

    The ids are exactly what `apply_chat_template` gives. The loss mask covers each assistant turn as
    the template renders it, from where the generation prompt ends to where the next turn would begin
    (the content and its end marker), found by rendering prefixes of the conversation; a token is a
    target when its whole character span lies inside such a turn, so neither a merge across the
    boundary nor a special token that only starts like the next turn's header can enter the mask."""

    PROBE = {"role": "user", "content": "\ue000"}  # a private-use character no template emits

    def __init__(self, folder: str | Path):
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{folder}: the tokenizer has no chat_template")

    def render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def assistant_spans(self, messages: list[dict[str, str]]) -> list[tuple[int, int]]:
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            start = len(self.render(messages[:i], generation_prompt=True))
            turn = self.render(messages[: i + 1])
            end = _common_prefix(turn, self.render([*messages[: i + 1], self.PROBE]))
            spans.append((start, end))
        return spans

    def prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """`apply_chat_template(..., add_generation_prompt=True)`: what generation continues."""
        return list(
            self.tokenizer(self.render(messages, generation_prompt=True), add_special_tokens=False)["input_ids"]
        )

    def turn_end(self) -> list[int]:
        """The tokens the template writes after an assistant's content to end the turn (Phi's `<|end|>`):
        those wholly between the content and where the next turn would begin."""
        marker = "\ue001"
        messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": marker}]
        (_, end), *_ = self.assistant_spans(messages)
        text = self.render(messages)
        after = text.index(marker) + len(marker)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [
            i
            for i, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
            if after <= a and b <= end
        ]

    def encode(self, messages: list[dict[str, str]]) -> Encoded:
        text = self.render(messages)
        spans = self.assistant_spans(messages)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = [any(s <= first and last <= e for s, e in spans) for first, last in encoded["offset_mapping"]]
        return Encoded(list(encoded["input_ids"]), mask)

    @staticmethod
    def present(folder: str | Path) -> bool:
        """Whether an HF folder ships a chat template (in tokenizer_config.json or its own file)."""
        config = Path(folder, "tokenizer_config.json")
        in_config = config.is_file() and bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
        return in_config or Path(folder, "chat_template.jinja").is_file()

    def check_vocabulary(self, tokenizer: Tokenizer, where: str) -> None:
        """The template's tokenizer must be the dataset's (same tokens, same ids)."""
        if self.tokenizer.get_vocab() != tokenizer.get_vocab(with_added_tokens=True):
            raise ValueError(
                f"chat_template {self.folder}: its tokenizer differs from {where}'s; build the base dataset with "
                f"tokenizer.path: {self.folder}"
            )


def chat_format(tokenizer: Tokenizer, template_folder: str | Path | None, where: str) -> PhiChat | HFChatTemplate:
    """An HF folder's own chat template when one is given (its tokenizer must be `where`'s), else the
    built-in one."""
    if template_folder is None:
        return PhiChat(tokenizer)
    template = HFChatTemplate(template_folder)
    template.check_vocabulary(tokenizer, where)
    return template
