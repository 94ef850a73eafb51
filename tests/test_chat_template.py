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


def phi4_mini_shaped_folder(tokenizer_folder, out):
    """A Phi-4-mini-shaped model (GQA, tied embeddings, partial RoPE 0.75, LongRoPE, a vocabulary
    padded past its tokenizer's) with random weights, saved with the folder's tokenizer and template."""
    from training.export import save_tokenizer
    from training.models.hf import export_hf
    from training.models.phi import LongRoPE, PhiConfig, PhiModel

    pairs = int(16 * 0.75) // 2
    config = PhiConfig(
        vocab_size=768, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=512,
        tie_embeddings=True, rope_fraction=0.75,
        longrope=LongRoPE([1.0] * pairs, [1.0 + i for i in range(pairs)], original_max_seq_len=64),
    )  # fmt: skip
    torch.manual_seed(0)
    export_hf(PhiModel(config).state_dict(), config, out)
    save_tokenizer(tokenizer_folder, out)
    return out


@pytest.mark.slow  # every stage, evaluation and the rerun: minutes
def test_continue_train_runs_every_stage_from_a_phi4_mini_shaped_folder(phi4_style_folder, corpus_dir, tmp_path):
    """`launch/continue_train.sh <HF folder>`: the base data in the folder's tokenizer, every stage's
    conversations, evaluation prompts and rollouts in its chat template, and every stage trains; run
    again, it redoes nothing that is complete."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from training.posttrain.evaluate import load_policy

    root = Path(__file__).resolve().parents[1]
    folder = phi4_mini_shaped_folder(phi4_style_folder, tmp_path / "phi4-mini-shaped")
    base_config = tmp_path / "base.yaml"
    base_config.write_text(
        json.dumps(
            {
                "sources": [{"paths": [str(corpus_dir / "*.jsonl")]}],
                "seq_len": 256,
                "total_tokens": 30_000,
                "valid_docs_per_family": 2,
            }
        )  # fmt: skip
    )
    out, runs = tmp_path / "out", tmp_path / "runs"
    single = (
        f"parallel.tp=1 parallel.pp=1 parallel.micro_batch_size=4 steps=2 log_every=1 out_dir={runs} "
        "data.global_batch_size=16 grpo.max_new_tokens=24"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "PYTHON": sys.executable,
        "LAUNCH": f"{sys.executable} -m training.pretrain",
        "OVERRIDES": single,
        "OUT": str(out),
        "BASE_DATA_CONFIG": str(base_config),
        "DATA_OVERRIDES": "generated.count=300",
        "EVAL_COUNT": "4",
        "ROLLOUTS": "40",
        "ROLLOUT_FLAGS": "--gold-fallback",
    }
    subprocess.run(["bash", str(root / "launch/continue_train.sh"), str(folder)], env=env, check=True)

    assert all((out / f"eval_{stage}.json").is_file() for stage in ("base", "cot", "sft", "dpo", "rl"))
    rl_metrics = [json.loads(line) for line in (runs / "reasoning-rl/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rl_metrics if "reward" in m] == [1, 2], "RL trains on its own scored rollouts"
    for stage in ("cot", "sft", "dpo"):
        manifest = json.loads((out / "data" / stage / "manifest.json").read_text())
        assert manifest["config"]["chat_template"] == str(folder)
        assert manifest["tokenizer_hash"] == json.loads((out / "data/base/manifest.json").read_text())["tokenizer_hash"]
    template = HFChatTemplate(folder)
    tok = template.tokenizer
    question = [{"role": "user", "content": "What is 12 + 30?"}]
    for trained in (str(folder), str(runs / "reasoning-sft/checkpoints"), str(runs / "reasoning-dpo/checkpoints")):
        policy = load_policy(trained)
        assert policy.chat.prompt(question) == list(
            tok.apply_chat_template(question, add_generation_prompt=True, return_dict=False)
        )
        assert policy.chat.turn_end() == [tok.convert_tokens_to_ids("<|end|>")]
    # Run again: every dataset, stage, evaluation and the rollouts are complete, so nothing is redone.
    evals = {p: p.stat().st_mtime_ns for p in out.glob("eval_*.json")}
    again = subprocess.run(["bash", str(root / "launch/continue_train.sh"), str(folder)], env=env, check=True,
                           capture_output=True, text=True).stdout  # fmt: skip
    assert "=== stage" in again and " (from " not in again, again
    assert again.count("skipped") == 4 and again.count("kept") == 3 + 5 + 1  # data, evaluations, rollouts
    assert {p: p.stat().st_mtime_ns for p in out.glob("eval_*.json")} == evals
