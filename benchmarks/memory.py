"""Peak memory per rank against the ideal, for a ladder of model sizes and every parallel layout.

The ideal for a rank is what it must hold: its share of parameters, gradients and AdamW's two
moments (4 + 4 + 8 bytes per parameter in fp32) plus the activations of one micro-batch (estimated
below). Each layout runs as separate processes (gloo on CPU); each rank records its resident set
before the model is built and its peak (VmHWM) after a few training steps, and the table shows
(peak - baseline) / ideal. A ratio near 1 means no rank holds more than its shard; the whole model
on every rank would show up as a ratio near the number of shards.

Also: a Phi-4-mini-shaped model (dim 3072, 24/8 heads, head_dim 128, vocab 200,064, tied, LongRoPE,
partial RoPE 0.75) cut to 4 layers, written as an HF folder in bf16 and trained a few steps from it
under FSDP2 x TP2 on 4 ranks with the lean settings (each linear layer an FSDP unit, the
vocabulary split over DP x TP: `parallel.fsdp_unit=linear`, `parallel.vocab_over_dp=true`).

    python benchmarks/memory.py [--sizes 2,4,8] [--layouts all] [--steps 2] [--skip-phi4]

Prints a table, writes benchmarks/results/memory.json and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.build import BuildConfig, TokenizerConfig, build  # noqa: E402
from data_pipeline.corpus import write_default_corpus  # noqa: E402
from data_pipeline.sources import SourceConfig  # noqa: E402
from tests.distributed import run_ranks  # noqa: E402
from training.config import CheckpointConfig, DataConfig, TrainConfig  # noqa: E402
from training.metrics import peak_rss_bytes  # noqa: E402
from training.models.hf import export_hf  # noqa: E402
from training.models.phi import LongRoPE, PhiConfig, count_params_and_flops  # noqa: E402
from training.objectives import trainer_for  # noqa: E402
from training.parallel.mesh import ParallelConfig  # noqa: E402
from training.parallel.world import return_freed_memory_to_os  # noqa: E402

SEQ_LEN = 64
LAYOUTS = {
    "1 rank": dict(),
    "TP2": dict(tp=2),
    "PP2": dict(pp=2),
    "FSDP2": dict(dp=2, dp_mode="fsdp"),
    "TP2xPP2": dict(tp=2, pp=2),
    "FSDP2xTP2": dict(dp=2, tp=2, dp_mode="fsdp"),
    # FSDP with the lean settings: each linear layer a unit, the vocabulary split over DP x TP
    "FSDP2 lean": dict(dp=2, dp_mode="fsdp", fsdp_unit="linear", vocab_over_dp=True),
    "FSDP2xTP2 lean": dict(dp=2, tp=2, dp_mode="fsdp", fsdp_unit="linear", vocab_over_dp=True),
    "CP2": dict(cp=2),
}
BYTES_PER_PARAM = 4 + 4 + 8  # fp32 weight, gradient, AdamW exp_avg and exp_avg_sq


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def ladder_model(n_layers: int) -> PhiConfig:
    """Phi-3-mini's width (dim 3072, 32 heads, FFN 8192, vocab 32,064) at `n_layers` layers."""
    return PhiConfig.from_preset("phi-3-mini", n_layers=n_layers, max_seq_len=SEQ_LEN)


def phi4_mini_cut() -> PhiConfig:
    preset = PhiConfig.PRESETS["phi-4-mini"]
    pairs = int(128 * 0.75) // 2
    return PhiConfig(
        **{**preset, "n_layers": 4, "max_seq_len": 131072},
        longrope=LongRoPE([1.0] * pairs, [1.0 + i for i in range(pairs)], original_max_seq_len=4096),
        hf_metadata={"torch_dtype": "bfloat16", "bos_token_id": 199999, "eos_token_id": 199999},
    )


def activation_bytes(config: PhiConfig, tokens: int, local_layers: int, local_vocab: int) -> int:
    """fp32 activations one micro-batch keeps for backward: per layer about 12 x dim + 3 x FFN values
    per token (norm inputs, q/k/v, attention output, residuals, SwiGLU's three), plus 3 copies of the
    (local) logits for the loss."""
    return 4 * tokens * (local_layers * (12 * config.dim + 3 * config.ffn_dim) + 3 * local_vocab)


def measure(config: TrainConfig, steps: int) -> dict:
    """On one rank: baseline RSS, build, train, peak RSS, and this rank's ideal."""
    import gc

    return_freed_memory_to_os()  # as `python -m training.pretrain` does on CPU
    gc.collect()
    baseline = rss_bytes()
    t0 = time.perf_counter()
    trainer = trainer_for(config)
    build_s = time.perf_counter() - t0
    params = [p.to_local() if hasattr(p, "to_local") else p for p in trainer.model.parameters()]
    local_params = sum(p.numel() for p in params)
    t0 = time.perf_counter()
    for step in range(steps):
        trainer.train_step(trainer.loader.batch_at(step))
    step_s = (time.perf_counter() - t0) / steps
    peak = peak_rss_bytes()
    mc, pc = trainer.config.model, config.parallel
    local_layers = len(trainer.model.layers)
    has_head = trainer.model.output is not None
    local_vocab = mc.vocab_size // pc.tp if has_head else 0
    tokens = pc.micro_batch_size * SEQ_LEN
    ideal = BYTES_PER_PARAM * local_params + activation_bytes(mc, tokens, local_layers, local_vocab)
    return dict(
        local_params=local_params,
        baseline_gib=baseline / 2**30,
        peak_gib=peak / 2**30,
        used_gib=(peak - baseline) / 2**30,
        ideal_gib=ideal / 2**30,
        ratio=(peak - baseline) / ideal,
        build_s=build_s,
        step_s=step_s,
    )


