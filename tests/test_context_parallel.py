"""Context parallelism against one process: the model's loss and every gradient, dense and S2 layers,
packed documents crossing the chunk boundaries, a sliding window, at 1,024 tokens on 2 gloo ranks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kernels.patterns import S2Pattern
from kernels.reference import reference_attention
from tests.distributed import run_ranks
from training.models.phi import PhiConfig, PhiModel
from training.parallel.context import balanced_positions, merge_partials

SEQ = 1024


def test_balanced_positions_cover_the_sequence_and_share_the_causal_work():
    for cp in (2, 4):
        shares = [balanced_positions(SEQ, cp, rank) for rank in range(cp)]
        assert sorted(torch.cat(shares).tolist()) == list(range(SEQ))
        work = {int((share + 1).sum()) for share in shares}  # query-key pairs under a causal mask
        assert len(work) == 1, work
    with pytest.raises(ValueError, match="divisible by 2 x cp = 8"):
        balanced_positions(100, 4, 0)


def test_partials_merged_by_log_sum_exp_equal_one_softmax():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 32, h, 16, generator=g) for h in (4, 2, 2))
    mask = torch.rand(2, 4, 32, 32, generator=g) < 0.5
    mask[..., 0] = False  # a chunk some rows read nothing from
    want = reference_attention(q, k, v, mask=mask)
    parts = [reference_attention(q, k[:, c], v[:, c], mask=mask[..., c], return_lse=True)
             for c in (slice(0, 8), slice(8, 20), slice(20, 32))]  # fmt: skip
    got = merge_partials([p[0] for p in parts], [p[1] for p in parts])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def model_config(s2: bool, window: int | None, backend: str = "reference", seq: int = SEQ) -> PhiConfig:
    pattern = S2Pattern(block_size=64, local_blocks=2, vert_stride=4) if s2 else None
    return PhiConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=seq,
                     attn_backend=backend, s2=pattern, dense_every=2, sliding_window=window)  # fmt: skip


def batch(seq: int = SEQ):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (2, seq + 1), generator=g)
    starts = torch.rand(2, seq, generator=g) < 3 / seq  # a few documents, crossing the chunk edges
    return tokens[:, :-1], tokens[:, 1:], starts.int().cumsum(1)


def loss_and_grads(config: PhiConfig, cp: bool, recompute: str = "none", precision: str = "fp32"):
    """Mean token loss and the gradients of every parameter, on one process or this rank's share."""
    import torch.distributed as dist

    from training.parallel.context import apply_context_parallel, shard_sequence
    from training.parallel.transforms import apply_activation_checkpointing
    from training.precision import autocast

    torch.manual_seed(0)
    model = PhiModel(config)
    seq = config.max_seq_len
    inputs, labels, doc_ids = batch(seq)
    extra = {}
    if cp:
        positions = apply_context_parallel(model, dist.group.WORLD, seq)
        inputs, labels, doc_ids = (shard_sequence(t, positions) for t in (inputs, labels, doc_ids))
        extra = dict(positions=positions, seq_len=seq)
    apply_activation_checkpointing(model, recompute)
    with autocast(precision, "cpu"):
        logits = model(inputs, doc_ids=doc_ids, **extra).float()
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / labels.numel()
    if cp:
        loss = loss / dist.get_world_size()  # each rank holds 1/cp of the tokens
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    if cp:
        total = loss.detach().clone()
        dist.all_reduce(total)
        for grad in grads.values():
            dist.all_reduce(grad)
        loss = total
    return float(loss.detach()), grads


