"""python -m kernels.compile_report [--head-dims ...] [--dtypes ...] [--archs ...] [--out FILE]

Compiles every attention kernel variant the model can launch for real GPUs, ahead of time and
without one: Triton lowers each to PTX and its bundled ptxas to a cubin for sm_80 (A100) and sm_90
(H100); the bundled cuobjdump reads registers and local memory (spills) per thread, Triton's
metadata the shared memory per block. Prints a table, writes JSON, and exits 1 when a variant
spills or needs more shared memory than its architecture has. No GPU or CUDA driver is needed.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

# Largest dynamic shared memory one block may use (bytes): A100 163 KB, H100 227 KB.
SHARED_LIMIT = {80: 166_912, 90: 232_448}
KERNELS = {"fwd": "kernels.flash_gqa_fwd:fwd_kernel", "dkdv": "kernels.flash_gqa_bwd:bwd_dkdv_kernel",
           "dq": "kernels.flash_gqa_bwd:bwd_dq_kernel"}  # fmt: skip
TENSOR_ARGS = {"Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV"}  # in the activation dtype
FLOAT_ARGS = {"LSE": "*fp32", "DELTA": "*fp32", "DQ_ACC": "*fp32", "sm_scale": "fp32"}
INDEX_ARGS = {"DOC", "SEG_START", "SEG_END", "BLOCK_IDX", "BLOCK_CNT"}  # int32 tensors


@dataclass(frozen=True)
class Variant:
    kernel: str  # fwd | dkdv | dq
    sparse: bool  # S2 block lists, or dense causal
    docs: bool  # packed documents
    head_dim: int
    dtype: str  # fp16 | bf16
    arch: int  # 80 | 90
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    pack_gqa: bool = False
    atomic_dq: bool = False  # the one-pass backward (dK/dV kernel adding dQ with atomics)
    s2_block: int = 64  # S2's default block size
    group: int = 4  # query heads per KV head


def variants(head_dims, dtypes, archs, docs=(False, True), kernels=tuple(KERNELS)) -> list[Variant]:
    """Every launch the model can make: each kernel, dense and S2, with and without documents, and
    every tile configuration the autotuner may pick for the head dim (fitted under the S2 block)."""
    import triton

    from kernels.flash_gqa_tuning import candidates

    found = []
    for kernel, sparse, has_docs, d, dtype, arch in itertools.product(
        kernels, (False, True), docs, head_dims, dtypes, archs
    ):
        cap = 64 if sparse else 128
        for t in candidates(kernel, triton.next_power_of_2(d), cap, group=Variant.group):
            found.append(Variant(kernel, sparse, has_docs, d, dtype, arch, t.block_m, t.block_n, t.num_warps,
                                 t.num_stages, t.pack_gqa, t.atomic_dq, s2_block=cap))  # fmt: skip
    return found


def _signature(fn, dtype: str) -> tuple[dict, dict]:
    """Triton types for every argument, and the constexpr values, of one kernel."""
    names = list(inspect.signature(fn.fn).parameters)
    types = {}
    for name in names:
        if name in TENSOR_ARGS:
            types[name] = f"*{dtype}"
        elif name in FLOAT_ARGS:
            types[name] = FLOAT_ARGS[name]
        elif name in INDEX_ARGS:
            types[name] = "*i32"
        elif name.isupper():
            types[name] = "constexpr"
        else:
            types[name] = "i32"  # strides, lengths, head counts, the window
    return types, names


def _resources(cubin: bytes) -> dict:
    """Registers, local memory (spills) and static shared memory per thread, read by cuobjdump."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", out))
    return {key.lower(): int(value) for key, value in found.items()}


