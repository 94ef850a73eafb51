"""The reasoning stages: generation with a KV cache, stage datasets, DPO under every layout, end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import ConfigError
from data_pipeline.loader import IGNORE_INDEX, DataLoader, PackedDataset
from data_pipeline.packing import pack_documents
from data_pipeline.shards import write_dataset
from data_pipeline.synthetic.math_problems import generate_problems
from data_pipeline.tokenizer import load_tokenizer
from kernels.patterns import S2Pattern
from tests.distributed import run_ranks
from tests.test_parallel import GRAD_ATOL, GRAD_RTOL, LOSS_RTOL, grads_and_history, small_config
from training.models.phi import PhiConfig, PhiModel
from training.objectives import trainer_for
from training.objectives.dpo import DPOConfig
from training.posttrain.chat import encode_conversation
from training.posttrain.data import GeneratedProblems, ReasoningDataConfig, build_reasoning_data, chat_prompt
from training.posttrain.generate import generate

ROOT = Path(__file__).resolve().parents[1]
LONG_SEQ_LEN = 256


def tiny_model(**overrides) -> PhiModel:
    torch.manual_seed(0)
    config = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=96)
    return PhiModel(PhiConfig(**{**config, "attn_backend": "reference", **overrides}))


@pytest.mark.parametrize("s2", [None, S2Pattern(block_size=16, local_blocks=1, vert_stride=2)], ids=["dense", "s2"])
def test_cached_generation_equals_recomputing_the_whole_sequence(s2):
    model = tiny_model(s2=s2, dense_every=2)
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [3, 3], [5] * 20]
    out = generate(model, prompts, max_new_tokens=60, stop=[[63]])
    for prompt, new in zip(prompts, out, strict=True):
        sequence = list(prompt)
        with torch.no_grad():
            for _ in range(len(new)):
                sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
        assert sequence[len(prompt) :] == new
    if s2 is not None:  # past the local window the sparse layer must actually skip blocks
        tokens = torch.tensor([[5] * 20 + out[3]])
        with torch.no_grad():
            assert not torch.allclose(model(tokens), tiny_model()(tokens))


def test_a_reduced_s2_cache_generates_what_the_full_cache_does():
    """Each KV head of an S2 layer keeps only its strided blocks and the local window: greedy and
    sampled generations are the same tokens as with every position cached, in a fraction of the
    memory once past the window."""
    from training.models.phi import KVCache

    model = tiny_model(s2=S2Pattern(block_size=16, local_blocks=1, vert_stride=3), dense_every=2, max_seq_len=160)
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10] * 5]  # 5 + 70 and 25 + 70 tokens: past the window and a stride
    for temperature in (0.0, 1.0):
        want = generate(model, prompts, 70, stop=[], temperature=temperature, seed=3, reduce_s2=False)
        assert generate(model, prompts, 70, stop=[], temperature=temperature, seed=3) == want
    sparse = next(name for name, layer in model.layers.items() if layer.attention.s2 is not None)
    caches = {reduce: KVCache(model, 160, reduce) for reduce in (False, True)}
    with torch.no_grad():
        for cache in caches.values():
            model(torch.tensor([[1] * 150]), cache=cache)
    full, reduced = (caches[r].layers[sparse].bytes for r in (False, True))
    # 160 positions = 10 blocks: at most 4 in a head's shard, plus the local block and the one being filled.
    assert reduced == full * 6 // 10


def _generate_tensor_parallel(overrides: dict, prompts, sampled: bool):
    """Greedy or sampled completions from the model sharded over this process group as training shards it."""
    from torch.distributed.device_mesh import init_device_mesh

    from training.parallel.tensor import apply_tensor_parallel

    model = tiny_model(**overrides)  # the same weights on every rank, then sharded
    apply_tensor_parallel(model, init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))["tp"])
    greedy = generate(model, prompts, max_new_tokens=40, stop=[[63]])
    return greedy, generate(model, prompts, max_new_tokens=40, stop=[], temperature=1.0, seed=3) if sampled else None


def test_tensor_parallel_generation_equals_one_process_token_for_token():
    """Rollouts from the sharded policy (each rank caches its own KV heads, logits gathered for the
    choice): greedy and sampled completions equal one process's, with S2 layers and a sliding window."""
    overrides = dict(s2=S2Pattern(block_size=16, local_blocks=1, vert_stride=2), dense_every=2, sliding_window=24)
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [3, 3], [5] * 20]
    model = tiny_model(**overrides)
    want = generate(model, prompts, max_new_tokens=40, stop=[[63]])
    want_sampled = generate(model, prompts, max_new_tokens=40, stop=[], temperature=1.0, seed=3)
    assert max(map(len, want)) > 20, "completions long enough to pass the window and the local S2 block"
    for greedy, sampled in run_ranks(2, _generate_tensor_parallel, overrides, prompts, True):
        assert greedy == want
        assert sampled == want_sampled


