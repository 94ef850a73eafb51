"""An exported chat model works in transformers as it does here: the chat template it was trained
with in tokenizer_config.json, generation that stops at the end of a turn, the chat markers one
token each; transformers' `generate` with default settings equals ours token for token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.tokenizer import CHAT_MARKERS, EOS, PAD, train_bpe
from training.export import save_tokenizer
from training.models.hf import export_hf
from training.models.phi import PhiConfig, PhiModel
from training.posttrain.chat import END, PhiChat
from training.posttrain.generate import generate

REAL = Path(__file__).parent / "fixtures" / "real_text"
MAX_NEW = 48


def conversations() -> list[tuple[dict, dict]]:
    """Five question / answer pairs cut from real German, Greek, Japanese, Russian and Turkish text."""
    pairs = []
    for lang in ("de", "el", "ja", "ru", "tr"):
        text = json.loads((REAL / f"{lang}.jsonl").open(encoding="utf-8").readline())["text"]
        pairs.append(
            ({"role": "user", "content": text[:40].strip()}, {"role": "assistant", "content": text[40:60].strip()})
        )
    return pairs


def memorised_model(chat: PhiChat, vocab: int) -> PhiModel:
    """A tiny model trained until it answers each question as the pairs do, then ends the turn."""
    torch.manual_seed(0)
    config = PhiConfig(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=128)
    model = PhiModel(config)
    encoded = [chat.encode([user, answer]) for user, answer in conversations()]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss = 0.0
        for e in encoded:
            tokens = torch.tensor([e.ids])
            labels = torch.tensor([[i if m else -100 for i, m in zip(e.ids[1:], e.loss_mask[1:], strict=True)]])
            loss = loss + F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), labels.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.slow  # a minute of memorising; test_chat_template keeps the template ids in the default suite
def test_transformers_generate_on_the_export_equals_ours_stop_included(tmp_path):
    from transformers import AutoTokenizer, Phi3ForCausalLM

    texts = [json.loads(line)["text"] for f in sorted(REAL.glob("*.jsonl")) for line in f.open(encoding="utf-8")]
    tokenizer = train_bpe(texts, 600)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    chat = PhiChat(tokenizer)
    for marker in (EOS, PAD, *CHAT_MARKERS):  # one id each
        assert tokenizer.encode(marker, add_special_tokens=False).ids == [tokenizer.token_to_id(marker)]
    model = memorised_model(chat, tokenizer.get_vocab_size())
    users = [[user] for user, _ in conversations()]
    ours = generate(model, [chat.prompt(m) for m in users], MAX_NEW, stop=[chat.turn_end()])

    out = tmp_path / "hf"
    export_hf(model.state_dict(), model.config, out, lambda folder: save_tokenizer(tmp_path / "tokenizer.json", folder))
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    end, eos = tokenizer.token_to_id(END), tokenizer.token_to_id(EOS)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [end, eos]
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == eos

    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    hf_model = Phi3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    stopped = 0
    for messages, completion in zip(users, ours, strict=True):
        prompt = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = hf_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert ids == chat.prompt(messages)
        with torch.no_grad():
            theirs = hf_model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW)[0, len(ids) :].tolist()
        if len(completion) < MAX_NEW:  # ours stopped: transformers stops at the same place, on <|end|>
            stopped += 1
            assert theirs == [*completion, end]
        else:
            assert theirs == completion
    assert stopped == len(users)
    answers = [hf_tokenizer.decode(t, skip_special_tokens=True) for t in ours]
    assert answers == [answer["content"] for _, answer in conversations()]
