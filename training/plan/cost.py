"""The planner's cost model: one layout's memory per GPU and step time, predicted from the model,
the layout and the cluster alone (`python -m training.plan`, training/plan/cli.py, prints them).

Memory per GPU (bytes), for the rank holding the most:
- model states: fp32 weights, fp32 gradients and AdamW's two fp32 moments, 16 bytes per parameter
  of the rank's share (its pipeline stage's layers, 1/TP of each matrix and of the vocabulary);
  FSDP divides them by DP and adds its unit's buffers at their peak, three copies (the gathered
  weights, the prefetched neighbour's and the unsharded gradients; once resharded, the neighbour's,
  the gradients and the reduce-scatter input), or the vocabulary table's when
  larger (unless it is split over DP); under PP the whole stage's, gathered with unsharded gradients
  (the schedule syncs gradients on the last micro-batch only);
- activations of the micro-batches in flight (1F1B: min(PP, micro-batches) on the first stage),
  per token and layer in bf16: `ACT_VALUES` below, split by TP where the tensor is, by CP over the
  sequence; selective recompute drops the attention core's, full recompute keeps only each
  block's input (plus one block's during its recompute);
- the vocabulary head's logits on the last stage: bf16 logits + fp32 log-softmax + fp32 gradient;
- a fixed `RESERVED` for the CUDA context, NCCL buffers and allocator slack.
Step time: compute = training FLOPs (`count_params_and_flops`, S2 layers' attention scaled by their
pattern's computed share; +1 forward of the recomputed part)
/ (GPUs x peak x `Cluster.efficiency`), stretched by the pipeline bubble; plus TP all-reduces (4 per
layer and micro-batch) on NVLink, CP K/V all-gathers, pipeline sends, and the DP gradient
all-reduce where it does not hide behind the backward (FSDP: all-gather twice and reduce-scatter per
micro-batch without PP, once per step with it, hidden behind all compute).
Every collective costs alpha + bytes / bandwidth as a ring does; each micro-batch pays a fixed
launch overhead per layer; the optimizer step reads and writes every local state at the memory's
bandwidth. Each assumption is a named constant or a `Cluster` field; docs/scaling.md writes them
next to the numbers they drive. CPU ranks under gloo (`cpu_cluster`) compute in fp32 on cores their
node's ranks share, and their collectives do not overlap compute.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import asdict, dataclass

from kernels.bench import counted_density
from training.models.phi import PhiConfig, count_params_and_flops

GIB = 2**30
RESERVED = 3 * GIB  # CUDA context (~0.5 GiB), NCCL buffers, allocator fragmentation
BYTES_MODEL_STATE = 4 + 4 + 8  # fp32 weight, gradient, AdamW exp_avg + exp_avg_sq
MICRO_BATCHES = (1, 2, 4, 8)
RECOMPUTE = ("none", "selective", "full")
MAX_BUBBLE = 0.5  # a layout idling more than this in its pipeline bubble is rejected
OPTIMIZER_BYTES = 7 * 4  # fused AdamW: reads weight, gradient and both moments, writes weight and moments
_density = functools.cache(counted_density)


@dataclass(frozen=True)
class Cluster:
    """The machines: GPU count and memory, dense bf16 peak, the fraction of it the model's matmuls
    reach (measured), and per-GPU link bandwidths (GB/s, one direction) and latencies (us)."""

    gpus: int
    gpus_per_node: int
    memory_bytes: int
    peak_tflops: float
    efficiency: float
    intra_node_gbps: float
    inter_node_gbps: float
    intra_latency_us: float = 3.0
    inter_latency_us: float = 10.0
    # per layer and micro-batch, forward and backward: kernel launches and Python (about 30 kernels
    # of a few us each); what makes fewer, larger micro-batches faster at equal FLOPs
    overhead_per_layer_us: float = 100.0
    name: str = "custom"
    # the optimizer step reads and writes every local model state (`OPTIMIZER_BYTES` a parameter)
    memory_gbps: float = 3350.0
    precision: str = "bf16"  # what activations, gathers and collectives carry: bf16 (GPUs) | fp32 (CPU runs)
    overlap: bool = True  # DP/FSDP traffic runs beside compute (GPU streams); gloo on CPU shares the cores
    # more CPU ranks than cores: a rank idle in the pipeline bubble leaves its core to a busy one
    bubble_reclaimed: bool = False
    reserved_bytes: int = RESERVED

    @property
    def value_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4


# Dense bf16 peaks from NVIDIA's data sheets (H100 SXM5: 989 TFLOP/s, 80 GB; H200 SXM: 989, 141 GB;
# A100 SXM4: 312, 80 GB); NVLink 4 is 900 GB/s bidirectional per H100/H200 (450 each way), NVLink 3
# 600 (300); one 400 Gb/s NDR InfiniBand NIC per H100/H200 (50 GB/s), 200 Gb/s HDR per A100 (25).
# Efficiency, of the matmuls: the compiled SDPA step measured on an H100 for the 1.2B model at 4K
# (0.1508 s, MFU 51.1%; docs/benchmarks.md, gpu-check:mfu) less what this model adds beside compute
# (its optimizer step, 10.1 ms, and launch overhead, 2.4 ms): 55.7%. The A100's is assumed equal.
# Memory bandwidth from the same data sheets: H100 SXM5 3.35 TB/s, H200 4.8 TB/s, A100 SXM4 80GB 2.04 TB/s.
PRESETS = {
    "h100": dict(memory_bytes=80 * 10**9, peak_tflops=989.0, efficiency=0.557, intra_node_gbps=450.0,
                 inter_node_gbps=50.0, memory_gbps=3350.0),
    "h200": dict(memory_bytes=141 * 10**9, peak_tflops=989.0, efficiency=0.557, intra_node_gbps=450.0,
                 inter_node_gbps=50.0, memory_gbps=4800.0),
    "a100": dict(memory_bytes=80 * 10**9, peak_tflops=312.0, efficiency=0.557, intra_node_gbps=300.0,
                 inter_node_gbps=25.0, memory_gbps=2039.0),
}  # fmt: skip


# CPU ranks under gloo (`cpu_cluster`), fit to the CPU step times benchmarks/memory.py recorded on this
# project's 2-core machine (benchmarks/step_time_model.py --fit, 32 rows; docs/benchmarks.md): one core's
# fp32 rate at the model's matmuls, how a rank's rate grows with its threads (x threads^exponent), one
# core's memory streaming (the optimizer step and weight reads; first-touch page faults included: these
# runs measure two steps) and gloo's throughput, which the node's ranks share.
CPU_CORE_GFLOPS = 43.8
CPU_THREAD_EXPONENT = 0.37
CPU_CORE_MEMORY_GBPS = 2.5
GLOO_GBPS = 0.46
CPU_RESERVED = int(0.35 * GIB)  # gloo buffers and the allocator's slack, read off the 1-rank and TP2 peaks


def cpu_cluster(ranks: int, ranks_per_node: int, memory_bytes: int, cores: int, core_gflops: float = CPU_CORE_GFLOPS,
                thread_exponent: float = CPU_THREAD_EXPONENT, memory_gbps: float = CPU_CORE_MEMORY_GBPS,
                gloo_gbps: float = GLOO_GBPS) -> Cluster:  # fmt: skip
    """CPU ranks under gloo: the ranks of a node split its `cores` (each takes cores / ranks threads, as
    `training.parallel.world.limit_cpu_threads` sets) and gloo's throughput; a rank streams memory at
    one core's rate (less when ranks outnumber cores); they compute in fp32, and their collectives
    take the same cores (no overlap)."""
    threads = cores / ranks_per_node
    gflops = core_gflops * (threads**thread_exponent if threads >= 1 else threads)
    return Cluster(gpus=ranks, gpus_per_node=ranks_per_node, memory_bytes=memory_bytes,
                   peak_tflops=gflops / 1e3, efficiency=1.0, intra_node_gbps=gloo_gbps / ranks_per_node,
                   inter_node_gbps=gloo_gbps / ranks_per_node, intra_latency_us=50.0, inter_latency_us=100.0,
                   overhead_per_layer_us=0.0, name="cpu-gloo",
                   memory_gbps=memory_gbps * min(1.0, threads), precision="fp32", overlap=False,
                   bubble_reclaimed=ranks_per_node > cores, reserved_bytes=CPU_RESERVED)  # fmt: skip


def parse_memory(text: str) -> int:
    """'80GiB', '80 GB', '141G', '81920MiB' -> bytes (G/GB: 10^9, GiB: 2^30)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read GPU memory {text!r}: write a number and a unit, e.g. 80GiB or 141GB")
    number, prefix, binary = match.groups()
    power = " KMGT".index(prefix.upper() or " ")
    return int(float(number) * ((1024 if binary else 1000) ** power))


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    cp: int
    dp: int
    dp_mode: str  # allreduce | fsdp
    micro_batch: int
    recompute: str
    sequence_parallel: bool
    fsdp_unit: str = "block"  # block | linear: what FSDP gathers at once
    vocab_over_dp: bool = False  # the embedding and head split over DP x TP, never gathered

    def name(self) -> str:
        parts = [f"TP{self.tp}" + ("+SP" if self.sequence_parallel else ""), f"PP{self.pp}", f"CP{self.cp}",
                 f"{'FSDP' if self.dp_mode == 'fsdp' else 'DP'}{self.dp}"]  # fmt: skip
        return " x ".join(parts) + f", mb {self.micro_batch}, recompute {self.recompute}"