def test_generation_stops_at_a_stop_sequence_and_excludes_it():
    model = tiny_model()
    with pytest.raises(ValueError, match="prompt 1 has 96 tokens; it must have 1 to 95"):
        generate(model, [[1], [2] * 96], max_new_tokens=4, stop=[])
    free = generate(model, [[1, 2, 3]], max_new_tokens=12, stop=[])[0]
    stop = free[4:6]
    first = next(i for i in range(len(free) - 1) if free[i : i + 2] == stop)
    assert generate(model, [[1, 2, 3]], max_new_tokens=12, stop=[stop])[0] == free[:first]


def sft_config(base: Path, out: Path, **overrides) -> ReasoningDataConfig:
    fields = dict(kind="sft", output_dir=str(out), base_data=str(base), generated=GeneratedProblems(40, seed=5))
    return ReasoningDataConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def long_base(small_dataset, tmp_path_factory):
    """The small dataset's tokens repacked at 256: its 32-token rows are too short for conversations."""
    base = tmp_path_factory.mktemp("long") / "base"
    manifest = json.loads((small_dataset / "manifest.json").read_text())
    batch = PackedDataset(small_dataset, "train").get(np.arange(64))
    stream = batch.tokens[batch.doc_ids >= 0].tolist()
    docs = [(0, stream[i : i + 50]) for i in range(0, len(stream), 50)]
    packed = pack_documents(docs, LONG_SEQ_LEN, manifest["eos_id"], manifest["pad_id"])
    write_dataset(base, load_tokenizer(small_dataset), {"train": packed, "valid": packed}, manifest["families"], 100)
    return base


def test_sft_samples_stay_whole_and_only_assistant_tokens_are_targets(long_base, tmp_path):
    tokenizer = load_tokenizer(long_base)
    config = sft_config(long_base, tmp_path / "sft", valid_fraction=0.1)
    built = build_reasoning_data(config)
    assert built["reasoning_stats"]["truncated_docs"] == {"train": 0, "valid": 0}
    problems = generate_problems(40, 5)
    encoded = [
        encode_conversation(tokenizer, chat_prompt(p.question) + [{"role": "assistant", "content": p.solution}])
        for p in problems
    ]
    dataset = {split: PackedDataset(tmp_path / "sft", split) for split in ("train", "valid")}
    batches = {split: d.get(np.arange(len(d))) for split, d in dataset.items()}
    # Every conversation is one whole document; the targets are exactly the assistant tokens.
    documents = sum(int((b.doc_ids.max(1).values + 1).sum()) for b in batches.values())
    assert documents == len(problems)
    targets = sum(int((b.labels != IGNORE_INDEX).sum()) for b in batches.values())
    assert targets == sum(sum(e.loss_mask) for e in encoded)
    for b in batches.values():  # a target never crosses into another document
        position = (b.labels != IGNORE_INDEX).nonzero()
        assert (b.doc_ids[position[:, 0], position[:, 1]] == b.doc_ids[position[:, 0], position[:, 1] + 1]).all()


def test_cot_replays_the_configured_share_of_base_sequences(small_dataset, tmp_path):
    config = sft_config(small_dataset, tmp_path / "cot", kind="cot", replay_ratio=0.25)
    built = build_reasoning_data(config)
    stats = built["reasoning_stats"]
    total = stats["cot_sequences"] + stats["replay_sequences"]
    assert stats["replay_sequences"] / total == pytest.approx(0.25, abs=0.02)
    train = PackedDataset(tmp_path / "cot", "train")
    families = train.get(np.arange(len(train))).family_ids
    synthetic = train.families.index("synthetic")
    # CoT rows are all `synthetic`; replayed rows carry the base mixture's families.
    assert len(set(families.unique().tolist()) - {-1, synthetic}) >= 5


