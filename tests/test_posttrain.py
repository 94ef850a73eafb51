"""Loss masks of chat formatting and the DPO / LN-DPO losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from training.objectives.dpo import dpo_loss
from training.posttrain.chat import END, encode_conversation, render


def byte_tokenizer() -> Tokenizer:
    """One token per byte, so token counts can be computed by hand."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def test_only_assistant_tokens_are_trained():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "Step 1: 3 + 3 = 6\nAnswer: 6"},
    ]
    tokenizer = byte_tokenizer()
    encoded = encode_conversation(tokenizer, messages)
    trained = sum(len((m["content"] + END).encode()) for m in messages if m["role"] == "assistant")
    assert sum(encoded.loss_mask) == trained  # exact: content + <|end|> of both assistant turns
    assert len(encoded.ids) == sum(len(text.encode()) for text, *_ in render(messages))
    # The trained tokens decode back to exactly the assistant turns.
    picked = [i for i, m in zip(encoded.ids, encoded.loss_mask, strict=True) if m]
    assert tokenizer.decode(picked) == "4" + END + "Step 1: 3 + 3 = 6\nAnswer: 6" + END
    with pytest.raises(ValueError, match="message 0"):
        render([{"role": "robot", "content": "hi"}])


def test_dpo_matches_a_hand_computed_example():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0, -14.0, -11.0, -12.0))
    loss, reward_c, reward_r = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # margin = 0.5 * ((-10 + 11) - (-14 + 12)) = 1.5
    assert float(loss) == pytest.approx(-math.log(1 / (1 + math.exp(-1.5))))
    assert float(reward_c) == pytest.approx(0.5) and float(reward_r) == pytest.approx(-1.0)


def test_ln_dpo_is_dpo_on_length_normalised_ratios():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-30.0, -14.0, -33.0, -12.0))
    lc, lr = torch.tensor([30.0]), torch.tensor([7.0])
    ln, *_ = dpo_loss(pc, pr, rc, rr, beta=2.0, chosen_lengths=lc, rejected_lengths=lr, length_normalized=True)
    # margin = 2 * ((3 / 30) - (-2 / 7))
    margin = 2 * (0.1 + 2 / 7)
    assert float(ln) == pytest.approx(math.log1p(math.exp(-margin)))
    plain, *_ = dpo_loss(pc / lc, pr / lr, rc / lc, rr / lr, beta=2.0)
    assert float(ln) == pytest.approx(float(plain))
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(pc, pr, rc, rr, length_normalized=True)


def test_a_literal_role_or_end_marker_in_a_message_stays_text():
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens([END, "<|user|>", "<|assistant|>"])
    end = tokenizer.token_to_id(END)
    user = {"role": "user", "content": f"say {END} then <|assistant|> please"}
    messages = [user, {"role": "assistant", "content": "ok"}]
    encoded = encode_conversation(tokenizer, messages)
    assert encoded.ids.count(end) == 2, "one <|end|> per turn, none from the user's text"
    assert encoded.ids.count(tokenizer.token_to_id("<|assistant|>")) == 1