@dataclass
class Prediction:
    layout: Layout
    memory: dict[str, float]  # bytes per GPU by part, and "total"
    time: dict[str, float]  # seconds per step by part, and "step"
    tokens_per_s: float
    mfu: float
    comm_bytes: dict[str, float]  # bytes per GPU per step by collective
    problem: str | None = None

    def row(self) -> dict:
        return {"layout": self.layout.name(), **asdict(self.layout), "memory_gib": self.memory["total"] / GIB,
                "step_s": self.time["step"], "tokens_per_s": self.tokens_per_s, "mfu": self.mfu,
                "memory": self.memory, "time": self.time, "comm_bytes": self.comm_bytes,
                "problem": self.problem}  # fmt: skip


def act_values(model: PhiConfig, tp: int, sp: bool, recompute: str) -> float:
    """Activation values one token keeps per layer for the backward (bf16): the norm inputs and the
    residual stream (dim each, split by TP only under sequence parallel), q, k, v and the attention
    output (split by TP), the attention core's (its output and log-sum-exp; dropped by selective
    recompute), SwiGLU's gate, up and product (3 x FFN, split by TP)."""
    kv = model.n_kv_heads * model.head_dim
    q = model.n_heads * model.head_dim
    replicated = 4 * model.dim / (tp if sp else 1)
    split = (q + 2 * kv + q + 3 * model.ffn_dim) / tp
    core = (q + model.n_heads) / tp
    if recompute == "full":
        return model.dim / (tp if sp else 1)  # the block's input
    return replicated + split + (0 if recompute == "selective" else core)


