"""Every parallel layout must give the single-process loss and gradients on the same batches."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from kernels.patterns import S2Pattern
from tests.conftest import SMALL_SEQ_LEN, SMALL_VOCAB
from tests.distributed import run_ranks
from training.config import CheckpointConfig, DataConfig, TrainConfig
from training.models.phi import PhiConfig
from training.objectives import trainer_for
from training.parallel.mesh import ParallelConfig
from training.parallel.pipeline import V_SHAPE_SCHEDULES

STEPS = 3
# fp32 on CPU; differences come only from summation order across shards and micro-batches.
LOSS_RTOL = 1e-5
GRAD_ATOL, GRAD_RTOL = 2e-6, 1e-4


def small_config(
    data_path,
    out_dir,
    tp=1,
    pp=1,
    dp=-1,
    cp=1,
    sp=False,
    schedule="1F1B",
    virtual=1,
    dp_mode="allreduce",
    pp_layers=None,
    fsdp_unit="block",
    vocab_over_dp=False,
    max_seq_len=SMALL_SEQ_LEN,
    global_batch_size=8,
    **model,
) -> TrainConfig:
    return TrainConfig(
        name="parity",
        out_dir=str(out_dir),
        steps=STEPS,
        log_every=1,
        model=PhiConfig(
            vocab_size=SMALL_VOCAB,
            dim=64,
            n_layers=4,
            n_heads=4,
            n_kv_heads=2,
            ffn_dim=128,
            max_seq_len=max_seq_len,
            **model,
        ),
        parallel=ParallelConfig(
            tp=tp,
            pp=pp,
            dp=dp,
            micro_batch_size=2,
            sequence_parallel=sp,
            pp_schedule=schedule,
            virtual_stages=virtual,
            cp=cp,
            dp_mode=dp_mode,
            pp_layers=pp_layers,
            fsdp_unit=fsdp_unit,
            vocab_over_dp=vocab_over_dp,
        ),
        data=DataConfig(
            path=str(data_path), global_batch_size=global_batch_size, cache_dir=str(Path(out_dir).parent / "data-cache")
        ),
        checkpoint=CheckpointConfig(resume="none"),
    )


def grads_and_history(config: TrainConfig, **objective_sections):
    trainer = trainer_for(config, **objective_sections)
    trainer.forward_backward(trainer.loader.batch_at(0))
    grads = {}
    for name, p in trainer.model.named_parameters():
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        grads[name] = g.detach().clone()
    trainer.optimizer.zero_grad(set_to_none=True)
    history = [trainer.train_step(trainer.loader.batch_at(step)) for step in range(STEPS)]
    history.append(trainer.evaluate())  # per-family loss on the valid split after the steps
    keep = trainer.tp_rank == 0 and trainer.dp_rank == 0 and trainer.cp_rank == 0
    return (grads if keep else {}), history


@pytest.fixture(scope="module")
def reference(small_dataset, tmp_path_factory):
    return grads_and_history(small_config(small_dataset, tmp_path_factory.mktemp("ref")))


@pytest.mark.parametrize(
    "layout",
    [
        dict(tp=2),
        dict(pp=2),
        dict(tp=2, pp=2),
        dict(dp=2),
        pytest.param(dict(dp=2, tp=2), marks=pytest.mark.slow),  # 13 s; DP x TP: the lean FSDP layout below too
        dict(dp=2, pp=2),
        dict(dp=2, dp_mode="fsdp"),
        pytest.param(dict(dp=2, tp=2, dp_mode="fsdp"), marks=pytest.mark.slow),  # 19 s; the lean FSDP x TP below
        dict(dp=2, pp=2, dp_mode="fsdp"),
        # the lean FSDP: every linear layer a unit, the vocabulary split over DP x TP (never gathered)
        dict(dp=2, tp=2, sp=True, dp_mode="fsdp", fsdp_unit="linear", vocab_over_dp=True),
        dict(tp=2, sp=True),
        pytest.param(dict(tp=2, pp=2, sp=True), marks=pytest.mark.slow),  # 16 s; sp: tp2-sp; pp: tp2-pp2
        dict(pp=2, pp_layers=[1, 3]),
        dict(pp=2, schedule="Interleaved1F1B", virtual=2),
        pytest.param(
            dict(tp=2, pp=2, schedule="Interleaved1F1B", virtual=2), marks=pytest.mark.slow
        ),  # 15 s; interleaved PP2 above, TP2 x PP2 1F1B further up
        dict(pp=2, schedule="InterleavedZeroBubble", virtual=2),
        dict(pp=2, schedule="ZBVZeroBubble", virtual=2),
        dict(tp=2, pp=2, schedule="ZBVZeroBubble", virtual=2),
    ],
    ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()),
)
def test_layout_matches_single_process(layout, reference, small_dataset, tmp_path):
    ref_grads, ref_history = reference
    world = layout.get("tp", 1) * layout.get("pp", 1) * layout.get("dp", 1) * layout.get("cp", 1)
    results = run_ranks(world, grads_and_history, small_config(small_dataset, tmp_path, **layout))
    grads = {name: g for rank_grads, _ in results for name, g in rank_grads.items()}
    assert set(grads) == set(ref_grads), "every parameter must get a gradient exactly once across stages"
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=lambda m: f"{name}: {m}")
    for rank_history in (h for _, h in results):
        for step, (got, want) in enumerate(zip(rank_history[:-1], ref_history[:-1], strict=True)):
            for key in ("loss", "grad_norm"):
                assert got[key] == pytest.approx(want[key], rel=LOSS_RTOL), f"step {step} {key}"
            for family in (k for k in want if k.startswith("loss/")):
                assert got[family] == pytest.approx(want[family], rel=1e-4), f"step {step} {family}"
        got_eval, want_eval = rank_history[-1], ref_history[-1]
        if layout.get("schedule") in V_SHAPE_SCHEDULES:
            assert got_eval == {}, "V-shaped schedules cannot evaluate (torch pipelining has no forward-only run)"
            continue
        assert set(got_eval) == set(want_eval) and "val/loss_per_char/synthetic" in want_eval
        for key, value in want_eval.items():
            assert got_eval[key] == pytest.approx(value, rel=1e-4), key


def assert_same_training(results, ref_grads, ref_history):
    grads = {name: g for rank_grads, _ in results for name, g in rank_grads.items()}
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=lambda m: f"{name}: {m}")
    for step, (got, want) in enumerate(zip(results[0][1][:-1], ref_history[:-1], strict=True)):
        assert got["loss"] == pytest.approx(want["loss"], rel=LOSS_RTOL), f"step {step}"


def test_tensor_parallel_keeps_each_ranks_s2_head_patterns(small_dataset, tmp_path):
    """With vert_stride 2 and 2 KV heads the two heads read different blocks: a rank that used the
    wrong head's pattern would change the loss."""
    s2 = dict(s2=S2Pattern(block_size=16, local_blocks=1, vert_stride=2), dense_every=2)
    ref_grads, ref_history = grads_and_history(small_config(small_dataset, tmp_path / "ref", **s2))
    results = run_ranks(2, grads_and_history, small_config(small_dataset, tmp_path / "tp", tp=2, **s2))
    assert_same_training(results, ref_grads, ref_history)


