"""The layout planner: every layout it proposes runs on the cluster it was given, rejections say
why, memory and time respond to the layout as they must, and bad input is one clear line."""

from __future__ import annotations

import json

import pytest

from training.models.phi import PhiConfig
from training.plan import GIB, PRESETS, Cluster, Layout, main, parse_memory, plan, predict

PHI4 = "configs/pretrain/phi4_mini.yaml"


def h100s(gpus: int) -> Cluster:
    return Cluster(gpus=gpus, gpus_per_node=8, name="h100", **PRESETS["h100"])


def test_memory_sizes_are_read_with_their_units_or_refused_by_name():
    assert parse_memory("80GiB") == 80 * GIB and parse_memory("141GB") == 141 * 10**9
    assert parse_memory("81920 MiB") == 80 * GIB and parse_memory("0.5T") == 5 * 10**11
    with pytest.raises(ValueError, match="cannot read GPU memory '80 gigs'"):
        parse_memory("80 gigs")


def test_every_proposed_layout_divides_the_model_and_the_cluster():
    model = PhiConfig.from_preset("phi-4-mini")
    feasible, rejected = plan(model, h100s(64), 4096, 512)
    assert feasible and rejected
    for p in feasible:
        lay = p.layout
        assert lay.tp * lay.pp * lay.cp * lay.dp == 64 and lay.tp <= 8
        assert model.n_heads % lay.tp == 0 and model.n_kv_heads % lay.tp == 0 and lay.pp <= model.n_layers
        assert (512 // lay.dp) % lay.micro_batch == 0 and p.memory["total"] <= h100s(64).memory_bytes
    assert all(p.problem for p in rejected)
    steps = [round(p.time["step"], 6) for p in feasible]  # equal to 6 decimals: the leaner first
    assert steps == sorted(steps), "fastest first"
    reasons = " ".join(p.problem for p in rejected)
    assert "out of memory by" in reasons and "does not divide n_heads=24" in reasons


def test_memory_and_time_respond_to_the_layout():
    model = PhiConfig.from_preset("phi-4-mini")
    cluster = h100s(64)

    def at(**changes):
        base = dict(tp=1, pp=1, cp=1, dp=64, dp_mode="fsdp", micro_batch=2, recompute="none", sequence_parallel=False)
        return predict(model, Layout(**{**base, **changes}), cluster, 4096, 512)

    fsdp, replicated = at(), at(dp_mode="allreduce")
    assert fsdp.memory["model_states"] * 64 == pytest.approx(replicated.memory["model_states"])
    assert at(micro_batch=1).memory["activations"] == pytest.approx(fsdp.memory["activations"] / 2)
    assert at(recompute="full").memory["activations"] < at(recompute="selective").memory["activations"]
    assert at(recompute="full").time["compute"] == pytest.approx(fsdp.time["compute"] * 4 / 3)
    tp2 = at(tp=2, dp=32, sequence_parallel=True)
    assert tp2.time["tp"] > 0 and tp2.memory["activations"] < fsdp.memory["activations"]
    pp4 = at(pp=4, dp=16, dp_mode="allreduce")
    assert pp4.time["bubble"] > 0 and pp4.memory["model_states"] < replicated.memory["model_states"]
    assert fsdp.mfu <= PRESETS["h100"]["efficiency"] + 1e-9


def test_cli_prints_the_best_layouts_and_writes_every_prediction(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main([PHI4, "--gpus", "16", "--top", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "layouts fit" in printed and "| TP" in printed and "rejected" in printed
    written = json.loads(out.read_text())
    assert written["feasible"][0]["step_s"] <= written["feasible"][-1]["step_s"]
    assert all(row["problem"] for row in written["rejected"])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--gpus", "8", "--gpu", "b300"], "unknown GPU preset 'b300'"),
        (["--gpus", "8", "--gpu-memory", "eighty"], "cannot read GPU memory 'eighty'"),
        (["--gpus", "1", "--gpu-memory", "16GiB"], "even fully sharded over 1 GPUs of 16.0 GiB; use more GPUs"),
    ],
    ids=["unknown-preset", "bad-memory", "too-small"],
)
def test_bad_input_is_one_clear_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([PHI4, *args])
    assert exit_.value.code in (1, 2)
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_parallel_auto_is_a_config_word_and_picks_a_layout_the_world_can_run(tmp_path):
    from common.config import load_config
    from training.config import TrainConfig
    from training.parallel.mesh import LayoutError, ParallelDims
    from training.plan import choose_layout

    config = load_config(TrainConfig, "configs/pretrain/tiny.yaml", ["parallel=auto"])
    assert config.parallel.auto
    cpu = Cluster(gpus=4, gpus_per_node=4, memory_bytes=4 * GIB, peak_tflops=0.1, efficiency=0.5,
                  intra_node_gbps=2.0, inter_node_gbps=1.0, name="cpu-gloo")  # fmt: skip
    chosen, recompute, note = choose_layout(config, config.model, 128, 4, cpu)
    dims = ParallelDims.from_config(chosen, 4)
    dims.check_model(config.model.n_heads, config.model.n_kv_heads, config.model.n_layers, config.model.vocab_size)
    assert recompute in ("none", "selective", "full") and note.startswith("parallel: auto chose TP")
    assert (config.data.global_batch_size // dims.dp) % chosen.micro_batch_size == 0
    dpo = load_config(TrainConfig, "configs/pretrain/tiny.yaml", ["parallel=auto", "objective=dpo"])
    assert choose_layout(dpo, dpo.model, 128, 4, cpu)[0].cp == 1, "DPO refuses context parallel"
    with pytest.raises(LayoutError, match="parallel: auto found no layout of 4 cpu-gloo ranks.*out of memory by"):
        choose_layout(config, PhiConfig.from_preset("phi-4-mini"), 4096, 4, cpu)


def recorded_benchmark(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_model_predicts_the_recorded_cpu_peaks_within_ten_percent():
    """Against every raw per-rank measurement kept in docs/measurements (fp32 CPU runs of
    benchmarks/memory.py): every layout it runs at three model sizes or more."""
    memory_model = recorded_benchmark("memory_model")
    rows = memory_model.compare(memory_model.RECORDED)
    layouts = {"1 rank", "TP2", "PP2", "TP2xPP2", "FSDP2", "FSDP2xTP2", "FSDP2 lean", "FSDP2xTP2 lean", "CP2"}
    for layout in layouts:
        assert len({r["model"] for r in rows if r["layout"] == layout}) >= 3, layout
    for r in rows:
        assert abs(r["error"]) < 0.10, r


def test_the_cpu_step_time_model_orders_the_recorded_layouts_beyond_their_noise():
    """The planner's CPU variant against the recorded CPU step times: per model with 8 layouts or more,
    Kendall's tau of at least 0.6, and no two layouts measured in the same run ordered the other way
    round when they were further apart than one layout's spread between two runs (about 40% here)."""
    step_time_model = recorded_benchmark("step_time_model")
    rows = step_time_model.with_predictions(step_time_model.measured_rows(step_time_model.RECORDED))
    compared = [a for a in step_time_model.rank_agreement(rows) if a["layouts"] >= 8]
    assert len(compared) >= 3
    for a in compared:
        assert a["tau"] >= 0.6, a
        assert all(p["gap"] < 0.4 for p in a["swapped"] if p["same_run"]), a
