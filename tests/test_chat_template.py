"""Continue-training from an HF folder formats conversations with that folder's own tokenizer and
chat template: ids equal to `apply_chat_template`, loss on assistant turns only."""

from __future__ import annotations

import json

import pytest
import torch

from data_pipeline.build import BuildConfig, TokenizerConfig, build
from data_pipeline.loader import IGNORE_INDEX, PackedDataset
from data_pipeline.sources import SourceConfig
from training.posttrain.chat import HFChatTemplate
from training.posttrain.data import ReasoningDataConfig, build_reasoning_data

# Phi-4-mini-instruct's chat template (tokenizer_config.json): roles as special tokens, <|end|> after
# each turn, the generation prompt <|assistant|>, and the EOS after a finished conversation.
PHI4_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] "
    "is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + "
    "'<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>", "<|/tool|>"]
CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a careful tutor."},
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "12 + 30 = 42. The answer is 42."},
    ],
    [
        {"role": "user", "content": "Wie viel ist 7 mal 6?"},
        {"role": "assistant", "content": "7 * 6 = 42"},
        {"role": "user", "content": "Und 42 geteilt durch 7?"},
        {"role": "assistant", "content": "42 / 7 = 6. Die Antwort ist 6."},
    ],
]


@pytest.fixture(scope="module")
def phi4_style_folder(corpus_dir, tmp_path_factory):
    """A tokenizer folder laid out like Phi-4-mini's: byte-level BPE (trained here on the bundled corpus),
    the role tokens as special tokens, <|endoftext|> as EOS, and Phi-4-mini's chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for f in sorted(corpus_dir.glob("*.jsonl")) for line in f.open()][:3000]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIAL))
    folder = tmp_path_factory.mktemp("phi4-style") / "hf"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = PHI4_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def test_ids_equal_apply_chat_template_and_mask_is_the_assistant_turns(phi4_style_folder):
    template = HFChatTemplate(phi4_style_folder)
    tok = template.tokenizer
    for conversation in CONVERSATIONS:
        encoded = template.encode(conversation)
        expected = tok.apply_chat_template(conversation, tokenize=True, return_dict=False)
        assert encoded.ids == list(expected)
        masked = [i for i, m in zip(encoded.ids, encoded.loss_mask, strict=True) if m]
        turns = [m["content"] + "<|end|>" for m in conversation if m["role"] == "assistant"]
        assert tok.decode(masked) == "".join(turns)
        assert tok.convert_tokens_to_ids("<|assistant|>") not in masked, "role headers are not targets"


def test_sft_data_from_the_folders_tokenizer_and_template(phi4_style_folder, corpus_dir, tmp_path):
    base = tmp_path / "base"
    build(
        BuildConfig(
            output_dir=str(base),
            sources=[SourceConfig(paths=[str(corpus_dir / "*.jsonl")])],
            seq_len=128,
            total_tokens=20_000,
            valid_docs_per_family=2,
            tokenizer=TokenizerConfig(path=str(phi4_style_folder)),
        )
    )
    jsonl = tmp_path / "sft.jsonl"
    jsonl.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS * 10))
    out = tmp_path / "sft"
    build_reasoning_data(
        ReasoningDataConfig(
            kind="sft", output_dir=str(out), base_data=str(base), jsonl=str(jsonl), chat_template=str(phi4_style_folder)
        )
    )
    template = HFChatTemplate(phi4_style_folder)
    expected_targets = sum(sum(template.encode(c).loss_mask) for c in CONVERSATIONS * 10)
    data = {split: PackedDataset(out, split) for split in ("train", "valid")}
    targets = sum(int((d.get(torch.arange(len(d)).numpy()).labels != IGNORE_INDEX).sum()) for d in data.values())
    assert targets == expected_targets, "the targets are exactly the template's assistant tokens"


def test_a_template_whose_tokenizer_differs_from_the_dataset_is_refused(phi4_style_folder, small_dataset, tmp_path):
    with pytest.raises(ValueError, match="its tokenizer differs"):
        build_reasoning_data(
            ReasoningDataConfig(
                kind="sft",
                output_dir=str(tmp_path / "sft"),
                base_data=str(small_dataset),
                chat_template=str(phi4_style_folder),
            )
        )