def world_of(layout: dict) -> int:
    return layout.get("tp", 1) * layout.get("pp", 1) * layout.get("cp", 1) * layout.get("dp", 1)


def global_batch(layout: dict) -> int:
    """Sequences a step: one on a single rank, two per data-parallel replica otherwise."""
    return max(1, layout.get("dp", 1)) * (2 if world_of(layout) > 1 else 1)


def train_config(data: Path, out: Path, model: PhiConfig, layout: dict, init_from: str | None = None) -> TrainConfig:
    return TrainConfig(
        name="memory",
        out_dir=str(out),
        steps=10,
        init_from=init_from,
        model=model,
        parallel=ParallelConfig(micro_batch_size=1, **layout),
        data=DataConfig(path=str(data), global_batch_size=global_batch(layout)),
        checkpoint=CheckpointConfig(resume="none"),
    )


def small_dataset(root: Path) -> Path:
    corpus = root / "corpus"
    write_default_corpus(corpus, docs_per_language=20, seed=0)
    out = root / "data"
    build(
        BuildConfig(
            output_dir=str(out),
            sources=[SourceConfig(paths=[str(corpus / "*.jsonl")])],
            seq_len=SEQ_LEN,
            total_tokens=20_000,
            valid_docs_per_family=2,
            tokenizer=TokenizerConfig(vocab_size=1024),
        )
    )
    return out


def run_layout(data: Path, out: Path, model: PhiConfig, layout: dict, steps: int, init_from=None) -> list[dict]:
    config = train_config(data, out, model, layout, init_from)
    return run_ranks(world_of(layout), measure, config, steps, timeout=1800)


def random_hf_folder(config: PhiConfig, path: Path) -> Path:
    """An HF folder of random bf16 weights, written one safetensors shard at a time."""
    from training.model_setup import meta_model

    shapes = {name: t.shape for name, t in meta_model(config).state_dict().items()}

    def weights(names):
        generator = torch.Generator().manual_seed(len(names))
        return {n: torch.randn(shapes[n], generator=generator, dtype=torch.bfloat16) * 0.02 for n in names}

    return export_hf(weights, config, path, dtype=torch.bfloat16, max_shard_bytes=512 * 2**20)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for layout in LAYOUTS:
        points = sorted((r["params"], r["worst_ratio"]) for r in rows if r["layout"] == layout)
        if points:
            ax.plot([p / 1e9 for p, _ in points], [q for _, q in points], marker="o", label=layout)
    ax.axhline(1.3, color="grey", linestyle="--", label="target 1.3")
    ax.set_xlabel("parameters (billions)")
    ax.set_ylabel("peak RSS per rank / ideal (worst rank)")
    ax.set_title("Memory per rank against params + grads + AdamW + activations")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2,4,8", help="layer counts of the Phi-3-mini-wide ladder")
    parser.add_argument("--layouts", default="all", help="comma-separated names from: " + ", ".join(LAYOUTS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--skip-phi4", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    parser.add_argument("--name", default="memory", help="the JSON and PNG file names")
    args = parser.parse_args(argv)
    layouts = list(LAYOUTS) if args.layouts == "all" else args.layouts.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = small_dataset(tmp)
        print(f"{'model':>22} {'layout':>10} {'params':>8} {'worst rank':>10} {'peak GiB':>9} {'used GiB':>9} "
              f"{'ideal GiB':>9} {'ratio':>6} {'s/step':>7}")  # fmt: skip
        # (label, the model's config, what the trainer is given, layout, init_from)
        cases = [(f"phi-3-mini width, {n} layers", ladder_model(int(n)), ladder_model(int(n)), layout, None)
                 for n in args.sizes.split(",") for layout in layouts]  # fmt: skip
        if not args.skip_phi4:
            model = phi4_mini_cut()
            # Written by a child process: the parent's memory stays small while the ranks run.
            folder = run_ranks(1, random_hf_folder, model, tmp / "phi4-mini-4layers")[0]
            cases.append(("phi-4-mini, 4 layers, HF", model, PhiConfig(), "FSDP2xTP2 lean", str(folder)))
        for label, model, given, layout, init_from in cases:
            try:
                ranks = run_layout(data, tmp / "runs", given, LAYOUTS[layout], args.steps, init_from)
            except RuntimeError as err:  # a rank killed (out of memory) ends the case, not the benchmark
                reason = str(err).strip().splitlines()[-1][:160]
                rows.append(dict(model=label, layout=layout, failed=reason))
                print(f"{label:>22} {layout:>10} failed: {reason}", flush=True)
                continue
            worst = max(ranks, key=lambda r: r["ratio"])
            params = count_params_and_flops(model, SEQ_LEN)[0]
            batch = global_batch(LAYOUTS[layout])
            row = dict(model=label, layout=layout, params=params, worst_ratio=worst["ratio"], ranks=ranks,
                       global_batch=batch, tokens_per_step=batch * SEQ_LEN)  # fmt: skip
            rows.append(row)
            print(f"{label:>22} {layout:>10} {params / 1e9:7.2f}B {ranks.index(worst):>10} {worst['peak_gib']:9.2f} "
                  f"{worst['used_gib']:9.2f} {worst['ideal_gib']:9.2f} {worst['ratio']:6.2f} {worst['step_s']:7.1f}",
                  flush=True)  # fmt: skip
    result = dict(machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", rows=rows)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    plot([r for r in rows if "phi-3" in r["model"] and "failed" not in r], out / f"{args.name}.png")
    print(f"wrote {out / args.name}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
