"""MFU of a ~1B-parameter Phi-style model on one GPU: bf16 autocast over fp32 weights, AdamW.

    python benchmarks/mfu.py [--attn-backend triton flash_attn sdpa flex] [--modes eager compiled] [--out FILE]
    python benchmarks/mfu.py --smoke      # the same loop on the CPU with a toy model (checks the path)
    python benchmarks/mfu.py --seq-len 32768 --batch 1 --s2-stride 16 --attn-backend triton

`--s2-stride N`: the model's layers alternate dense and S2 (block 64, local window 16 blocks,
stride N), and one more row runs the same model all dense on `--dense-baseline` (SDPA): each S2 row
gives its step-time speed-up over that row of the same mode (the end-to-end row of issue 34; its
target is >= 2x at 32K). MFU counts dense attention FLOPs, so for S2 rows compare step times.

MFU = training FLOPs per token (6 per matmul weight + attention, `count_params_and_flops`, as
torchtitan counts) x tokens per second / the device's dense bf16 peak. Each attention backend is
measured in the same run, on the same model and batches, eagerly and with each block compiled
(torch.compile). Target: >= 45% at seq 4096 on an H100. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.files import atomic_write_text  # noqa: E402
from kernels.patterns import S2Pattern  # noqa: E402
from training.metrics import device_peak_tflops  # noqa: E402
from training.models.phi import PhiConfig, PhiModel, count_params_and_flops  # noqa: E402
from training.parallel.transforms import apply_activation_checkpointing, apply_compile  # noqa: E402
from training.precision import autocast  # noqa: E402

# ~1.2B parameters: 24 layers of width 2048, 16 query / 4 KV heads of 128, SwiGLU 5632, Phi-3's vocab.
ONE_B = dict(vocab_size=32064, dim=2048, n_layers=24, n_heads=16, n_kv_heads=4, ffn_dim=5632)
TOY = dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)


def measure(config: PhiConfig, batch: int, steps: int, warmup: int, device: str, precision: str, ac: str,
            compile_blocks: bool) -> dict:  # fmt: skip
    """Median step time of forward, backward and AdamW on random tokens."""
    torch.manual_seed(0)
    model = PhiModel(config).to(device)
    apply_activation_checkpointing(model, ac)
    if compile_blocks:
        apply_compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    tokens = torch.randint(0, config.vocab_size, (batch, config.max_seq_len + 1), device=device)
    times = []
    for step in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast(precision, device):
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    nparams, flops_per_token = count_params_and_flops(config, config.max_seq_len)
    step_s = statistics.median(times)
    tokens_per_s = batch * config.max_seq_len / step_s
    peak = device_peak_tflops() if device == "cuda" else None
    return {
        "attn_backend": config.attn_backend,
        "layers": layers_name(config),
        "compiled": compile_blocks,
        "params": nparams,
        "seq_len": config.max_seq_len,
        "batch": batch,
        "step_s": step_s,
        "tokens_per_s": tokens_per_s,
        "tflops": flops_per_token * tokens_per_s / 1e12,
        "mfu": flops_per_token * tokens_per_s / (peak * 1e12) if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }


def layers_name(config: PhiConfig) -> str:
    if config.s2 is None:
        return "dense"
    return f"dense+S2/{config.s2.vert_stride}" if config.dense_every else f"S2/{config.s2.vert_stride}"


def add_speedups(rows: list[dict]) -> None:
    """Each S2 row's step-time speed-up over the all-dense row of the same mode (compiled or not)."""
    dense = {r["compiled"]: r for r in rows if r.get("layers") == "dense" and "error" not in r}
    for r in rows:
        if r.get("layers", "dense") != "dense" and "error" not in r and r["compiled"] in dense:
            base = dense[r["compiled"]]
            r["speedup_vs_dense"] = base["step_s"] / r["step_s"]
            r["dense_baseline"] = base["attn_backend"]


def print_table(rows: list[dict]) -> None:
    columns = ("backend", "layers", "compiled", "params", "seq", "batch", "step s", "tok/s", "TFLOP/s", "MFU",
               "vs dense")  # fmt: skip
    print(" ".join(f"{c:>9s}" for c in columns))
    for r in rows:
        if "error" in r:
            print(f"{r['attn_backend']:>9s} {r.get('layers', ''):>9s} {r['compiled']!s:>9s} error: {r['error']}")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        speedup = f"{r['speedup_vs_dense']:.2f}x" if "speedup_vs_dense" in r else ""
        cells = (r["attn_backend"], r["layers"], r["compiled"], f"{r['params'] / 1e9:.2f}B", r["seq_len"], r["batch"],
                 f"{r['step_s']:.3f}", f"{r['tokens_per_s']:.0f}", f"{r['tflops']:.1f}", mfu, speedup)  # fmt: skip
        print(" ".join(f"{c!s:>9s}" for c in cells))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="benchmarks/mfu.py", description=__doc__)
    parser.add_argument("--attn-backend", nargs="+", default=["triton", "flash_attn", "sdpa", "flex"])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--activation-checkpointing", default="none", choices=["none", "selective", "full"])
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"],
                        help="run each backend eagerly and/or with torch.compile on each block")  # fmt: skip
    parser.add_argument("--s2-stride", type=int, default=None, help="layers alternate dense and S2 at this stride")
    parser.add_argument("--dense-baseline", default="sdpa", help="backend of the all-dense row (with --s2-stride)")
    parser.add_argument("--out", default="benchmarks/results/mfu.json")
    parser.add_argument("--smoke", action="store_true", help="a toy model on the CPU in fp32 (checks the path)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        parser.error("no CUDA device: the MFU benchmark needs a GPU (--smoke runs its CPU path)")
    if cuda:
        shape, seq_len, backends = ONE_B, args.seq_len, args.attn_backend
        run = dict(batch=args.batch, steps=args.steps, warmup=args.warmup, device="cuda", precision="bf16")
        block, local = 64, 16
    else:
        shape, seq_len, backends, args.modes = TOY, 64, ["sdpa", "triton"], ["eager"]
        run = dict(batch=1, steps=2, warmup=1, device="cpu", precision="fp32")
        block, local = 16, 1
    models = [(backend, None) for backend in backends]
    if args.s2_stride:
        pattern = S2Pattern(block_size=block, local_blocks=local, vert_stride=args.s2_stride)
        models = [(args.dense_baseline, None)] + [(backend, pattern) for backend in backends]
    name = torch.cuda.get_device_name() if cuda else "cpu (smoke: toy model, fp32, no MFU)"
    result = {"device": name, "peak_tflops": device_peak_tflops() if cuda else None, "rows": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = result["rows"]
    for mode, (backend, pattern) in itertools.product(args.modes, models):
        config = PhiConfig(**shape, max_seq_len=seq_len, attn_backend=backend, s2=pattern, dense_every=2)
        compiled = mode == "compiled"
        try:
            rows.append(measure(config, **run, ac=args.activation_checkpointing, compile_blocks=compiled))
        except Exception as err:  # flash-attn missing, out of memory, ...: the others still run
            error = f"{type(err).__name__}: {err}"[:300]
            rows.append({"attn_backend": backend, "layers": layers_name(config), "compiled": compiled, "error": error})
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        add_speedups(rows)
        atomic_write_text(out, json.dumps(result, indent=2))  # after each backend: a cut run keeps them
    print_table(rows)
    print(f"wrote {out} ({name})")
    return result


if __name__ == "__main__":
    main()