def layer_params(model: PhiConfig) -> float:
    """Parameters of one block (matrices and norms), from `count_params_and_flops`'s count."""
    nparams, _ = count_params_and_flops(model, model.max_seq_len)
    tables = model.vocab_size * model.dim * (1 if model.tie_embeddings else 2)
    return (nparams - tables - model.dim) / model.n_layers


def stage_params(model: PhiConfig, pp: int, tp: int) -> int:
    """Parameters on the rank holding the most: its stage's layers, 1/TP of the matrices, and the
    embedding (first stage) or head (last stage; tied: both ends hold the table)."""
    table = model.vocab_size * model.dim
    ends = table if pp > 1 or model.tie_embeddings else 2 * table
    return int((math.ceil(model.n_layers / pp) * layer_params(model) + ends) / tp)


def executed_flops_per_token(model: PhiConfig, seq_len: int) -> float:
    """Training FLOPs per token as counted by `count_params_and_flops`, with each S2 layer's attention
    scaled by the share of causal blocks its pattern computes (`counted_density`, the kernels' lists)."""
    _, flops = count_params_and_flops(model, seq_len)
    sparse_layers = sum(model.is_sparse(i) for i in range(model.n_layers))
    if not sparse_layers:
        return flops
    density = _density(model.s2, seq_len, model.n_kv_heads)
    attention_per_layer = 12 * model.n_heads * model.head_dim * seq_len
    return flops - sparse_layers * attention_per_layer * (1 - density)


