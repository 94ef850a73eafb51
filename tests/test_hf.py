"""HF round trip: our model -> transformers Phi3 folder -> logits match -> back into ours."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.distributed import run_ranks
from tests.test_parallel import small_config
from training.config import CheckpointConfig
from training.export import main as export_main
from training.model_setup import load_model_weights
from training.models.hf import export_hf, import_hf
from training.models.phi import PhiConfig, PhiModel
from training.objectives import trainer_for

# fp32 on CPU; the two models differ only in summation order.
LOGITS_ATOL = 1e-4


@pytest.mark.parametrize("overrides", [dict(), dict(rope_fraction=0.75, tie_embeddings=True)], ids=["phi3", "phi4mini"])
def test_export_import_round_trip(overrides, tmp_path):
    from transformers import Phi3ForCausalLM

    torch.manual_seed(0)
    config = PhiConfig(
        vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=32, **overrides
    )
    ours = PhiModel(config).eval()
    export_hf(ours.state_dict(), config, tmp_path / "hf")
    theirs = Phi3ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens = torch.randint(0, 96, (2, 32))
    with torch.no_grad():
        diff = (ours(tokens) - theirs(tokens).logits).abs().max()
    assert diff < LOGITS_ATOL, f"max abs logits diff {diff:.2e}"

    imported_config, state = import_hf(tmp_path / "hf")
    assert imported_config.rope_fraction == config.rope_fraction and imported_config.n_kv_heads == 2
    back = PhiModel(imported_config)
    back.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(back(tokens), ours(tokens))


def evaluate_only(config) -> dict:
    return trainer_for(config).evaluate()


def test_checkpoint_exports_and_any_layout_starts_from_it(small_dataset, tmp_path):
    from transformers import Phi3ForCausalLM

    config = dataclasses.replace(small_config(small_dataset, tmp_path / "run"), steps=2)
    trainer = trainer_for(config)
    trainer.fit()
    trained_eval = trainer.evaluate()
    checkpoint = config.run_dir / "checkpoints" / "step_00000002"
    assert export_main([str(checkpoint), "torch", str(tmp_path / "model.pt")]) == 0
    assert export_main([str(checkpoint), "hf", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()

    state = load_model_weights(checkpoint, config.model)
    torch.testing.assert_close(state, trainer.model.state_dict())
    tokens = trainer.loader.batch_at(0).tokens[:2]
    with torch.no_grad():
        hf_logits = Phi3ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)(tokens).logits
        assert (hf_logits - trainer.model(tokens)).abs().max() < LOGITS_ATOL

    fresh = dict(out_dir=str(tmp_path / "fresh"), checkpoint=CheckpointConfig(resume="none"))
    from_torch = dataclasses.replace(config, init_from=str(tmp_path / "model.pt"), **fresh)
    from_hf = dataclasses.replace(
        small_config(small_dataset, tmp_path / "fresh", tp=2, pp=2),
        init_from=str(tmp_path / "hf"),
        checkpoint=CheckpointConfig(resume="none"),
    )
    for got in (evaluate_only(from_torch), run_ranks(4, evaluate_only, from_hf)[0]):
        assert got == pytest.approx(trained_eval, rel=1e-5)