@pytest.mark.parametrize(
    "cp,s2,window,recompute,precision",
    [(2, False, None, "none", "fp32"), (2, False, 200, "none", "fp32"), (2, True, None, "none", "fp32"),
     (2, True, 200, "none", "fp32"), (4, True, None, "none", "fp32"), (2, True, None, "selective", "fp32"),
     (2, True, None, "full", "fp32"), (2, True, None, "none", "bf16"), (2, True, None, "none", "fp16")],
    ids=["cp2-dense", "cp2-dense-window200", "cp2-s2", "cp2-s2-window200", "cp4-s2", "cp2-s2-recompute",
         "cp2-s2-full-recompute", "cp2-s2-bf16", "cp2-s2-fp16"],
)  # fmt: skip
def test_context_parallel_equals_one_process(cp, s2, window, recompute, precision):
    """S2 layers receive only the key rows their patterns read, from every peer (cp4: three peers);
    selective and full recompute re-run the exchange in the backward pass; bf16/fp16 autocast within their precision."""
    config = model_config(s2, window)
    want_loss, want_grads = loss_and_grads(config, False, "none", precision)
    tol = dict(atol=1e-5, rtol=1e-4) if precision == "fp32" else dict(atol=2e-3, rtol=2e-2)
    for loss, grads in run_ranks(cp, loss_and_grads, config, True, recompute, precision):
        assert loss == pytest.approx(want_loss, rel=tol["rtol"] / 10)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, want_grads[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(
    "cp,s2,window,seq",
    [(2, False, None, 256), (2, True, 100, 256), pytest.param(4, True, None, 512, marks=pytest.mark.slow)],  # cp4: 17 s
    ids=["cp2-dense", "cp2-s2-window100", "cp4-s2"],
)
def test_context_parallel_on_the_triton_kernels_equals_one_process(cp, s2, window, seq):
    """attn_backend triton (in the interpreter): each rank's chunks run the kernels at their global
    offsets against keys in global order (S2: only the received rows filled); loss and every
    gradient equal one process on the plain PyTorch reference. The S2 model's first layer is dense,
    so the default case runs both exchanges."""
    want_loss, want_grads = loss_and_grads(model_config(s2, window, "reference", seq), False)
    for loss, grads in run_ranks(cp, loss_and_grads, model_config(s2, window, "triton", seq), True):
        assert loss == pytest.approx(want_loss, rel=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, want_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_kernels_under_context_parallel_refuse_chunks_that_split_an_s2_block():
    from kernels.s2_attention import S2Heads
    from training.parallel.context import runs_kernels

    heads = S2Heads(S2Pattern(block_size=64, local_blocks=2, vert_stride=4), num_kv_heads=2)
    with pytest.raises(ValueError, match="chunks of 32 tokens, not a multiple of the S2 block size 64.*of 256"):
        runs_kernels("triton", heads, 2, 128)
    assert runs_kernels("triton", heads, 2, 256) and runs_kernels("triton", None, 2, 128)
    assert not runs_kernels("sdpa", heads, 2, 128)


def test_s2_exchange_sends_at_most_the_patterns_share_of_the_keys():
    """Bytes an S2-aware exchange sends against a dense ring's (every rank's keys to every peer): at
    most the pattern's computed share (+10%), at 32K tokens, strides 8-32, CP 2-8."""
    from kernels.bench import counted_density
    from kernels.patterns import block_mask
    from training.parallel.context import s2_exchange_plan

    seq, heads = 32768, 8
    for stride in (8, 16, 32):
        pattern = S2Pattern(block_size=64, local_blocks=16, vert_stride=stride)
        mask = block_mask(pattern, heads, seq // 64)
        for cp in (2, 4, 8):
            shares = [balanced_positions(seq, cp, rank) for rank in range(cp)]
            plans = [s2_exchange_plan(mask, shares, 64, rank)[0] for rank in range(cp)]
            sent = sum(len(rows) for plan in plans for per_head in plan.values() for rows in per_head)
            ratio = sent / (cp * (cp - 1) * (seq // cp) * heads)
            assert 0 < ratio <= 1.1 * counted_density(pattern, seq, heads), (stride, cp, ratio)


TRAINER_LAYOUTS = [dict(cp=2), dict(cp=2, tp=2), dict(cp=2, pp=2), dict(cp=2, dp=2, dp_mode="fsdp")]


@pytest.fixture(scope="module")
def long_reference(long_dataset, tmp_path_factory):
    from tests.test_parallel import grads_and_history

    return grads_and_history(long_trainer_config(long_dataset, tmp_path_factory.mktemp("long-ref")))


def long_trainer_config(data, out, **layout):
    """4 layers alternating dense and S2 (so each pipeline stage holds one of each) at 1,024 tokens."""
    from tests.conftest import LONG_SEQ_LEN
    from tests.test_parallel import small_config

    pattern = S2Pattern(block_size=64, local_blocks=2, vert_stride=4)
    return small_config(data, out, **layout, max_seq_len=LONG_SEQ_LEN, global_batch_size=4, s2=pattern,
                        dense_every=2, attn_backend="sdpa")  # fmt: skip


@pytest.mark.parametrize("layout", TRAINER_LAYOUTS, ids=["cp2", "cp2-tp2", "cp2-pp2", "cp2-dp2-fsdp"])
def test_trainer_at_1024_tokens_matches_one_process(layout, long_reference, long_dataset, tmp_path):
    """The whole trainer (loss, every gradient, three optimizer steps, evaluation) under CP2 and CP2
    composed with TP2, PP2 and FSDP2, on 1,024-token rows of packed documents, dense and S2 layers."""
    from tests.test_parallel import assert_same_training, grads_and_history

    world = math.prod(v for k, v in layout.items() if k in ("cp", "tp", "pp", "dp"))
    results = run_ranks(world, grads_and_history, long_trainer_config(long_dataset, tmp_path, **layout))
    ref_grads, ref_history = long_reference
    assert_same_training(results, ref_grads, ref_history)
    for _, history in results:
        for key, value in ref_history[-1].items():
            assert history[-1][key] == pytest.approx(value, rel=1e-4), key
