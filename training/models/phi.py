"""Phi-style decoder: RMSNorm, rotary embeddings (optionally partial), GQA attention, SwiGLU MLP.

Single-device PyTorch with no parallel code: tensor and pipeline parallelism are applied from
outside (`training.parallel`). Two conventions make that possible:
- projections reshape with `-1` heads, so a tensor-parallel rank that holds a slice of the heads
  runs the same code;
- `layers` is a ModuleDict keyed by the global layer index and the embedding / final norm / head
  may be `None`, so a pipeline stage is this same module with the parts of other stages removed,
  and its parameter names match the full model's (checkpoints reshard by name).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kernels.attention import BACKENDS, attention, decode_attention
from kernels.patterns import S2Pattern
from kernels.s2_attention import S2Heads, S2LayerCache
from training.models.init import init_weights


@dataclass
class LongRoPE:
    """LongRoPE (Phi-3-mini-128k, Phi-3.5-mini, Phi-4-mini): each rotary frequency divided by its own
    factor, `short_factor` while a forward's sequence fits `original_max_seq_len` and `long_factor`
    for every position once it does not (transformers switches the same way), cos/sin scaled by
    `attention_factor`. `factor` and `attention_factor` stay None when the checkpoint leaves them out:
    then they derive from max_seq_len / original_max_seq_len exactly as transformers does."""

    short_factor: list[float]
    long_factor: list[float]
    original_max_seq_len: int
    factor: float | None = None
    attention_factor: float | None = None

    def scale(self, max_seq_len: int) -> float:
        if self.attention_factor is not None:
            return self.attention_factor
        factor = self.factor if self.factor is not None else max_seq_len / self.original_max_seq_len
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(self.original_max_seq_len))


@dataclass
class PhiConfig:
    PRESETS: ClassVar[dict[str, dict]] = {
        "tiny": dict(vocab_size=4096, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384, max_seq_len=128),
        "phi-3-mini": dict(
            vocab_size=32064,
            dim=3072,
            n_layers=32,
            n_heads=32,
            n_kv_heads=32,
            ffn_dim=8192,
            max_seq_len=4096,
            rope_theta=10000.0,
        ),
        "phi-4-mini": dict(
            vocab_size=200064,
            dim=3072,
            n_layers=32,
            n_heads=24,
            n_kv_heads=8,
            ffn_dim=8192,
            max_seq_len=4096,
            rope_theta=10000.0,
            rope_fraction=0.75,
            tie_embeddings=True,
        ),
    }

    preset: str | None = None  # resolved by the config loader / `from_preset`: its values are the defaults
    vocab_size: int = 4096
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # defaults to dim // n_heads
    ffn_dim: int = 384
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0  # share of each head's dims that is rotated (phi-4-mini: 0.75)
    longrope: LongRoPE | None = None  # None: plain RoPE
    max_seq_len: int = 128
    sliding_window: int | None = None  # query i reads keys j with i - j < sliding_window (Phi-3-mini-4k: 2047)
    tie_embeddings: bool = False
    attn_backend: str = "sdpa"  # triton | flash_attn | flex | sdpa | reference
    s2: S2Pattern | None = None  # S2-Attention pattern for the sparse layers; None: all layers dense
    dense_every: int = 2  # with s2: layers 0, k, 2k, ... stay dense (Phi-3-small alternates, k=2); 0: none
    init_std: float = 0.02
    # Fields of the HF config.json this model was imported from that do not change the computation
    # (token ids, dtype, auto_map, ...), written back on export so the folder keeps every field.
    hf_metadata: dict[str, Any] | None = None

    def is_sparse(self, layer: int) -> bool:
        return self.s2 is not None and (self.dense_every == 0 or layer % self.dense_every != 0)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> PhiConfig:
        return cls(preset=name, **{**cls.PRESETS[name], **overrides})

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend {self.attn_backend!r} is not one of {BACKENDS}")
        if self.dense_every < 0:
            raise ValueError(f"dense_every must be >= 0, got {self.dense_every}")
        if int(self.head_dim * self.rope_fraction) % 2:
            raise ValueError(f"rope_fraction {self.rope_fraction} x head_dim {self.head_dim} must be even")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or null, got {self.sliding_window}")
        if self.longrope is not None:
            pairs = int(self.head_dim * self.rope_fraction) // 2
            for name in ("short_factor", "long_factor"):
                if len(getattr(self.longrope, name)) != pairs:
                    raise ValueError(
                        f"longrope.{name} has {len(getattr(self.longrope, name))} values; the rotated part of each "
                        f"head (head_dim {self.head_dim} x rope_fraction {self.rope_fraction}) needs {pairs}"
                    )


def rope_tables(
    config: PhiConfig, start: int, length: int, device=None, positions: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [length, rotated dims] for positions start .. start + length - 1 (or the given global
    `positions` [s] or per row [b, s], e.g. a context-parallel rank's share; then [b, s, rotated dims])
    of a sequence whose forward reaches position start + length - 1 (which picks LongRoPE's short or
    long factors). Computed per forward as transformers does, so no max_seq_len table is ever held."""
    rot = int(config.head_dim * config.rope_fraction)
    exponents = torch.arange(0, rot, 2, dtype=torch.int64, device=device).float() / rot
    scale = 1.0
    if config.longrope is None:
        inv_freq = 1.0 / (config.rope_theta**exponents)
    else:
        lr = config.longrope
        long = start + length > lr.original_max_seq_len
        factors = torch.tensor(lr.long_factor if long else lr.short_factor, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (factors * config.rope_theta**exponents)
        scale = lr.scale(config.max_seq_len)
    if positions is None:
        positions = torch.arange(start, start + length, device=device)
    angles = positions.to(device).float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)  # HF "rotate_half" layout, so weights map 1:1 to Phi3
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` dims of each head of x [b, s, h, d]; the rest pass through.
    cos/sin are [s, rot] (every row at the same positions) or [b, s, rot]."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # over heads; [s, 1, rot] broadcasts over rows
    return torch.cat([(x_rot * cos + rotated * sin).type_as(x), x_pass], dim=-1)


class LayerCache:
    """Keys and values of one layer's past tokens, `max_len` positions allocated at the first append
    with that layer's own heads, dtype and device (under tensor parallel: its rank's KV heads). An
    S2 layer's decoding reads only the blocks its pattern allows (`s2`)."""

    def __init__(self, max_len: int, s2: S2Heads | None = None):
        self.max_len, self.length, self.s2 = max_len, 0, s2
        self.keys = self.values = None

    @property
    def bytes(self) -> int:
        return 0 if self.keys is None else 2 * self.keys.numel() * self.keys.element_size()

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None:
            self.keys = k.new_zeros(k.shape[0], self.max_len, *k.shape[2:])
            self.values = torch.zeros_like(self.keys)
        end = self.length + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.keys[:, self.length : end] = k
        self.values[:, self.length : end] = v
        self.length = end
        return self.keys[:, :end], self.values[:, :end]

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None) -> torch.Tensor:
        """Append one token's K/V and return its attention over the cache."""
        k_all, v_all = self.append(k, v)
        return decode_attention(q, k_all, v_all, self.s2, window)


class KVCache:
    """One cache per layer, keyed like `PhiModel.layers`. S2 layers keep, per KV head, only the key
    blocks a later query can read (`S2LayerCache`) unless `reduce_s2` is False."""

    def __init__(self, model: PhiModel, max_len: int | None = None, reduce_s2: bool = True):
        max_len = max_len or model.config.max_seq_len
        self.layers = {}
        for name, layer in model.layers.items():
            s2 = layer.attention.s2
            self.layers[name] = S2LayerCache(max_len, s2) if s2 is not None and reduce_s2 else LayerCache(max_len, s2)

    @property
    def length(self) -> int:
        return next(iter(self.layers.values())).length

    @property
    def bytes(self) -> int:
        """Bytes of keys and values allocated over all layers."""
        return sum(cache.bytes for cache in self.layers.values())


class Attention(nn.Module):
    def __init__(self, config: PhiConfig, sparse: bool = False):
        super().__init__()
        self.head_dim, self.backend, self.window = config.head_dim, config.attn_backend, config.sliding_window
        # Which global KV heads this module holds decides each head's S2 shard; tensor parallel
        # moves `head_start` to its rank's first head.
        self.s2 = S2Heads(config.s2, config.n_kv_heads) if sparse else None
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x, cos, sin, doc_ids, cache: LayerCache | S2LayerCache | None = None):
        """`cos`/`sin` [s, rotated dims] hold the positions of x's tokens (after the cached ones)."""
        b, s, _ = x.shape
        start = cache.length if cache is not None else 0
        q = apply_rope(self.wq(x).view(b, s, -1, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(b, s, -1, self.head_dim), cos, sin)
        v = self.wv(x).view(b, s, -1, self.head_dim)
        if cache is not None and start > 0:  # decoding: one token against everything cached
            if s != 1:
                raise ValueError(f"after the prompt, decode one token at a time (got {s})")
            out = cache.decode(q, k, v, self.window)
        else:
            if cache is not None:
                cache.append(k, v)
            out = self.core_attention(q, k, v, doc_ids)
        return self.wo(out.reshape(b, s, -1))

    def core_attention(self, q, k, v, doc_ids):
        """Scores, softmax and weighted sum: the part selective activation checkpointing recomputes."""
        return attention(q, k, v, doc_ids=doc_ids, backend=self.backend, s2=self.s2, window=self.window)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: PhiConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.w2 = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, config: PhiConfig, sparse: bool = False):
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.attention = Attention(config, sparse)
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, cos, sin, doc_ids, cache: LayerCache | S2LayerCache | None = None):
        x = x + self.attention(self.attention_norm(x), cos, sin, doc_ids, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class PhiModel(nn.Module):
    def __init__(self, config: PhiConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleDict({str(i): Block(config, config.is_sparse(i)) for i in range(config.n_layers)})
        self.norm: nn.RMSNorm | None = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.output: nn.Linear | None = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if self.output.weight.device.type != "meta":
            self.reset_parameters()

    def init_std(self, name: str) -> float | None:
        """GPT-2 style: N(0, std), residual output projections scaled by 1/sqrt(2 * n_layers); None: norms, ones."""
        if name.endswith("norm.weight"):
            return None
        if name.endswith(("wo.weight", "w2.weight")):
            return self.config.init_std / math.sqrt(2 * self.config.n_layers)
        return self.config.init_std

    def reset_parameters(self, seed: int | None = None) -> None:
        """Initialise as `init_std` says, drawn per parameter name (the same values in every layout);
        without a seed, one is drawn from torch's global generator."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        init_weights(self, seed)

    def forward(
        self,
        inputs: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        seq_len: int | None = None,
    ) -> torch.Tensor:
        """`inputs`: token ids [b, s] (or hidden states when this is a later pipeline stage).
        `doc_ids` [b, s]: attention stays inside each packed document. `cache`: generation, which
        feeds the prompt first and then one token at a time. `positions` [s]: the tokens' places in a
        sequence of `seq_len` tokens when they are a share of it (context parallel), or [b, s] per
        row; by default 0 .. s - 1. Returns logits or hidden states."""
        h = self.tok_embeddings(inputs) if self.tok_embeddings is not None else inputs
        start = cache.length if cache is not None else 0
        # A later pipeline stage under sequence parallel receives a sequence shard; doc_ids are whole.
        length = doc_ids.shape[1] if doc_ids is not None else inputs.shape[1]
        if positions is not None:
            start, length = 0, seq_len or int(positions.max()) + 1
        cos, sin = rope_tables(self.config, start, length, h.device, positions)
        for name, layer in self.layers.items():
            h = layer(h, cos, sin, doc_ids, cache.layers[name] if cache is not None else None)
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h


def count_params_and_flops(config: PhiConfig, seq_len: int) -> tuple[int, int]:
    """Parameter count and training FLOPs per token: 6 per matmul weight (forward + backward) plus
    the attention scores and values (12 * layers * heads * head_dim * seq_len), as torchtitan counts."""
    c = config
    attn = c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
    per_layer = attn + 3 * c.dim * c.ffn_dim + 2 * c.dim
    embedding = c.vocab_size * c.dim
    head = 0 if c.tie_embeddings else c.vocab_size * c.dim
    nparams = c.n_layers * per_layer + embedding + head + c.dim
    matmul_weights = c.n_layers * (attn + 3 * c.dim * c.ffn_dim) + c.vocab_size * c.dim
    return nparams, 6 * matmul_weights + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len