def test_bad_stage_data_is_reported_by_file_and_line(small_dataset, tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n')
    config = sft_config(small_dataset, tmp_path / "dpo", kind="dpo", jsonl=str(bad))
    with pytest.raises(ConfigError, match=r"pairs.jsonl:2: missing field\(s\) \['rejected'\]"):
        build_reasoning_data(config)
    assert not (tmp_path / "dpo").exists() and not (tmp_path / "dpo.building").exists()
    with pytest.raises(ConfigError, match="replay_ratio applies to kind=cot"):
        sft_config(small_dataset, tmp_path / "x", replay_ratio=0.1)
    with pytest.raises(ConfigError, match=r"valid_fraction must be in \(0, 1\)"):
        sft_config(small_dataset, tmp_path / "x", valid_fraction=0.0)


@pytest.fixture(scope="module")
def dpo_dataset(long_base, tmp_path_factory):
    """Pairs of short answers, one response per row, in the tokenizer of the small dataset."""
    out = tmp_path_factory.mktemp("dpo")
    pairs = out / "pairs.jsonl"
    with open(pairs, "w") as f:
        for i in range(24):
            f.write(json.dumps({"prompt": f"{i} + 1?", "chosen": f"= {i + 1}", "rejected": f"= {i + 7} no"}) + "\n")
    config = ReasoningDataConfig(
        kind="dpo", output_dir=str(out / "data"), base_data=str(long_base), jsonl=str(pairs), valid_fraction=0.34
    )
    stats = build_reasoning_data(config)["reasoning_stats"]
    assert stats["train_pairs_too_long"] == stats["valid_pairs_too_long"] == 0
    return out / "data"


def dpo_config(data, out_dir, **layout):
    config = small_config(data, out_dir, **layout)
    model = dataclasses.replace(config.model, max_seq_len=LONG_SEQ_LEN)
    return dataclasses.replace(config, model=model, objective="dpo")


def _dpo_run(data, out_dir, layout):
    return grads_and_history(dpo_config(data, out_dir, **layout), dpo=DPOConfig(sft_weight=0.5))


def test_dpo_pairs_stay_together_in_batches_and_micro_batches(dpo_dataset):
    dataset = PackedDataset(dpo_dataset, "train")
    loader = DataLoader(dataset, global_batch_size=8, dp_rank=1, dp_size=2, seed=3, group_size=2)
    for step in range(3):
        rows = loader.batch_at(step).rows
        assert (rows[0::2] % 2 == 0).all() and (rows[1::2] == rows[0::2] + 1).all()


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(dict(tp=2), marks=pytest.mark.slow),  # DPO under one layout in the default suite: pp2
        dict(pp=2),
        pytest.param(dict(dp=2), marks=pytest.mark.slow),
        # per-sequence log-probs from the vocabulary split over DP (each replica keeps its own rows)
        pytest.param(dict(dp=2, dp_mode="fsdp", vocab_over_dp=True), marks=pytest.mark.slow),
    ],
    ids=["tp2", "pp2", "dp2", "dp2-fsdp-vocab"],
)
def test_dpo_layouts_match_single_process(dpo_dataset, tmp_path, layout):
    ref_grads, ref_history = run_ranks(1, _dpo_run, dpo_dataset, tmp_path / "single", {})[0]
    results = run_ranks(2, _dpo_run, dpo_dataset, tmp_path / "par", layout)
    grads = {k: v for r in results for k, v in r[0].items()}
    history = results[0][1] if layout.get("pp") is None else results[-1][1]
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=name)
    for ours, ref in zip(history, ref_history, strict=True):
        for key in ("loss", "reward_accuracy", "reward_margin", "val/loss", "val/reward_margin"):
            if key in ref:
                assert ours[key] == pytest.approx(ref[key], rel=LOSS_RTOL, abs=1e-6), key
    # Before any update the policy is the reference: DPO's term is log 2, plus the NLL term.
    assert ref_history[0]["loss"] == pytest.approx(np.log(2) + 0.5 * ref_history[0]["chosen_nll"], rel=1e-5)
    assert ref_history[-2]["reward_margin"] > 0  # three steps on the same pairs separate them


def test_ln_dpo_reference_is_the_initial_policy_even_when_resuming(dpo_dataset, tmp_path):
    from training.objectives.dpo import REFERENCE_FILE

    config = dpo_config(dpo_dataset, tmp_path)
    dpo = DPOConfig(sft_weight=0.0, length_normalized=True)
    config.checkpoint.resume = "auto"
    trainer = trainer_for(config, dpo=dpo)
    first = trainer.train_step(trainer.loader.batch_at(0))
    assert first["loss"] == pytest.approx(np.log(2), rel=1e-6)  # policy == reference at step 0
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    trainer.step = 1
    trainer.save()
    trainer.checkpointer.wait()
    recorded = trainer.objective.reference["train"].clone()
    (tmp_path / config.name / REFERENCE_FILE).unlink()  # recomputed from init weights, not the checkpoint
    resumed = trainer_for(config, dpo=dpo)
    resumed.maybe_resume()
    assert resumed.step == 1
    torch.testing.assert_close(resumed.objective.reference["train"], recorded)


