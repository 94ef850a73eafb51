"""Parity with transformers on the published Phi configs (tests/fixtures/hf_configs: the fields and
values of Phi-3-mini-4k, Phi-3.5-mini (the Phi-3-mini-128k layout), Phi-4-mini and Phi-4-mini-reasoning),
with random weights, cut in depth and width, and lengths scaled down with them: sequences run past
LongRoPE's original length and past the sliding window."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from training.models.hf import (
    CONFIG_FILE,
    INDEX_FILE,
    UnsupportedCheckpoint,
    config_from_hf,
    export_hf,
    import_hf,
    read_hf_config,
)
from training.models.phi import PhiModel
from training.posttrain.generate import generate

FIXTURES = Path(__file__).parent / "fixtures" / "hf_configs"
PUBLISHED = sorted(p.stem for p in FIXTURES.glob("*.json"))
LOGITS_ATOL = 1e-5  # fp32
ORIGINAL, WINDOW, LONG = 64, 47, 100  # original_max_position_embeddings, sliding window, a long sequence


def cut(raw: dict, **extra) -> dict:
    """The published config at test size: two layers, a few heads of the published head_dim (so the
    LongRoPE factor lists keep their length), a small vocabulary, positions scaled 4096 -> 64."""
    head_dim = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
    group = raw["num_attention_heads"] // raw["num_key_value_heads"]
    kv_heads = 1 if group > 1 else 2
    scale = ORIGINAL / raw["original_max_position_embeddings"]
    out = {
        **raw,
        "num_hidden_layers": 2,
        "num_attention_heads": kv_heads * group,
        "num_key_value_heads": kv_heads,
        "hidden_size": kv_heads * group * head_dim,
        "intermediate_size": 160,
        "vocab_size": 512,
        "original_max_position_embeddings": ORIGINAL,
        "max_position_embeddings": int(raw["max_position_embeddings"] * scale),
        "sliding_window": WINDOW if raw["sliding_window"] < raw["max_position_embeddings"] else raw["sliding_window"],
        "torch_dtype": "float32",
        **extra,
    }
    for token in ("bos_token_id", "eos_token_id", "pad_token_id"):
        out[token] = min(out[token], 511)
    return out


def write_folder(raw: dict, path: Path, seed: int = 0) -> Path:
    """A Phi3 folder as published: this config.json as written, random weights from transformers."""
    from safetensors.torch import save_file
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    model = Phi3ForCausalLM(Phi3Config(**copy.deepcopy(raw))).float()  # it edits nested dicts in place
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if raw.get("tie_word_embeddings"):
        state.pop("lm_head.weight")
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(raw, indent=2))
    return path


def hf_model(path: Path):
    from transformers import Phi3ForCausalLM

    return Phi3ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def ours(path: Path) -> PhiModel:
    config, state = import_hf(path)
    model = PhiModel(config)
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module", params=PUBLISHED)
def published(request, tmp_path_factory):
    raw = cut(json.loads((FIXTURES / f"{request.param}.json").read_text()))
    return raw, write_folder(raw, tmp_path_factory.mktemp(request.param) / "hf")


def test_logits_match_transformers_past_the_window_and_the_original_length(published):
    raw, folder = published
    theirs, mine = hf_model(folder), ours(folder)
    assert (mine.config.longrope is not None) == (raw["rope_scaling"] is not None)
    for length in (40, LONG):  # LongRoPE: short factors below the original length, long ones past it
        tokens = torch.randint(0, 512, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            diff = (mine(tokens) - theirs(tokens).logits).abs().max()
        assert diff <= LOGITS_ATOL, f"length {length}: max abs logits diff {diff:.2e}"


def test_greedy_decoding_with_the_cache_matches_transformers(published):
    """Decoding crosses the sliding window and LongRoPE's switch to the long factors."""
    raw, folder = published
    theirs, mine = hf_model(folder), ours(folder)
    prompt_len = 16
    new = min(60, raw["max_position_embeddings"] - prompt_len)
    assert prompt_len + new > min(WINDOW, ORIGINAL), "decoding must cross the window or the LongRoPE switch"
    prompts = torch.randint(0, 512, (2, prompt_len), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = theirs.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=None,
        )
    got = generate(mine, prompts.tolist(), max_new_tokens=new, stop=[])
    assert got == expected[:, prompt_len:].tolist()


def test_export_keeps_every_field_and_the_weights(published, tmp_path):
    from safetensors.torch import load_file

    raw, folder = published
    config, state = import_hf(folder)
    out = export_hf(state, config, tmp_path / "out", max_shard_bytes=400_000)
    written = json.loads((out / CONFIG_FILE).read_text())
    assert {k: v for k, v in written.items() if k != "transformers_version"} == {
        k: v for k, v in raw.items() if k != "transformers_version"
    }
    index = json.loads((out / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1, "several shards and an index"
    exported = {k: v for f in set(index["weight_map"].values()) for k, v in load_file(out / f).items()}
    original = load_file(folder / "model.safetensors")
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    assert config_from_hf(written) == config_from_hf(raw)


def test_explicit_head_dim(tmp_path):
    """head_dim unequal to hidden_size / num_attention_heads (a wider attention than the residual)."""
    raw = cut(json.loads((FIXTURES / "phi-3-mini-4k.json").read_text()), head_dim=64, hidden_size=96)
    folder = write_folder(raw, tmp_path / "hf")
    tokens = torch.randint(0, 512, (2, LONG))
    with torch.no_grad():
        diff = (ours(folder)(tokens) - hf_model(folder)(tokens).logits).abs().max()
    assert diff <= LOGITS_ATOL


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(model_type="llama", architectures=["LlamaForCausalLM"]), "model_type"),
        (dict(model_type="qwen2"), "model_type"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(quantization_config={"bits": 4, "group_size": 64}), "quantization_config"),
        (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_scaling"),
        (dict(resid_pdrop=0.1), "resid_pdrop"),
        (dict(full_attn_mod=2), "full_attn_mod"),
        (dict(some_new_field=3), "some_new_field"),
    ],
)
def test_unsupported_configs_are_refused_before_any_weight_is_read(change, field, tmp_path):
    raw = {**cut(json.loads((FIXTURES / "phi-4-mini.json").read_text())), **change}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(raw))  # no weights at all: the config alone must fail
    with pytest.raises(UnsupportedCheckpoint, match=field) as err:
        import_hf(tmp_path)
    assert json.dumps(raw[field]) in str(err.value), "the message names the value"


def test_unexpected_tensors_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    raw = cut(json.loads((FIXTURES / "phi-3-mini-4k.json").read_text()))
    folder = write_folder(raw, tmp_path / "hf")
    state = load_file(folder / "model.safetensors")
    state["model.layers.0.self_attn.qkv_proj.bias"] = torch.zeros(3)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedCheckpoint, match="qkv_proj.bias"):
        import_hf(folder)


def test_read_config_names_the_file(tmp_path):
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(UnsupportedCheckpoint, match=str(tmp_path / CONFIG_FILE)):
        read_hf_config(tmp_path)