def memory_per_rank(
    model: PhiConfig,
    layout: Layout,
    seq_len: int,
    micro_batches: int,
    precision: str = "bf16",
    reserved: int = RESERVED,
) -> dict[str, float]:
    """Bytes the fullest rank holds at its peak, by part ("total" their sum). `precision`: bf16
    (autocast activations, FSDP gathering bf16 weights) or fp32 (the CPU runs of benchmarks/memory.py)."""
    tp, pp, cp, dp = layout.tp, layout.pp, layout.cp, layout.dp
    act_bytes, weight_bytes = (2, 2) if precision == "bf16" else (4, 4)
    mb, sp = layout.micro_batch, layout.sequence_parallel
    local_tokens = mb * seq_len // cp
    layers = math.ceil(model.n_layers / pp)
    fsdp = layout.dp_mode == "fsdp" and dp > 1
    states = stage_params(model, pp, tp) * BYTES_MODEL_STATE / (dp if fsdp else 1)
    gathered = 0.0
    if fsdp:
        q = model.n_heads * model.head_dim
        largest_matrix = model.dim * max(model.ffn_dim, q)
        unit = (layer_params(model) if layout.fsdp_unit == "block" else largest_matrix) / tp
        # While a unit's backward runs: its gathered weights, the prefetched neighbour's and its unsharded
        # gradients (in the weights' dtype); then, resharded (FSDP2 reshards before it reduces), the
        # neighbour's, the gradients and the fp32 reduce-scatter input they are copied into.
        gathered = unit * (2 * weight_bytes + max(weight_bytes, 4))
        if not layout.vocab_over_dp:  # the vocabulary table is a unit of its own, gathered with its gradient
            gathered = max(gathered, model.vocab_size * model.dim / tp * (weight_bytes + 4 + 4))
        # Under PP the schedule keeps the stage's weights gathered and its gradients unsharded until the
        # last micro-batch.
        if pp > 1:
            gathered = max(gathered, stage_params(model, pp, tp) * (weight_bytes + 4))
    in_flight = min(pp, micro_batches)
    activations = act_values(model, tp, sp, layout.recompute) * act_bytes * local_tokens * layers * in_flight
    if layout.recompute == "full":  # one block rebuilt at a time during its backward
        activations += act_values(model, tp, sp, "none") * act_bytes * local_tokens
    kv_gathered = 2 * seq_len * mb * model.n_kv_heads * model.head_dim / tp * act_bytes if cp > 1 else 0
    logits = local_tokens * model.vocab_size / tp * (act_bytes + 4 + 4)
    memory = {"model_states": states, "fsdp_gathered": gathered, "activations": activations,
              "cp_kv": kv_gathered, "logits": logits, "reserved": reserved}  # fmt: skip
    memory["total"] = sum(memory.values())
    return memory


def ring(bytes_: float, n: int, gbps: float, latency_us: float, factor: float = 2.0) -> float:
    """A ring collective among n ranks: all-reduce factor 2, all-gather / reduce-scatter 1."""
    if n <= 1:
        return 0.0
    return factor * (n - 1) / n * bytes_ / (gbps * 1e9) + factor * (n - 1) * latency_us * 1e-6