@pytest.mark.slow
def test_reasoning_stages_improve_verifier_accuracy_over_the_base(tmp_path):
    """Pretrain a tiny model on the bundled corpus, then CoT -> SFT -> rollouts -> LN-DPO (launch script)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    python = sys.executable

    def run(*args, cwd=tmp_path):
        subprocess.run(args, cwd=cwd, env=env, check=True)

    run(python, "-m", "data_pipeline", "corpus", "data/corpus")
    run(python, "-m", "data_pipeline", "build", str(ROOT / "configs/data/default.yaml"))
    run(python, "-m", "training.pretrain", str(ROOT / "configs/pretrain/tiny.yaml"), "parallel.tp=1", "parallel.pp=1")
    for name in ("launch", "configs"):
        (tmp_path / name).symlink_to(ROOT / name)
    single = "parallel.tp=1 parallel.pp=1 parallel.micro_batch_size=16"
    stage_env = dict(PYTHON=python, LAUNCH=f"{python} -m training.pretrain", OVERRIDES=single, EVAL_COUNT="200")
    env.update(stage_env)
    run("bash", "launch/continue_train.sh", "runs/tiny/checkpoints")  # the script works from its folder's parent
    results = {s: json.loads((tmp_path / f"runs/reasoning/eval_{s}.json").read_text()) for s in ("base", "sft", "dpo")}
    # On problems held out by construction the default stages reach about 0.14 (docs/reasoning.md, 3,500
    # problems) from a base at 0.000; 0.05 is over 3 standard errors below that at 200 problems.
    assert results["sft"]["accuracy"] > results["base"]["accuracy"] + 0.05
    assert results["dpo"]["accuracy"] > results["base"]["accuracy"] + 0.05
    assert (tmp_path / "runs/reasoning/accuracy.png").stat().st_size > 0


def test_an_hf_folder_is_evaluated_like_the_model_it_was_exported_from(small_dataset, tmp_path):
    from training.export import save_tokenizer
    from training.models.hf import export_hf
    from training.posttrain.evaluate import Policy, complete, load_policy, math_accuracy

    torch.manual_seed(0)
    config = PhiConfig(vocab_size=512, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=256)
    model = PhiModel(config).eval()
    export_hf(
        model.state_dict(), config, tmp_path / "hf", lambda out: save_tokenizer(small_dataset / "tokenizer.json", out)
    )
    problems = generate_problems(4, seed=5)
    ours = complete(Policy(model, load_tokenizer(small_dataset)), problems, "chat", max_new_tokens=12)
    imported = load_policy(str(tmp_path / "hf"))
    assert complete(imported, problems, "chat", max_new_tokens=12) == ours
    result = math_accuracy(imported, 4, "plain", seed=99)
    assert result["problems"] == 4 and 0.0 <= result["accuracy"] <= 1.0


def test_transformers_greedy_generation_of_the_export_equals_ours_on_evaluation_prompts(small_dataset, tmp_path):
    """The exported folder in transformers' own `generate` (greedy) gives our tokens, one for one, on
    the evaluation's chat prompts, for a Phi-4-mini-like shape (GQA, tied embeddings, partial RoPE)."""
    from transformers import AutoModelForCausalLM

    from training.export import save_tokenizer
    from training.models.hf import export_hf
    from training.posttrain.evaluate import Policy, prompt_ids

    torch.manual_seed(0)
    config = PhiConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=256,
                       tie_embeddings=True, rope_fraction=0.75)  # fmt: skip
    model = PhiModel(config).eval()
    export_hf(
        model.state_dict(), config, tmp_path / "hf", lambda out: save_tokenizer(small_dataset / "tokenizer.json", out)
    )
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    policy = Policy(model, load_tokenizer(small_dataset))
    prompts = [prompt_ids(policy, p.question, "chat") for p in generate_problems(4, seed=5)]
    ours = generate(model, prompts, max_new_tokens=24, stop=[])
    for prompt, mine in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = theirs.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                                  pad_token_id=0, min_new_tokens=24)  # fmt: skip
        assert out[0, len(prompt) :].tolist() == mine