@pytest.mark.parametrize(
    "layout,model,message",
    [
        (dict(tp=3), {}, "does not match the world size 4"),
        (dict(tp=4), {}, "does not divide n_kv_heads=2"),
        (dict(tp=2, pp=2), dict(n_layers=1), "exceeds n_layers=1"),
        (dict(pp=2, pp_layers=[1, 1]), {}, "summing to n_layers=4"),
        (dict(cp=3), {}, "cp=3 x dp=-1 does not match the world size 4"),
        (dict(cp=2, tp=2, sp=True), {}, "parallel.cp > 1 with parallel.sequence_parallel is not supported yet"),
    ],
)
def test_layouts_that_do_not_fit_are_refused(layout, model, message, small_dataset, tmp_path):
    config = small_config(small_dataset, tmp_path, **layout)
    config.model = dataclasses.replace(config.model, **model)
    world = 4
    with pytest.raises(Exception, match=message):
        # Checks run before any collective, so one process stands in for the world.
        from training.parallel.mesh import ParallelDims
        from training.parallel.pipeline import stage_layers

        dims = ParallelDims.from_config(config.parallel, world)
        dims.check_model(config.model.n_heads, config.model.n_kv_heads, config.model.n_layers, config.model.vocab_size)
        stage_layers(config.model.n_layers, dims.pp, config.parallel.pp_layers)


def chunked_and_whole_reduce_scatter(numel: int, chunk_bytes: int):
    import torch.distributed as dist

    from training.parallel.data import ChunkedReduceScatter

    rank, world = dist.get_rank(), dist.get_world_size()
    source = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
    whole, chunked = torch.empty(numel // world), torch.empty(numel // world)
    dist.reduce_scatter_single(whole, source.clone())
    ChunkedReduceScatter(chunk_bytes)(chunked, source.clone(), dist.group.WORLD, dist.ReduceOp.SUM)
    return whole, chunked


@pytest.mark.parametrize("chunk_bytes", [4 * 1000, 4 * 1001, 2**30])  # chunks that divide a row, or not; one
def test_chunked_reduce_scatter_equals_gloos_own(chunk_bytes):
    """FSDP's gradient reduce-scatter on gloo goes chunk by chunk (gloo copies a whole input): the same sums."""
    for whole, chunked in run_ranks(2, chunked_and_whole_reduce_scatter, 2 * 25_000, chunk_bytes):
        torch.testing.assert_close(chunked, whole, rtol=0, atol=0)


def test_vocab_over_dp_needs_fsdp(small_dataset, tmp_path):
    from training.parallel.mesh import LayoutError

    config = small_config(small_dataset, tmp_path, vocab_over_dp=True)
    with pytest.raises(LayoutError, match=r"needs parallel.dp_mode=fsdp with dp > 1 \(got dp_mode=allreduce, dp=1\)"):
        trainer_for(config)
