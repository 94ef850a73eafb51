"""The model and its attention backends."""

from __future__ import annotations

import pytest
import torch

from kernels.attention import attention
from kernels.patterns import S2Pattern
from kernels.reference import reference_attention
from training.models.phi import PhiConfig, PhiModel, apply_rope, count_params_and_flops, rope_tables


def packed_doc_ids(b: int, s: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    starts = (torch.rand(b, s, generator=g) < 0.1).int()
    starts[:, 0] = 0
    return starts.cumsum(1).int()


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (6, 1)])
def test_sdpa_matches_reference_with_documents(hq, hkv):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 40, h, 16, requires_grad=True) for h in (hq, hkv, hkv))
    doc_ids = packed_doc_ids(2, 40)
    out = attention(q, k, v, doc_ids, backend="sdpa")
    ref = reference_attention(q, k, v, doc_ids)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_documents_do_not_see_each_other():
    torch.manual_seed(0)
    model = PhiModel(PhiConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16))
    tokens = torch.randint(0, 64, (1, 16))
    doc_ids = torch.tensor([[0] * 6 + [1] * 10])
    changed = tokens.clone()
    changed[0, :6] = (changed[0, :6] + 1) % 64
    a, b = model(tokens, doc_ids), model(changed, doc_ids)
    torch.testing.assert_close(a[0, 6:], b[0, 6:])
    assert not torch.allclose(a[0, :6], b[0, :6])


def test_partial_rope_leaves_tail_dims_untouched():
    config = PhiConfig(dim=64, n_heads=2, n_kv_heads=2, rope_fraction=0.75, max_seq_len=8)
    cos, sin = rope_tables(config, 0, 8)
    x = torch.randn(1, 8, 2, 32)
    y = apply_rope(x, cos, sin)
    assert cos.shape[-1] == 24
    torch.testing.assert_close(y[..., 24:], x[..., 24:])
    torch.testing.assert_close(y[:, 0], x[:, 0])  # position 0 is not rotated
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # rotations keep the norm


def test_positions_per_row_rotate_each_row_by_its_own_positions():
    """Position ids [b, s] (how pipeline stages receive a context-parallel rank's share) rotate each
    row as a forward of that row alone would: row 0 at its own share, row 1 shifted by 5."""
    config = PhiConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64, max_seq_len=32)
    model = PhiModel(config)
    tokens = torch.randint(0, 64, (2, 8))
    share = torch.tensor([0, 1, 2, 3, 28, 29, 30, 31])  # a CP rank's front chunk and its mirror
    rows = torch.stack([share, torch.arange(5, 13)])
    both = model(tokens, positions=rows, seq_len=32)
    torch.testing.assert_close(both[0], model(tokens[:1], positions=share, seq_len=32)[0])
    cos, sin = rope_tables(config, 0, 32, positions=rows)
    assert cos.shape == (2, 8, config.head_dim)
    torch.testing.assert_close(cos[1], rope_tables(config, 5, 8)[0])


@pytest.mark.parametrize("preset,billions", [("phi-3-mini", 3.82), ("phi-4-mini", 3.84)])
def test_presets_have_published_sizes(preset, billions):
    nparams, flops = count_params_and_flops(PhiConfig.from_preset(preset), seq_len=4096)
    assert nparams / 1e9 == pytest.approx(billions, abs=0.03)
    assert flops > 6 * 3e9


def test_param_count_matches_module():
    config = PhiConfig.from_preset("tiny", tie_embeddings=True)
    model = PhiModel(config)
    assert count_params_and_flops(config, 128)[0] == sum(p.numel() for p in model.parameters())


def s2_model(backend: str) -> PhiModel:
    torch.manual_seed(0)
    config = PhiConfig(
        vocab_size=64,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=64,
        max_seq_len=64,
        attn_backend=backend,
        s2=S2Pattern(block_size=16, local_blocks=1, vert_stride=2),
    )
    return PhiModel(config)


def test_s2_layers_alternate_with_dense_layers():
    model = s2_model("reference")
    assert model.layers["0"].attention.s2 is None and model.layers["1"].attention.s2 is not None


def test_model_with_s2_layers_triton_matches_reference():
    tokens = torch.randint(0, 64, (2, 64))
    doc_ids = torch.tensor([[0] * 40 + [1] * 24, [0] * 64])
    outputs, grads = [], []
    for backend in ("triton", "reference"):
        model = s2_model(backend)
        logits = model(tokens, doc_ids)
        logits.square().mean().backward()
        outputs.append(logits)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(outputs[0], outputs[1], atol=2e-5, rtol=1e-4)
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=2e-6, rtol=1e-3, msg=lambda m: f"{name}: {m}")
