"""Import from and export to Hugging Face `transformers` Phi3 folders (Phi-3 / Phi-4-mini layout).

HF fuses QKV (`qkv_proj`) and gate/up (`gate_up_proj`); ours keeps them apart so tensor parallel
can split each along its own heads. Only local folders are read or written here; a hub name works
when `transformers` can reach the hub.
"""

from __future__ import annotations

from pathlib import Path

import torch

from training.models.phi import PhiConfig


def to_hf_config(config: PhiConfig):
    from transformers import Phi3Config

    if config.head_dim != config.dim // config.n_heads:
        raise ValueError(f"Phi3 needs head_dim == dim // n_heads; this model has head_dim {config.head_dim}")
    if config.s2 is not None:
        raise ValueError("Phi3 has no S2-Attention layers; export a dense model")
    return Phi3Config(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        max_position_embeddings=config.max_seq_len,
        original_max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": config.rope_theta,
            "partial_rotary_factor": config.rope_fraction,
        },
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )


def from_hf_config(hf) -> PhiConfig:
    rope = hf.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope scaling {rope.get('rope_type')!r} is not supported yet (only default RoPE)")
    return PhiConfig(
        vocab_size=hf.vocab_size,
        dim=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        ffn_dim=hf.intermediate_size,
        norm_eps=hf.rms_norm_eps,
        rope_theta=rope.get("rope_theta", 10000.0),
        rope_fraction=rope.get("partial_rotary_factor", 1.0),
        max_seq_len=hf.max_position_embeddings,
        tie_embeddings=hf.tie_word_embeddings,
    )


def to_hf_state_dict(state: dict[str, torch.Tensor], config: PhiConfig) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["output.weight"]
    for i in range(config.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        qkv = [state[f"{ours}attention.{w}.weight"] for w in ("wq", "wk", "wv")]
        out[f"{hf}self_attn.qkv_proj.weight"] = torch.cat(qkv)
        out[f"{hf}self_attn.o_proj.weight"] = state[f"{ours}attention.wo.weight"]
        gate_up = [state[f"{ours}feed_forward.{w}.weight"] for w in ("w1", "w3")]
        out[f"{hf}mlp.gate_up_proj.weight"] = torch.cat(gate_up)
        out[f"{hf}mlp.down_proj.weight"] = state[f"{ours}feed_forward.w2.weight"]
        out[f"{hf}input_layernorm.weight"] = state[f"{ours}attention_norm.weight"]
        out[f"{hf}post_attention_layernorm.weight"] = state[f"{ours}ffn_norm.weight"]
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], config: PhiConfig) -> dict[str, torch.Tensor]:
    q_size, kv_size = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    state = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    state["output.weight"] = hf["model.embed_tokens.weight"] if config.tie_embeddings else hf["lm_head.weight"]
    for i in range(config.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        wq, wk, wv = hf[f"{theirs}self_attn.qkv_proj.weight"].split([q_size, kv_size, kv_size])
        w1, w3 = hf[f"{theirs}mlp.gate_up_proj.weight"].chunk(2)
        state.update(
            {
                f"{ours}attention.wq.weight": wq,
                f"{ours}attention.wk.weight": wk,
                f"{ours}attention.wv.weight": wv,
                f"{ours}attention.wo.weight": hf[f"{theirs}self_attn.o_proj.weight"],
                f"{ours}feed_forward.w1.weight": w1,
                f"{ours}feed_forward.w3.weight": w3,
                f"{ours}feed_forward.w2.weight": hf[f"{theirs}mlp.down_proj.weight"],
                f"{ours}attention_norm.weight": hf[f"{theirs}input_layernorm.weight"],
                f"{ours}ffn_norm.weight": hf[f"{theirs}post_attention_layernorm.weight"],
            }
        )
    return {k: v.contiguous() for k, v in state.items()}


def export_hf(state: dict[str, torch.Tensor], config: PhiConfig, out_dir: str | Path, tokenizer_file=None) -> Path:
    """Write a `transformers` Phi3 folder (config.json + safetensors, and tokenizer when given)."""
    from transformers import Phi3ForCausalLM

    out_dir = Path(out_dir)
    model = Phi3ForCausalLM(to_hf_config(config))
    model.load_state_dict(to_hf_state_dict(state, config), strict=not config.tie_embeddings)
    model.save_pretrained(out_dir)
    if tokenizer_file is not None:
        from transformers import PreTrainedTokenizerFast

        from data_pipeline.tokenizer import EOS, PAD

        PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token=EOS, pad_token=PAD).save_pretrained(
            out_dir
        )
    return out_dir


def import_hf(path: str | Path) -> tuple[PhiConfig, dict[str, torch.Tensor]]:
    """Read a local (or hub, when reachable) Phi3 checkpoint as our config and state dict."""
    from transformers import Phi3ForCausalLM

    hf_model = Phi3ForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    config = from_hf_config(hf_model.config)
    return config, from_hf_state_dict(hf_model.state_dict(), config)