def test_evaluation_problems_are_held_out_of_every_training_set():
    """The default sizes and seeds of every set that trains on math problems (the corpus, CoT, SFT,
    rollouts, GRPO's first 600 steps) against seven evaluation sets of 500: no question in common,
    word for word or over the same arithmetic with other names and items."""
    import yaml

    from data_pipeline.synthetic.math_problems import is_held_out
    from training.objectives.grpo import GRPOConfig

    configs = ROOT / "configs" / "reasoning"
    training = generate_problems(600 * 2, seed=0)  # the default corpus: docs_per_language x 2
    for name in ("data_cot", "data_sft"):
        g = yaml.safe_load((configs / f"{name}.yaml").read_text())["generated"]
        training += generate_problems(g["count"], g["seed"], g["max_steps"])
    training += generate_problems(2000, seed=13)  # `posttrain rollouts` defaults
    rl = yaml.safe_load((configs / "rl.yaml").read_text())
    per_step = rl["data"]["global_batch_size"] // rl["grpo"]["group_size"]
    for step in range(rl["steps"]):
        training += generate_problems(per_step, GRPOConfig().problem_seed + step)
    evaluation = [p for seed in range(99, 106) for p in generate_problems(500, seed, held_out=True)]
    assert not any(is_held_out(p) for p in training) and all(is_held_out(p) for p in evaluation)
    assert not {p.question for p in training} & {p.question for p in evaluation}
    chains = {p.solution for p in training}
    assert not chains & {p.solution for p in evaluation}
    assert len({p.question for p in evaluation}) > 1000  # the held-out side is not a handful of problems


def test_evaluation_refuses_problems_that_a_training_set_holds(small_dataset, tmp_path):
    """User SFT data that holds three evaluation problems (one word for word, one reworded, one with
    other names over the same arithmetic): the dataset records its problems' fingerprints and the
    evaluation refuses, saying how many and where; the generated default data passes."""
    from training.posttrain.evaluate import check_held_out, training_fingerprints

    evaluation = generate_problems(40, seed=99, held_out=True)
    own, reworded, renamed = evaluation[:3]
    records = [[{"role": "user", "content": p.question}, {"role": "assistant", "content": p.solution}]
               for p in generate_problems(20, seed=5)]  # fmt: skip
    records += [
        [{"role": "user", "content": own.question}, {"role": "assistant", "content": own.solution}],
        [{"role": "user", "content": "  " + reworded.question.upper()}, {"role": "assistant", "content": "?"}],
        [{"role": "user", "content": "Someone else's story."}, {"role": "assistant", "content": renamed.solution}],
    ]
    jsonl = tmp_path / "sft.jsonl"
    jsonl.write_text("".join(json.dumps({"messages": m}) + "\n" for m in records))
    user = tmp_path / "user_sft"
    build_reasoning_data(ReasoningDataConfig(kind="sft", output_dir=str(user), base_data=str(small_dataset),
                                             jsonl=str(jsonl)))  # fmt: skip
    with pytest.raises(ValueError, match=rf"3 of 40 evaluation problems \(seed 99\) are in the training data {user}"):
        check_held_out(evaluation, training_fingerprints([str(user), str(tmp_path / "no_such_data")]), 99)
    generated = tmp_path / "generated_sft"
    build_reasoning_data(ReasoningDataConfig(kind="sft", output_dir=str(generated), base_data=str(small_dataset),
                                             generated=GeneratedProblems(120, seed=12)))  # fmt: skip
    check_held_out(generate_problems(500, seed=99, held_out=True), training_fingerprints([str(generated)]), 99)


def test_pairs_that_never_fit_are_refused_saying_why(small_dataset, tmp_path):
    """An undertrained policy's responses run to the sampling budget; when no pair fits the base's
    seq_len, the build says how long they are and what to change."""
    pairs = tmp_path / "pairs.jsonl"
    long = " ".join(["Step 1: 2 + 2 = 4"] * 20)  # a turn that never ends
    pairs.write_text("".join(json.dumps({"prompt": f"{i} + 1?", "chosen": long, "rejected": long + " no"}) + "\n"
                             for i in range(12)))  # fmt: skip
    config = ReasoningDataConfig(kind="dpo", output_dir=str(tmp_path / "dpo"), base_data=str(small_dataset),
                                 jsonl=str(pairs), valid_fraction=0.34)  # fmt: skip
    with pytest.raises(ConfigError, match=r"none of the \d+ \w+ pairs fits in seq_len 32 \(the shortest needs \d+ "
                                          r"tokens.*SFT stage longer.*--gold-fallback"):  # fmt: skip
        build_reasoning_data(config)
    assert not (tmp_path / "dpo").exists(), "nothing is written"
