"""Import from and export to Hugging Face `transformers` Phi3 folders (Phi-3, Phi-3.5, Phi-4-mini).

The config is read from `config.json` itself and checked field by field before a weight is read:
whatever this model cannot compute exactly (another architecture, activation, bias, RoPE type,
dropout, quantisation) is refused naming the field and its value. Weights are read as slices
straight from the safetensors files (one file or a sharded index), so a rank reads only its shard.
HF fuses QKV (`qkv_proj`) and gate/up (`gate_up_proj`); ours keeps them apart so tensor parallel
can split each along its own heads, which makes every one of our tensors a row range of one of theirs.
Export streams: one safetensors shard at a time, never the whole model in memory.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from common.files import replace_dir
from training.models.phi import LongRoPE, PhiConfig, PhiModel

ARCHITECTURE = "Phi3ForCausalLM"
CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3

# Fields that describe the folder, tokens or training, not the forward pass: carried through unchanged.
METADATA_FIELDS = {
    "_name_or_path", "architectures", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype",
    "dtype", "transformers_version", "use_cache", "initializer_range", "model_type", "chunk_size_feed_forward",
    "id2label", "label2id", "is_encoder_decoder", "output_attentions", "output_hidden_states", "problem_type",
    "return_dict", "tie_encoder_decoder", "torchscript", "_attn_implementation_autoset", "attn_implementation",
}  # fmt: skip
# Fields that must hold exactly these values, or the model computes something ours does not.
REQUIRED_VALUES = {
    "hidden_act": ("silu",),
    "attention_bias": (False,),
    "mlp_bias": (False,),
    "lm_head_bias": (False,),
    "attention_dropout": (0, 0.0),
    "resid_pdrop": (0, 0.0),
    "embd_pdrop": (0, 0.0),
    "full_attn_mod": (1,),  # Phi-4-mini: every layer dense
    "interpolate_factor": (1, 1.0),
}
SHAPE_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "original_max_position_embeddings",
    "rope_theta", "partial_rotary_factor", "rope_scaling", "rope_parameters", "sliding_window", "tie_word_embeddings",
}  # fmt: skip
ROPE_FIELDS = {
    "rope_type", "type", "rope_theta", "partial_rotary_factor", "short_factor", "long_factor", "factor",
    "attention_factor", "original_max_position_embeddings", "short_mscale", "long_mscale",
}  # fmt: skip
LONGROPE_ALIASES = ("longrope", "su", "yarn")  # transformers reads "su" and "yarn" as longrope for Phi3


class UnsupportedCheckpoint(ValueError):
    """An HF folder whose config or tensors this model cannot represent exactly; the message names it."""


def read_hf_config(path: str | Path) -> dict[str, Any]:
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE}; not a Hugging Face model folder")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise UnsupportedCheckpoint(f"{file}: not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise UnsupportedCheckpoint(f"{file}: top level must be an object")
    return raw


def config_from_hf(raw: dict[str, Any], where: str = CONFIG_FILE) -> PhiConfig:
    """Our config for a Phi3 `config.json`, or `UnsupportedCheckpoint` naming the first field that
    the model cannot compute exactly."""

    def refuse(field: str, why: str):
        raise UnsupportedCheckpoint(f"{where}: {field} = {json.dumps(raw.get(field))}: {why}")

    if raw.get("model_type") != "phi3":
        refuse("model_type", "only Phi3 checkpoints (model_type 'phi3') can be imported")
    if "architectures" in raw and raw["architectures"] not in ([ARCHITECTURE], None):
        refuse("architectures", f"only {ARCHITECTURE} can be imported")
    for field in ("quantization_config", "quantization"):
        if raw.get(field) is not None:
            refuse(field, "quantised weights cannot be trained; import the unquantised checkpoint")
    for field, allowed in REQUIRED_VALUES.items():
        if field in raw and raw[field] not in allowed:
            refuse(field, f"this model supports only {' or '.join(json.dumps(a) for a in allowed)}")
    for field in raw:
        if field not in METADATA_FIELDS | SHAPE_FIELDS | set(REQUIRED_VALUES):
            if raw[field] not in (None, False):
                refuse(field, "field not understood by this importer, so the model might compute otherwise")

    rope_field = "rope_parameters" if raw.get("rope_parameters") else "rope_scaling"  # the one that is read
    rope = raw.get(rope_field) or {}
    for field in rope:
        if field not in ROPE_FIELDS:
            refuse(rope_field, f"unknown RoPE field {field!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    head_dim = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
    max_seq_len = raw.get("max_position_embeddings", 4096)
    longrope = None
    if rope_type in LONGROPE_ALIASES:
        for field in ("short_factor", "long_factor"):
            if not isinstance(rope.get(field), list):
                refuse(rope_field, f"longrope needs a {field} list")
        longrope = LongRoPE(
            short_factor=[float(x) for x in rope["short_factor"]],
            long_factor=[float(x) for x in rope["long_factor"]],
            original_max_seq_len=rope.get("original_max_position_embeddings")
            or raw.get("original_max_position_embeddings", 4096),
            factor=rope.get("factor"),
            attention_factor=rope.get("attention_factor"),
        )
    elif rope_type != "default":
        refuse(rope_field, f"RoPE type {rope_type!r} is not supported (default or longrope)")
    try:
        return PhiConfig(
            vocab_size=raw["vocab_size"],
            dim=raw["hidden_size"],
            n_layers=raw["num_hidden_layers"],
            n_heads=raw["num_attention_heads"],
            n_kv_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
            head_dim=head_dim,
            ffn_dim=raw["intermediate_size"],
            norm_eps=raw.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
            rope_fraction=float(rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))),
            longrope=longrope,
            max_seq_len=max_seq_len,
            sliding_window=raw.get("sliding_window"),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            hf_metadata=raw,
        )
    except KeyError as err:
        raise UnsupportedCheckpoint(f"{where}: required field {err.args[0]!r} is missing") from None
    except ValueError as err:
        raise UnsupportedCheckpoint(f"{where}: {err}") from None


def hf_config_dict(config: PhiConfig) -> dict[str, Any]:
    """config.json for our model: the imported folder's own fields (and its RoPE field layout) with
    every field that shapes the computation set from `config`."""
    if config.s2 is not None:
        raise ValueError("Phi3 has no S2-Attention layers; export a dense model")
    out = dict(config.hf_metadata or {})
    out.update(
        architectures=[ARCHITECTURE],
        model_type="phi3",
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        hidden_act="silu",
        rms_norm_eps=config.norm_eps,
        max_position_embeddings=config.max_seq_len,
        sliding_window=config.sliding_window,
        tie_word_embeddings=config.tie_embeddings,
    )
    out.setdefault("attention_bias", False)
    for token in ("bos_token_id", "eos_token_id", "pad_token_id"):  # transformers' Phi3 defaults (32000) would
        out.setdefault(token, None)  # not fit our vocabularies
    if config.head_dim != config.dim // config.n_heads or "head_dim" in out:
        out["head_dim"] = config.head_dim
    lr = config.longrope
    if lr is not None:
        out["original_max_position_embeddings"] = lr.original_max_seq_len
    else:
        out.setdefault("original_max_position_embeddings", config.max_seq_len)
    rope: dict[str, Any] = {}
    if lr is not None:
        rope = {"long_factor": lr.long_factor, "short_factor": lr.short_factor}
        rope.update(
            {k: v for k, v in (("factor", lr.factor), ("attention_factor", lr.attention_factor)) if v is not None}
        )
    if "rope_parameters" in out:  # transformers >= 5 layout: everything RoPE in one mapping
        old = out["rope_parameters"] or {}
        kept = {k: v for k, v in old.items() if k in ("short_mscale", "long_mscale") and lr is not None}
        out["rope_parameters"] = {
            "rope_type": "longrope" if lr is not None else "default",
            "rope_theta": config.rope_theta,
            "partial_rotary_factor": config.rope_fraction,
            **({"original_max_position_embeddings": lr.original_max_seq_len} if lr is not None else {}),
            **rope,
            **kept,
        }
    else:  # the layout the published Phi configs use
        old = out.get("rope_scaling") or {}
        type_key = "rope_type" if "rope_type" in old else "type"
        kept = {k: v for k, v in old.items() if k in ("short_mscale", "long_mscale")}
        out["rope_scaling"] = {**rope, **kept, type_key: "longrope"} if lr is not None else None
        out["rope_theta"] = config.rope_theta
        if config.rope_fraction != 1.0 or "partial_rotary_factor" in out:
            out["partial_rotary_factor"] = config.rope_fraction
    return out


# ---- tensor names ---------------------------------------------------------------------------------
def hf_source(name: str, config: PhiConfig) -> tuple[str, int]:
    """Where our tensor `name` lives in the HF checkpoint: (tensor name, first row)."""
    if name == "tok_embeddings.weight" or (name == "output.weight" and config.tie_embeddings):
        return "model.embed_tokens.weight", 0
    if name == "output.weight":
        return "lm_head.weight", 0
    if name == "norm.weight":
        return "model.norm.weight", 0
    _, layer, module, *rest = name.split(".")
    p = f"model.layers.{layer}."
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    sub = ".".join([module, *rest])
    sources = {
        "attention.wq.weight": (f"{p}self_attn.qkv_proj.weight", 0),
        "attention.wk.weight": (f"{p}self_attn.qkv_proj.weight", q),
        "attention.wv.weight": (f"{p}self_attn.qkv_proj.weight", q + kv),
        "attention.wo.weight": (f"{p}self_attn.o_proj.weight", 0),
        "feed_forward.w1.weight": (f"{p}mlp.gate_up_proj.weight", 0),
        "feed_forward.w3.weight": (f"{p}mlp.gate_up_proj.weight", config.ffn_dim),
        "feed_forward.w2.weight": (f"{p}mlp.down_proj.weight", 0),
        "attention_norm.weight": (f"{p}input_layernorm.weight", 0),
        "ffn_norm.weight": (f"{p}post_attention_layernorm.weight", 0),
    }
    if sub not in sources:
        raise KeyError(f"no HF Phi3 tensor holds {name!r}")
    return sources[sub]


def hf_shapes(config: PhiConfig) -> dict[str, tuple[int, ...]]:
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, config.dim)}
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                f"{p}input_layernorm.weight": (config.dim,),
                f"{p}self_attn.qkv_proj.weight": (q + 2 * kv, config.dim),
                f"{p}self_attn.o_proj.weight": (config.dim, q),
                f"{p}post_attention_layernorm.weight": (config.dim,),
                f"{p}mlp.gate_up_proj.weight": (2 * config.ffn_dim, config.dim),
                f"{p}mlp.down_proj.weight": (config.dim, config.ffn_dim),
            }
        )
    shapes["model.norm.weight"] = (config.dim,)
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, config.dim)
    return shapes


# ---- reading --------------------------------------------------------------------------------------
class HFWeights:
    """Slices of our tensors read straight from an HF Phi3 folder's safetensors files: only the bytes
    of the requested slice are touched (the files are memory-mapped)."""

    def __init__(self, path: str | Path, config: PhiConfig):
        from safetensors import safe_open

        self.path, self.config = Path(path), config
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.path / SINGLE_FILE).is_file():
            with safe_open(self.path / SINGLE_FILE, "pt") as f:
                weight_map = dict.fromkeys(f.keys(), SINGLE_FILE)
        else:
            raise FileNotFoundError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors are read)")
        handles = {file: safe_open(self.path / file, "pt") for file in set(weight_map.values())}
        self._files = {name: handles[file] for name, file in weight_map.items()}
        self.weight_map = weight_map
        self._check(hf_shapes(config))

    def _check(self, expected: dict[str, tuple[int, ...]]) -> None:
        unexpected = sorted(set(self.weight_map) - set(expected) - {"lm_head.weight"})
        if unexpected:
            raise UnsupportedCheckpoint(
                f"{self.path}: tensors this model has no place for: {', '.join(unexpected[:5])}"
                + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
            )
        for name, shape in expected.items():
            if name not in self.weight_map:
                raise UnsupportedCheckpoint(f"{self.path}: tensor {name} is missing")
            found = tuple(self._files[name].get_slice(name).get_shape())
            if found != shape:
                raise UnsupportedCheckpoint(
                    f"{self.path}: tensor {name} has shape {list(found)}, config says {list(shape)}"
                )

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        """Rows/columns `index` (global, of our tensor `name`) as stored in the file."""
        source, row0 = hf_source(name, self.config)
        rows = slice(index[0].start + row0, index[0].stop + row0)
        return self._files[source].get_slice(source)[(rows, *index[1:])]


def import_hf(path: str | Path) -> tuple[PhiConfig, dict[str, torch.Tensor]]:
    """A whole Phi3 folder as our config and fp32 state dict (for one-process uses: evaluation)."""
    config = config_from_hf(read_hf_config(path), where=str(Path(path) / CONFIG_FILE))
    weights = HFWeights(path, config)
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in PhiModel(config).state_dict().items()}
    state = {name: weights.read(name, tuple(slice(0, n) for n in shape)).float() for name, shape in shapes.items()}
    return config, state


# ---- writing --------------------------------------------------------------------------------------
def hf_parts(config: PhiConfig) -> dict[str, list[str]]:
    """For each HF tensor, ours that it is made of, in row order (the inverse of `hf_source`)."""
    placed: dict[str, list[tuple[int, str]]] = {}
    with torch.device("meta"):
        names = list(PhiModel(config).state_dict())
    for name in names:
        if name == "output.weight" and config.tie_embeddings:
            continue
        source, row = hf_source(name, config)
        placed.setdefault(source, []).append((row, name))
    return {source: [name for _, name in sorted(parts)] for source, parts in placed.items()}


def _shards(config: PhiConfig, itemsize: int, max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in hf_shapes(config).items():
        nbytes = itemsize * int(torch.tensor(shape).prod())
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def export_hf(
    weights: dict[str, torch.Tensor] | Callable[[list[str]], dict[str, torch.Tensor]],
    config: PhiConfig,
    out_dir: str | Path,
    write_tokenizer: Callable[[Path], None] | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[Iterator], Iterator] = iter,
) -> Path:
    """Write a `transformers` Phi3 folder: config.json, safetensors shards (+ index when more than
    one) and, with `write_tokenizer(folder)`, the tokenizer's files. `weights` is a state dict or a
    function that loads the named tensors on demand, so only one shard is ever held. Written to a
    temporary folder, then renamed."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    source = weights if callable(weights) else (lambda names: {n: weights[n] for n in names})
    dtype = dtype or origin_dtype(config) or torch.float32
    hf_config = hf_config_dict(config)
    hf_config.pop("dtype", None)
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shards = _shards(config, torch.tensor([], dtype=dtype).element_size(), max_shard_bytes)
        parts = hf_parts(config)
        weight_map, total = {}, 0
        for i, names in enumerate(progress(shards)):
            file = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            ours = source([p for name in names for p in parts[name]])
            tensors = {name: torch.cat([ours[p] for p in parts[name]]).to(dtype).contiguous() for name in names}
            save_file(tensors, tmp / file, metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update(dict.fromkeys(names, file))
            del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        if write_tokenizer is not None:
            write_tokenizer(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out_dir)
    return out_dir


def origin_dtype(config: PhiConfig) -> torch.dtype | None:
    """The dtype the imported checkpoint was published in (its config's torch_dtype), if known."""
    meta = config.hf_metadata or {}
    name = meta.get("torch_dtype") or meta.get("dtype")
    found = getattr(torch, name, None) if isinstance(name, str) else None
    return found if isinstance(found, torch.dtype) else None