def predict(model: PhiConfig, layout: Layout, cluster: Cluster, seq_len: int, global_batch: int) -> Prediction:
    """Memory per GPU and step time of one layout (see the module docstring for the model)."""
    tp, pp, cp, dp = layout.tp, layout.pp, layout.cp, layout.dp
    mb = layout.micro_batch
    micro_batches = global_batch // dp // mb
    layers = math.ceil(model.n_layers / pp)
    params = stage_params(model, pp, tp)
    fsdp = layout.dp_mode == "fsdp"
    memory = memory_per_rank(model, layout, seq_len, micro_batches, cluster.precision, cluster.reserved_bytes)
    value = cluster.value_bytes

    tokens = global_batch * seq_len
    flops_per_token = executed_flops_per_token(model, seq_len)
    extra = {"none": 0.0, "selective": 0.03, "full": 1 / 3}[layout.recompute]  # recomputed forward share
    peak = cluster.peak_tflops * 1e12
    flop_time = flops_per_token * tokens * (1 + extra) / (cluster.gpus * peak * cluster.efficiency)
    # Roofline: each micro-batch also streams the stage's weights from memory (the forward and the two
    # backward matmuls) and accumulates fp32 gradients; few tokens a micro-batch (CPU runs) make that
    # the bound, a GPU micro-batch of thousands of tokens is bound by its FLOPs.
    streaming = micro_batches * params * (3 * value + 8) / (cluster.memory_gbps * 1e9)
    compute = max(flop_time, streaming)
    v = 1
    bubble = (pp - 1) / (v * micro_batches + pp - 1) if pp > 1 and not cluster.bubble_reclaimed else 0.0
    compute_with_bubble = compute / (1 - bubble)
    intra, inter = cluster.intra_node_gbps, cluster.inter_node_gbps
    lat_in, lat_out = cluster.intra_latency_us, cluster.inter_latency_us
    hidden_bytes = mb * seq_len // cp * model.dim * value
    tp_time = micro_batches * layers * 4 * ring(hidden_bytes, tp, intra, lat_in)
    # CP ranks sit next to TP ranks; on a node while tp x cp fits in it
    cp_link = (intra, lat_in) if tp * cp <= cluster.gpus_per_node else (inter, lat_out)
    kv_bytes = 2 * mb * seq_len * model.n_kv_heads * model.head_dim / tp * value
    cp_time = micro_batches * layers * 2 * ring(kv_bytes, cp, *cp_link, factor=1.0)  # gather fwd, scatter bwd
    pp_link = (intra, lat_in) if tp * cp * dp * pp <= cluster.gpus_per_node else (inter, lat_out)
    pp_time = 2 * micro_batches * (hidden_bytes / tp / (pp_link[0] * 1e9) + pp_link[1] * 1e-6) if pp > 1 else 0.0
    dp_link = (intra, lat_in) if tp * cp * dp <= cluster.gpus_per_node else (inter, lat_out)
    grad_bytes = params * 4
    # FSDP without PP gathers each unit in the forward and again in the backward and reduce-scatters its
    # gradients, every micro-batch (training/parallel/data.py reshards after forward; the trainer
    # reduce-scatters per micro-batch); under PP the schedule keeps the weights gathered and syncs
    # gradients on the last micro-batch. The next unit is prefetched, so it overlaps all compute.
    # With `vocab_over_dp` the embedding and head stay split over DP x TP: never gathered or reduced.
    units = layers * layer_params(model) / tp if layout.vocab_over_dp else params
    fsdp_rounds = micro_batches if pp == 1 else 1
    fsdp_gathers = 2 if pp == 1 else 1
    fsdp_bytes = fsdp_rounds * (fsdp_gathers * units * value + units * 4)
    if fsdp:
        gather = ring(units * value, dp, *dp_link, factor=1.0)
        dp_comm = fsdp_rounds * (fsdp_gathers * gather + ring(units * 4, dp, *dp_link, factor=1.0))
        hidden_behind = compute
    else:
        dp_comm = ring(grad_bytes, dp, *dp_link)
        hidden_behind = compute * 2 / 3  # the backward
    dp_exposed = max(0.0, dp_comm - hidden_behind) if cluster.overlap else dp_comm
    overhead = micro_batches * layers * cluster.overhead_per_layer_us * 1e-6
    local_states = params / (dp if fsdp else 1)
    optimizer = local_states * OPTIMIZER_BYTES / (cluster.memory_gbps * 1e9)
    time = {"compute": compute, "bubble": compute_with_bubble - compute, "tp": tp_time, "cp": cp_time,
            "pp": pp_time, "dp_exposed": dp_exposed, "overhead": overhead, "optimizer": optimizer}  # fmt: skip
    time["step"] = sum(time.values())
    model_flops = flops_per_token * tokens
    comm = {"tp": micro_batches * layers * 4 * 2 * hidden_bytes if tp > 1 else 0.0,
            "cp": micro_batches * layers * 2 * kv_bytes if cp > 1 else 0.0,
            "pp": 2 * micro_batches * hidden_bytes / tp if pp > 1 else 0.0,
            "dp": (fsdp_bytes if fsdp else 2 * grad_bytes) if dp > 1 else 0.0}  # fmt: skip
    return Prediction(layout, memory, time, tokens / time["step"], model_flops / (time["step"] * cluster.gpus * peak),
                      comm)  # fmt: skip
