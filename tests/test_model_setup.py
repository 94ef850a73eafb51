"""Model construction: tied embeddings under pipeline parallel, init_from adopting the weights' model
config, defaults from the dataset, and no rank materialising the whole model."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from common.config import ConfigError
from tests.conftest import SMALL_SEQ_LEN, SMALL_VOCAB
from tests.distributed import run_ranks
from tests.test_parallel import GRAD_ATOL, GRAD_RTOL, LOSS_RTOL, grads_and_history, small_config
from tests.test_resume import STOP, TOTAL, fit_losses
from training.config import CheckpointConfig
from training.models.hf import export_hf
from training.models.phi import LongRoPE, PhiConfig, PhiModel
from training.objectives import trainer_for


@pytest.fixture(scope="module")
def tied_reference(small_dataset, tmp_path_factory):
    return grads_and_history(small_config(small_dataset, tmp_path_factory.mktemp("tied"), tie_embeddings=True))


@pytest.mark.parametrize(
    "layout",
    [
        dict(pp=2),
        pytest.param(dict(tp=2, pp=2), marks=pytest.mark.slow),  # tp2 and pp2 each stay in the default suite
        dict(pp=2, schedule="Interleaved1F1B", virtual=2),
        dict(dp=2, pp=2, dp_mode="fsdp"),
        dict(tp=2),  # one tied parameter: the head's gradient and the vocab-parallel lookup's meet
        pytest.param(dict(dp=2, tp=2, dp_mode="fsdp"), marks=pytest.mark.slow),  # FSDP x TP: test_parallel's lean case
        # the shared table split over DP x TP (untied: test_parallel's lean case)
        pytest.param(dict(dp=2, tp=2, dp_mode="fsdp", vocab_over_dp=True), marks=pytest.mark.slow),
        dict(dp=2, pp=2, dp_mode="fsdp", vocab_over_dp=True),  # and each stage's copy of it
    ],
    ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()),
)
def test_tied_embeddings_in_every_layout(layout, tied_reference, small_dataset, tmp_path):
    """First and last stage hold copies of the shared weight; each gets the single process's gradient,
    and training (AdamW, no decay on either copy, clipping counting it once) stays identical."""
    ref_grads, ref_history = tied_reference
    world = layout.get("tp", 1) * layout.get("pp", 1) * layout.get("dp", 1)
    config = small_config(small_dataset, tmp_path, tie_embeddings=True, **layout)
    results = run_ranks(world, grads_and_history, config)
    grads = {name: g for rank_grads, _ in results for name, g in rank_grads.items()}
    grads_equal = dict(atol=GRAD_ATOL, rtol=GRAD_RTOL)
    if layout.get("pp", 1) > 1:  # the last stage's copy gets the same gradient
        assert set(grads) == set(ref_grads) | {"output.weight"}
        torch.testing.assert_close(grads["output.weight"], ref_grads["tok_embeddings.weight"], **grads_equal)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, **grads_equal, msg=lambda m: f"{name}: {m}")
    for step, (got, want) in enumerate(zip(results[0][1][:-1], ref_history[:-1], strict=True)):
        for key in ("loss", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=LOSS_RTOL), f"step {step} {key}"


@pytest.mark.slow  # tied tables in every layout and resume stay in the default suite (tests above, test_resume)
def test_tied_checkpoint_resumes_under_pipeline_parallel(small_dataset, tmp_path):
    """A single-process tied checkpoint stores the shared weight once; the pipeline's last stage
    reads its copy (and its optimizer state) from it."""
    base = dataclasses.replace(small_config(small_dataset, tmp_path / "a", tie_embeddings=True), steps=TOTAL)
    uninterrupted = fit_losses(base)
    first = dataclasses.replace(
        base, out_dir=str(tmp_path / "b"), stop_after=STOP, checkpoint=CheckpointConfig(resume="auto")
    )
    fit_losses(first)
    resumed = dataclasses.replace(
        small_config(small_dataset, tmp_path / "c", tie_embeddings=True, tp=2, pp=2),
        steps=TOTAL,
        checkpoint=CheckpointConfig(resume=str(first.run_dir / "checkpoints" / f"step_{STOP:08d}")),
    )
    assert run_ranks(4, fit_losses, resumed)[0] == pytest.approx(uninterrupted[STOP:], rel=1e-5)


def hf_folder(tmp_path, **overrides):
    """An HF folder whose model differs from our defaults in every setting a YAML would otherwise give."""
    config = PhiConfig(
        vocab_size=SMALL_VOCAB,
        dim=96,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=32,
        ffn_dim=160,
        max_seq_len=4 * SMALL_SEQ_LEN,
        norm_eps=1e-6,
        rope_theta=500000.0,
        rope_fraction=0.75,
        longrope=LongRoPE([1.0] * 12, [2.0 + i for i in range(12)], original_max_seq_len=SMALL_SEQ_LEN // 2),
        sliding_window=SMALL_SEQ_LEN // 2 - 1,
        tie_embeddings=True,
        **overrides,
    )
    torch.manual_seed(3)
    model = PhiModel(config)
    return export_hf(model.state_dict(), config, tmp_path / "hf"), model


def eval_losses(config) -> dict:
    trainer = trainer_for(config)
    return {"config": trainer.config.model, "eval": trainer.evaluate()}


def test_init_from_hf_adopts_its_model_config(small_dataset, tmp_path):
    folder, source = hf_folder(tmp_path)
    config = dataclasses.replace(
        small_config(small_dataset, tmp_path / "run", tp=2, pp=2), init_from=str(folder), model=PhiConfig()
    )
    single = dataclasses.replace(config, parallel=small_config(small_dataset, tmp_path).parallel)
    got = eval_losses(single)
    for key in ("dim", "head_dim", "norm_eps", "rope_theta", "rope_fraction", "longrope", "sliding_window"):
        assert getattr(got["config"], key) == getattr(source.config, key), key
    # The adopted model is the exported one: same evaluation as the source model itself.
    trainer = trainer_for(single)
    tokens = trainer.loader.batch_at(0).tokens[:2]
    with torch.no_grad():
        torch.testing.assert_close(trainer.model(tokens), source.eval()(tokens))
    assert run_ranks(4, eval_losses, config)[0]["eval"] == pytest.approx(got["eval"], rel=1e-5)


def test_init_from_refuses_a_conflicting_model_key(small_dataset, tmp_path):
    folder, _ = hf_folder(tmp_path)
    config = dataclasses.replace(small_config(small_dataset, tmp_path / "run"), init_from=str(folder))
    with pytest.raises(ConfigError, match=r"model\.dim=64 conflicts with init_from=.*dim=96"):
        trainer_for(config)


def test_an_explicit_model_key_equal_to_its_default_still_conflicts_with_init_from(tmp_path):
    """What counts is what the user wrote, not whether it differs from the default: `model.rope_theta=10000`
    (the default) next to a folder with 500000 is refused naming both; left unwritten, the folder's is adopted."""
    from common.config import from_dict
    from training.model_setup import resolve_model_config

    folder, _ = hf_folder(tmp_path)
    written = from_dict(PhiConfig, {"rope_theta": PhiConfig().rope_theta}, where="model")
    with pytest.raises(ConfigError, match=r"model\.rope_theta=10000.0 conflicts with init_from=.*rope_theta=500000.0"):
        resolve_model_config(written, str(folder), SMALL_VOCAB, SMALL_SEQ_LEN)
    adopted = resolve_model_config(from_dict(PhiConfig, {}, where="model"), str(folder), SMALL_VOCAB, SMALL_SEQ_LEN)
    assert adopted.rope_theta == 500000.0


def test_vocab_and_length_default_to_the_dataset(small_dataset, tmp_path):
    config = small_config(small_dataset, tmp_path)
    config.model = dataclasses.replace(PhiConfig(), dim=64, n_layers=2)
    model = trainer_for(config).config.model
    manifest = json.loads((small_dataset / "manifest.json").read_text())
    assert (model.vocab_size, model.max_seq_len) == (manifest["vocab_size"], manifest["seq_len"])


def local_param_bytes(config) -> int:
    trainer = trainer_for(config)
    return sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in trainer.model.parameters()
    )


def test_no_rank_materialises_the_whole_model(small_dataset, tmp_path):
    """Under FSDP2 x TP2 every rank allocates about a quarter of the parameters, never all of them."""
    config = small_config(small_dataset, tmp_path, dp=2, tp=2, dp_mode="fsdp")
    full = sum(t.numel() * 4 for t in PhiModel(config.model).parameters())
    per_rank = run_ranks(4, local_param_bytes, config)
    assert max(per_rank) < 0.3 * full and sum(per_rank) == pytest.approx(full, rel=0.02)