def compile_variant(variant: Variant) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = KERNELS[variant.kernel].split(":")
    fn = getattr(importlib.import_module(module), name)
    types, names = _signature(fn, variant.dtype)
    constants = {
        "GROUP": variant.group,
        "HAS_DOC": variant.docs,
        "SPARSE": variant.sparse,
        "S2_BLOCK": variant.s2_block,
        "BLOCK_M": variant.block_m,
        "BLOCK_N": variant.block_n,
        "BLOCK_D": triton.next_power_of_2(variant.head_dim),
    }
    if variant.kernel == "fwd":
        constants["PACK_GQA"] = variant.pack_gqa
    if variant.kernel == "dkdv":
        constants["ATOMIC_DQ"] = variant.atomic_dq
    # As the JIT specializes a typical launch: aligned pointers, and strides, lengths and head dim
    # that are multiples of 16 (sequence lengths of 16k tokens; head dims 64, 96, 128).
    aligned = {
        (i,): [["tt.divisibility", 16]] for i, name in enumerate(names) if types[name] in ("i32",) or "*" in types[name]
    }
    for heads in {"num_q_heads", "num_kv_heads", "grid_heads"} & set(names):  # head counts: 8, 24, 32, ...
        aligned.pop((names.index(heads),))
    source = ASTSource(fn=fn, signature=types, constexprs={(names.index(k),): v for k, v in constants.items()},
                       attrs=aligned)  # fmt: skip
    start = time.perf_counter()
    options = {"num_warps": variant.num_warps, "num_stages": variant.num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", variant.arch, 32), options=options)
    resources = _resources(compiled.asm["cubin"])
    shared = compiled.metadata.shared + resources.get("shared", 0)
    return {
        **asdict(variant),
        "registers": resources["reg"],
        "spill_bytes": resources.get("local", 0) + resources.get("stack", 0),
        "shared_bytes": shared,
        "shared_limit": SHARED_LIMIT[variant.arch],
        "compile_s": round(time.perf_counter() - start, 2),
    }


def problems(rows: list[dict]) -> list[str]:
    """What would hurt on the GPU: spills to local memory, or more shared memory than a block gets."""
    found = []
    for r in rows:
        tiles = f"{r['block_m']}x{r['block_n']} w{r['num_warps']} s{r['num_stages']}"
        tiles += " packed-GQA" * r.get("pack_gqa", False) + " atomic-dQ" * r.get("atomic_dq", False)
        name = (
            f"{r['kernel']} sparse={r['sparse']} docs={r['docs']} d={r['head_dim']} {r['dtype']} sm_{r['arch']} {tiles}"
        )
        if r["spill_bytes"]:
            found.append(f"{name}: spills {r['spill_bytes']} bytes per thread to local memory")
        if r["shared_bytes"] > r["shared_limit"]:
            limit = f"sm_{r['arch']} has {r['shared_limit']}"
            found.append(f"{name}: needs {r['shared_bytes']} bytes of shared memory, {limit}")
    return found


def tile_name(r: dict) -> str:
    """64x32, with p for packed GQA and a for the atomic-dQ backward."""
    return f"{r['block_m']}x{r['block_n']}" + "p" * r["pack_gqa"] + "a" * r.get("atomic_dq", False)


def print_table(rows: list[dict]) -> None:
    header = f"{'kernel':6s} {'sparse':6s} {'docs':5s} {'d':>4s} {'dtype':5s} {'arch':6s} {'tiles':>8s} {'w':>2s} "
    print(header + f"{'s':>2s} {'regs':>5s} {'spill B':>8s} {'smem KB':>8s} {'limit KB':>8s}")
    for r in rows:
        print(
            f"{r['kernel']:6s} {r['sparse']!s:6s} {r['docs']!s:5s} {r['head_dim']:4d} {r['dtype']:5s} "
            f"{'sm_' + str(r['arch']):6s} {tile_name(r):>8s} "
            f"{r['num_warps']:2d} "
            f"{r['num_stages']:2d} {r['registers']:5d} {r['spill_bytes']:8d} "
            f"{r['shared_bytes'] / 1024:8.1f} {r['shared_limit'] / 1024:8.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.compile_report", description=__doc__)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 96, 128])
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=["fp16", "bf16"])
    parser.add_argument("--archs", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT))
    parser.add_argument("--docs", choices=["both", "yes", "no"], default="both", help="packed-document variants")
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--out", default="benchmarks/results/kernel_compile.json")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter does not compile")
    from tqdm import tqdm

    docs = {"both": (False, True), "yes": (True,), "no": (False,)}[args.docs]
    todo = variants(args.head_dims, args.dtypes, args.archs, docs, args.kernels)
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        rows = list(tqdm(pool.map(compile_variant, todo), total=len(todo), desc="compile", unit="variant"))
    print_table(rows)
    found = problems(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "problems": found}, indent=2))
    print(f"wrote {args.out}: {len(rows)} variants, {len(found)} problems")
    for line in found:
        print(f"problem: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
