"""Triton kernels against the PyTorch reference: outputs, log-sum-exp and gradients of q, k, v.

On CPU they run under TRITON_INTERPRET=1 (set in conftest), in fp32 with small shapes; the GPU
tests repeat the comparison in bf16 at realistic shapes.
"""

from __future__ import annotations

import pytest
import torch

from kernels.attention import attention
from kernels.flash_gqa import flash_attention, segment_bounds
from kernels.flash_gqa_tuning import CANDIDATES, Tiles, candidates, pick_tiles
from kernels.patterns import S2Pattern, block_lists, block_mask, density
from kernels.reference import reference_attention, reference_s2_attention
from kernels.s2_attention import S2Heads, S2LayerCache, _cached_lists, s2_attention, s2_decode_attention

# fp32 in the interpreter: differences are summation order only.
ATOL, RTOL = 2e-5, 1e-4
GPU = torch.cuda.is_available()


def on_gpu(test):
    """Marked `gpu` (what `make gpu-check` runs) and skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not GPU, reason="needs CUDA")(test))


def inputs(b, s, hq, hkv, d, docs, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, s, h, d, generator=g).to(device, dtype).requires_grad_() for h in (hq, hkv, hkv))
    doc_ids = None
    if docs:
        doc_ids = (torch.rand(b, s, generator=g) < 4 / s).int().cumsum(1).int()
        doc_ids[:, -3:] = -1  # trailing padding, as the packer writes it
        doc_ids = doc_ids.to(device)
    return q, k, v, doc_ids


def compare(out, lse, ref, ref_lse, q, k, v, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, ref_lse, atol=atol, rtol=rtol)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, g, w in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(g, w, atol=atol * 5, rtol=rtol * 5, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize(
    "hq,hkv,d,docs",
    [(4, 4, 64, False), (4, 2, 64, True), (6, 2, 96, True), (4, 1, 128, False)],
    ids=["mha-d64", "gqa2-d64-docs", "gqa3-d96-docs", "mqa-d128"],
)
def test_flash_gqa_matches_reference(hq, hkv, d, docs):
    q, k, v, doc_ids = inputs(2, 80, hq, hkv, d, docs)
    out, lse = flash_attention(q, k, v, doc_ids, block=16, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, doc_ids, return_lse=True)
    compare(out, lse, ref, ref_lse, q, k, v)


PATTERNS = {
    "local1-stride4": S2Pattern(block_size=16, local_blocks=1, vert_stride=4),
    "local2-stride2-offset1": S2Pattern(block_size=16, local_blocks=2, vert_stride=2, head_offset=1),
    "homogeneous": S2Pattern(block_size=16, local_blocks=1, vert_stride=3, homogeneous=True),
    "dense-head1": S2Pattern(block_size=16, local_blocks=1, vert_stride=4, dense_heads=(1,)),
}


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("hq,hkv,docs", [(4, 4, False), (4, 2, True)], ids=["mha", "gqa-docs"])
def test_s2_matches_reference(name, hq, hkv, docs):
    heads = S2Heads(PATTERNS[name], num_kv_heads=hkv)
    q, k, v, doc_ids = inputs(1, 128, hq, hkv, 32, docs, seed=1)
    out, lse = s2_attention(q, k, v, heads, doc_ids, return_lse=True)
    ref, ref_lse = reference_s2_attention(q, k, v, heads.mask(hkv, 128), 16, doc_ids, return_lse=True)
    compare(out, lse, ref, ref_lse, q, k, v)


def test_flash_gqa_fp16_accumulates_in_fp32():
    """fp16 inputs, fp32 accumulation (bf16 runs only on GPU: the interpreter does not emulate it)."""
    q, k, v, doc_ids = inputs(1, 64, 4, 2, 64, docs=True, dtype=torch.float16)
    out, lse = flash_attention(q, k, v, doc_ids, block=16, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, doc_ids, return_lse=True)
    compare(out, lse, ref, ref_lse, q, k, v, atol=4e-3, rtol=4e-3)


def test_s2_tensor_parallel_slice_keeps_its_heads_patterns():
    pattern = S2Pattern(block_size=16, local_blocks=1, vert_stride=4)
    full = block_mask(pattern, num_kv_heads=4, num_blocks=8)
    for rank in range(2):
        part = S2Heads(pattern, num_kv_heads=4, head_start=2 * rank).mask(2, 128)
        assert torch.equal(part, full[2 * rank : 2 * rank + 2])


@pytest.mark.parametrize("hkv,stride", [(4, 4), (8, 4), (8, 8), (16, 8)])
def test_union_of_heads_covers_every_causal_block(hkv, stride):
    """The sharding property, which holds when there are at least as many KV heads as the stride."""
    mask = block_mask(S2Pattern(local_blocks=1, vert_stride=stride), num_kv_heads=hkv, num_blocks=40)
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    assert torch.equal(mask.any(0), causal)
    assert density(mask) < 0.5, "each head alone stays sparse"


def test_union_leaves_gaps_with_fewer_heads_than_stride():
    mask = block_mask(S2Pattern(local_blocks=1, vert_stride=8), num_kv_heads=2, num_blocks=40)
    assert not torch.equal(mask.any(0), torch.ones(40, 40, dtype=torch.bool).tril())


def test_block_lists_equal_the_dense_mask():
    mask = block_mask(S2Pattern(local_blocks=2, vert_stride=4, head_offset=1), num_kv_heads=4, num_blocks=33)
    for m in (mask, mask.transpose(1, 2)):
        index, count = block_lists(m)
        rebuilt = torch.zeros_like(m)
        for h in range(m.shape[0]):
            for row in range(m.shape[1]):
                cols = index[h, row, : count[h, row]]
                assert (cols[1:] > cols[:-1]).all(), "ascending, no repeats"
                rebuilt[h, row, cols.long()] = True
        assert torch.equal(rebuilt, m)


def test_sparse_work_falls_with_density():
    """The kernel's loop count is the list length: the measured share of blocks it computes."""
    for stride, expected_max in [(4, 0.35), (16, 0.12)]:
        mask = block_mask(S2Pattern(local_blocks=2, vert_stride=stride), num_kv_heads=8, num_blocks=256)
        _, count = block_lists(mask)
        assert int(count.sum()) == int(mask.sum())
        assert density(mask) < expected_max


def test_decode_with_kv_cache_matches_last_row_of_prefill():
    heads = S2Heads(S2Pattern(block_size=16, local_blocks=1, vert_stride=3), num_kv_heads=2)
    q, k, v, _ = inputs(2, 100, 4, 2, 32, docs=False, seed=2)
    with torch.no_grad():
        full = reference_s2_attention(q, k, v, heads.mask(2, 100), 16)
        for t in (17, 64, 100):
            step = s2_decode_attention(q[:, t - 1 : t], k[:, :t], v[:, :t], heads)
            torch.testing.assert_close(step, full[:, t - 1 : t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "pattern, head_start, window",
    [
        (S2Pattern(block_size=16, local_blocks=2, vert_stride=4), 0, None),
        (S2Pattern(block_size=16, local_blocks=1, vert_stride=3, head_offset=1), 2, None),
        (S2Pattern(block_size=16, local_blocks=2, vert_stride=4, homogeneous=True), 0, 40),
        (S2Pattern(block_size=16, local_blocks=1, vert_stride=4, dense_heads=(1,)), 0, None),
    ],
    ids=["plain", "offset-tp-slice", "homogeneous-window", "dense-head"],
)
def test_reduced_s2_cache_reads_what_the_full_cache_reads(pattern, head_start, window):
    """Prefill, then decode token by token: the cache that drops blocks no later query can read
    gives exactly the full cache's output at every step, and holds fewer positions."""
    heads = S2Heads(pattern, num_kv_heads=4, head_start=head_start)
    q, k, v, _ = inputs(2, 200, 4, 2, 8, docs=False, seed=4)  # this module: KV heads head_start, head_start + 1
    cache = S2LayerCache(200, heads)
    cache.append(k[:, :37], v[:, :37])
    with torch.no_grad():
        for t in range(38, 201):
            got = cache.decode(q[:, t - 1 : t], k[:, t - 1 : t], v[:, t - 1 : t], window)
            assert torch.equal(got, s2_decode_attention(q[:, t - 1 : t], k[:, :t], v[:, :t], heads, window)), t
    if not pattern.dense_heads:
        assert max(cache.counts) < 200 * (1 / pattern.vert_stride + 0.25)
    assert cache.capacity(200, heads, 2) >= max(cache.counts)


def test_segment_bounds():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 2, -1, -1]])
    start, end = segment_bounds(doc_ids)
    assert start.tolist() == [[0, 0, 2, 2, 2, 5, 6, 6]]
    assert end.tolist() == [[2, 2, 5, 5, 5, 6, 8, 8]]


@pytest.mark.parametrize("backend", ["triton", "sdpa", "reference", "flex"])
def test_backends_agree_on_dense_and_s2(backend):
    """Every backend against the reference: dense and S2, packed documents, with and without a window
    (forward; FlexAttention has no CPU backward, its gradients are checked on a GPU)."""
    heads = S2Heads(S2Pattern(block_size=16, local_blocks=1, vert_stride=2), num_kv_heads=2)
    q, k, v, doc_ids = inputs(2, 64, 4, 2, 32, docs=True, seed=3)
    with torch.no_grad():
        for s2 in (None, heads):
            for window in (None, 24):
                want = attention(q, k, v, doc_ids, backend="reference", s2=s2, window=window)
                got = attention(q, k, v, doc_ids, backend=backend, s2=s2, window=window)
                case = f"s2={s2 is not None} window={window}"
                torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m, case=case: f"{case}: {m}")


def test_masks_are_made_where_the_block_mask_lives_and_fit_flex_tiles():
    """The S2 token mask follows the block mask's device (built on the CPU, it broke the reference and
    the SDPA backend with S2 on the first GPU), and Flex gets a block mask its 128-token tiles divide
    (torch 2.11 on an H200 refused 64-token blocks): smaller S2 blocks are resolved by mask_mod."""
    from kernels.flex import flex_block_mask
    from kernels.patterns import token_mask

    heads = S2Heads(S2Pattern(block_size=16, local_blocks=1, vert_stride=2), num_kv_heads=2)
    assert token_mask(heads.mask(2, 64).to("meta"), 64, 16).device.type == "meta"
    mask = flex_block_mask(None, 256, "cpu", s2_block=heads.mask(2, 256), s2_block_size=16, group=2)
    assert mask.BLOCK_SIZE == (128, 128)


def test_flex_refuses_to_train_on_cpu_and_says_why():
    q, k, v, doc_ids = inputs(1, 32, 4, 2, 32, docs=False)
    with pytest.raises(NotImplementedError, match="FlexAttention has no backward on CPU"):
        attention(q, k, v, backend="flex")


@on_gpu
@pytest.mark.parametrize("s2", [False, True])
def test_gpu_flex_forward_and_backward(s2):
    heads = S2Heads(S2Pattern(block_size=64, local_blocks=4, vert_stride=4), num_kv_heads=4) if s2 else None
    q, k, v, doc_ids = inputs(2, 1024, 16, 4, 64, True, device="cuda", dtype=torch.bfloat16)
    out = attention(q, k, v, doc_ids, backend="flex", s2=heads)
    ref = attention(q, k, v, doc_ids, backend="reference", s2=heads)
    compare(out, out.new_zeros(()), ref, ref.new_zeros(()), q, k, v, atol=2e-2, rtol=2e-2)


@on_gpu
@pytest.mark.parametrize("d", [64, 96, 128])
@pytest.mark.parametrize("docs", [False, True])
def test_gpu_bf16_realistic_shapes(d, docs):
    """bf16 at 4K tokens, tuned tiles (the autotuner runs here), dense and S2, against fp32."""
    q, k, v, doc_ids = inputs(2, 4096, 16, 4, d, docs, device="cuda", dtype=torch.bfloat16)
    out, lse = flash_attention(q, k, v, doc_ids, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, doc_ids, return_lse=True)
    compare(out, lse, ref, ref_lse, q, k, v, atol=2e-2, rtol=2e-2)
    heads = S2Heads(S2Pattern(block_size=64, local_blocks=4, vert_stride=4), num_kv_heads=4)
    out, lse = s2_attention(q, k, v, heads, doc_ids, return_lse=True)
    ref, ref_lse = reference_s2_attention(q, k, v, heads.mask(4, 4096), 64, doc_ids, return_lse=True)
    compare(out, lse, ref, ref_lse, q, k, v, atol=2e-2, rtol=2e-2)


@pytest.mark.slow
def test_kernels_are_opaque_to_torch_compile():
    """torch.compile calls the kernels as custom operators (traced into, Dynamo re-derived every
    Triton launch and failed, on an H100 and in the interpreter) and takes the S2 lists as
    constants: one graph, equal to eager forward and backward, dense and S2 with documents."""
    q, k, v, doc_ids = inputs(1, 128, 4, 2, 16, docs=True, seed=3)
    heads = S2Heads(S2Pattern(block_size=32, local_blocks=1, vert_stride=2), num_kv_heads=2)

    def both(q, k, v, doc_ids):
        return flash_attention(q * 2, k, v, doc_ids, block=32).sin() + s2_attention(q, k, v, heads, doc_ids)

    want = both(q, k, v, doc_ids)
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    got = torch.compile(both, fullgraph=True)(q, k, v, doc_ids)
    got_grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    torch.testing.assert_close(got, want)
    for name, g, w in zip("qkv", got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize(
    "docs,window",
    [
        (True, 1),  # the diagonal alone
        (True, 20),  # a window edge inside tiles, across document boundaries
        (False, 33),  # a window wider than two tiles
        pytest.param(False, 1, marks=pytest.mark.slow),
        pytest.param(False, 20, marks=pytest.mark.slow),
        pytest.param(True, 33, marks=pytest.mark.slow),
    ],
)
def test_sliding_window_matches_reference(docs, window):
    """Dense and S2 kernels under a sliding window (query i reads keys j with i - j < window),
    forward and gradients, with windows shorter than, across and longer than one block."""
    q, k, v, doc_ids = inputs(2, 80, 4, 2, 32, docs, seed=4)
    out, lse = flash_attention(q, k, v, doc_ids, block=16, return_lse=True, window=window)
    ref, ref_lse = reference_attention(q, k, v, doc_ids, return_lse=True, window=window)
    compare(out, lse, ref, ref_lse, q, k, v)
    heads = S2Heads(S2Pattern(block_size=16, local_blocks=1, vert_stride=2), num_kv_heads=2)
    out, lse = s2_attention(q, k, v, heads, doc_ids, return_lse=True, window=window)
    ref, ref_lse = reference_s2_attention(q, k, v, heads.mask(2, 80), 16, doc_ids, return_lse=True, window=window)
    compare(out, lse, ref, ref_lse, q, k, v)
    with torch.no_grad():
        for backend in ("sdpa", "reference"):
            for s2 in (None, heads):
                got = attention(q, k, v, doc_ids, backend=backend, s2=s2, window=window)
                want = attention(q, k, v, doc_ids, backend="triton", s2=s2, window=window)
                torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_window_drops_whole_blocks_from_s2_lists():
    heads = S2Heads(S2Pattern(block_size=16, local_blocks=1, vert_stride=2), num_kv_heads=2)
    full, windowed = heads.mask(2, 256), heads.mask(2, 256, window=40)
    assert (windowed <= full).all() and int(windowed.sum()) < int(full.sum())
    # A block is kept exactly when some query of its row may read some of its keys.
    q_blocks, k_blocks = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    reachable = (q_blocks >= k_blocks) & ((q_blocks - k_blocks) * 16 - 15 < 40)
    assert torch.equal(windowed, full & reachable)


@pytest.mark.parametrize("window", [None, 24])
def test_decode_with_window_matches_last_row_of_prefill(window):
    heads = S2Heads(S2Pattern(block_size=16, local_blocks=1, vert_stride=3), num_kv_heads=2)
    q, k, v, _ = inputs(2, 100, 4, 2, 32, docs=False, seed=5)
    from kernels.attention import decode_attention

    with torch.no_grad():
        for s2 in (None, heads):
            full = attention(q, k, v, backend="reference", s2=s2, window=window)
            for t in (1, 17, 64, 100):
                step = decode_attention(q[:, t - 1 : t], k[:, :t], v[:, :t], s2, window)
                torch.testing.assert_close(step, full[:, t - 1 : t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "offset,length,window,sparse",
    [
        pytest.param(32, 32, None, False, marks=pytest.mark.slow),
        (21, 40, 20, False),
        (48, 32, None, True),
        pytest.param(64, 16, 40, True, marks=pytest.mark.slow),
    ],  # fmt: skip
    ids=["dense-aligned", "dense-unaligned-window", "s2", "s2-window-tail"],
)
def test_query_chunk_at_a_global_offset_equals_those_rows_of_the_whole(offset, length, window, sparse):
    """What context parallelism runs on a rank: queries [offset, offset + length) against the keys
    before them, documents by global position. Output, log-sum-exp and every gradient equal the
    whole sequence's rows (keys after the chunk get none)."""
    q, k, v, doc_ids = inputs(2, 80, 4, 2, 32, docs=True, seed=8)
    end = offset + length
    heads = S2Heads(S2Pattern(block_size=16, local_blocks=1, vert_stride=2), num_kv_heads=2)
    if sparse:
        out, lse = s2_attention(q[:, offset:end], k[:, :end], v[:, :end], heads, doc_ids[:, :end], True, window,
                                q_offset=offset)  # fmt: skip
        ref, ref_lse = reference_s2_attention(q, k, v, heads.mask(2, 80), 16, doc_ids, True, window)
    else:
        out, lse = flash_attention(q[:, offset:end], k[:, :end], v[:, :end], doc_ids[:, :end], block=16,
                                   return_lse=True, window=window, q_offset=offset)  # fmt: skip
        ref, ref_lse = reference_attention(q, k, v, doc_ids, return_lse=True, window=window)
    compare(out, lse, ref[:, offset:end], ref_lse[..., offset:end], q, k, v)


def test_query_offsets_that_cannot_work_are_refused():
    q, k, v, _ = inputs(1, 64, 4, 2, 32, docs=False)
    with pytest.raises(ValueError, match="need keys there: there are 40"):
        flash_attention(q[:, 16:48], k[:, :40], v[:, :40], q_offset=16)
    heads = S2Heads(S2Pattern(block_size=16, local_blocks=1, vert_stride=2), num_kv_heads=2)
    with pytest.raises(ValueError, match="q_offset 8 must be a multiple of the S2 block size 16"):
        s2_attention(q[:, 8:40], k[:, :40], v[:, :40], heads, q_offset=8)


def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values [b, s, h, d] in another memory layout (a leaf that requires grad)."""
    t = t.detach()
    if layout == "contiguous":
        out = t.contiguous()
    elif layout == "head-major":  # stored [b, h, s, d], viewed back: sequence strides differ
        out = t.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "strided-last-dim":  # every other element of a twice-as-wide buffer
        out = torch.stack([t, torch.zeros_like(t)], dim=-1).flatten(-2)[..., ::2]
    else:
        raise ValueError(layout)
    return out.requires_grad_()


def packed_qkv(q, k, v):
    """q, k and v as slices of one fused [b, s, hq + 2 hkv, d] projection output."""
    hq, hkv = q.shape[2], k.shape[2]
    packed = torch.cat([q, k, v], dim=2).detach().requires_grad_()
    return packed, (packed[:, :, :hq], packed[:, :, hq : hq + hkv], packed[:, :, hq + hkv :])


LAYOUTS = {  # name -> layouts of q, k, v, and the upstream gradient
    "contiguous": ("contiguous", "contiguous", "contiguous", "contiguous"),
    "k-head-major-v-not": ("contiguous", "head-major", "contiguous", "head-major"),
    "v-head-major-k-not": ("head-major", "contiguous", "head-major", "contiguous"),
    "strided-last-dims": ("strided-last-dim", "contiguous", "strided-last-dim", "strided-last-dim"),
    "packed-qkv": ("packed", "packed", "packed", "head-major"),
}


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "s2"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_memory_layout_forward_and_backward(layout, sparse):
    """Every gradient lands in its own tensor's layout (dv used to be written with dk's strides),
    for views the model and users make: transposed storage, non-contiguous last dims, slices of one
    packed qkv tensor, a non-contiguous upstream gradient."""
    q, k, v, doc_ids = inputs(1, 64, 4, 2, 32, docs=True, seed=6)
    q_layout, k_layout, v_layout, grad_layout = LAYOUTS[layout]
    if q_layout == "packed":
        leaves, (q2, k2, v2) = packed_qkv(q, k, v)
    else:
        q2, k2, v2 = (in_layout(t, lay) for t, lay in zip((q, k, v), (q_layout, k_layout, v_layout), strict=True))
        leaves = (q2, k2, v2)
    heads = S2Heads(S2Pattern(block_size=16, local_blocks=1, vert_stride=2), num_kv_heads=2)
    if sparse:
        out, lse = s2_attention(q2, k2, v2, heads, doc_ids, return_lse=True)
        ref, ref_lse = reference_s2_attention(q, k, v, heads.mask(2, 64), 16, doc_ids, return_lse=True)
    else:
        out, lse = flash_attention(q2, k2, v2, doc_ids, block=16, return_lse=True)
        ref, ref_lse = reference_attention(q, k, v, doc_ids, return_lse=True)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    grad = in_layout(torch.randn_like(out), grad_layout).detach()
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    if q_layout == "packed":
        want = (torch.cat(want, dim=2),)
    for name, g, w in zip("qkv" if len(got) == 3 else ["qkv"], got, want, strict=True):
        torch.testing.assert_close(g, w, atol=ATOL * 5, rtol=RTOL * 5, msg=lambda m, name=name: f"d{name}: {m}")


KERNEL_NAMES = ("fwd", "dkdv", "dq")


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("choice", range(max(map(len, CANDIDATES.values()))))
def test_every_tile_configuration_the_autotuner_can_pick(head_dim, choice):
    """Each candidate launch configuration (query/key tiles, warps, stages) of each kernel, dense and
    S2, with packed documents and a partial last tile: equal to the reference, forward and backward."""
    tiles = {name: CANDIDATES[(name, head_dim)][choice % len(CANDIDATES[(name, head_dim)])] for name in KERNEL_NAMES}
    q, k, v, doc_ids = inputs(1, 200, 4, 2, head_dim, docs=True, seed=7)
    out, lse = flash_attention(q, k, v, doc_ids, return_lse=True, tiles=tiles)
    ref, ref_lse = reference_attention(q, k, v, doc_ids, return_lse=True)
    compare(out, lse, ref, ref_lse, q, k, v)
    heads = S2Heads(S2Pattern(block_size=64, local_blocks=1, vert_stride=2), num_kv_heads=2)
    lists = _cached_lists(heads, 2, 4, torch.device("cpu"), None)
    out, lse = flash_attention(q, k, v, doc_ids, lists=lists, block=64, return_lse=True, tiles=tiles)
    ref, ref_lse = reference_s2_attention(q, k, v, heads.mask(2, 200), 64, doc_ids, return_lse=True)
    compare(out, lse, ref, ref_lse, q, k, v)


def test_one_pass_backward_with_atomic_dq_at_an_offset_with_documents_and_a_window():
    """FlashAttention-2's one pass (dQ added from the dK/dV program with fp32 atomics), on a query
    chunk at a global offset, dense and S2: the reference's gradients. Deterministic mode keeps it
    out of the tuner's choices."""
    from kernels.flash_gqa_tuning import backward_plans

    tiles = {"fwd": Tiles(16, 16), "dkdv": Tiles(16, 16, atomic_dq=True), "dq": Tiles(16, 16)}
    q, k, v, doc_ids = inputs(1, 96, 4, 2, 32, docs=True, seed=9)
    ref, ref_lse = reference_attention(q, k, v, doc_ids, return_lse=True, window=40)
    out, lse = flash_attention(q[:, 32:], k, v, doc_ids, return_lse=True, window=40, tiles=tiles, q_offset=32)
    compare(out, lse, ref[:, 32:], ref_lse[..., 32:], q, k, v)
    heads = S2Heads(S2Pattern(block_size=16, local_blocks=1, vert_stride=2), num_kv_heads=2)
    lists = _cached_lists(heads, 2, 6, torch.device("cpu"), None)
    out, lse = flash_attention(q, k, v, doc_ids, lists=lists, block=16, return_lse=True, tiles=tiles)
    ref, ref_lse = reference_s2_attention(q, k, v, heads.mask(2, 96), 16, doc_ids, return_lse=True)
    compare(out, lse, ref, ref_lse, q, k, v)
    two, one = Tiles(64, 32), Tiles(64, 32, atomic_dq=True)
    assert backward_plans(two, two, [one]) == [(two, two), (one,)]
    torch.use_deterministic_algorithms(True)
    try:
        assert backward_plans(two, two, [one]) == [(two, two)]
    finally:
        torch.use_deterministic_algorithms(False)


def test_tuner_times_each_candidate_once_per_shape_and_keeps_the_fastest():
    timed = []
    costs = {Tiles(64, 64): 3.0, Tiles(32, 64): 1.0, Tiles(16, 64): 2.0}

    def timer(run):
        run()
        return costs[timed[-1]]

    options = list(costs)
    picked = pick_tiles("test", ("shape-a",), options, timed.append, tune=True, timer=timer)
    again = pick_tiles("test", ("shape-a",), options, timed.append, tune=True, timer=timer)
    assert picked == again == Tiles(32, 64) and timed == options, "timed once, fastest kept"
    assert pick_tiles("test", ("shape-b",), options, timed.append, tune=False) == options[0]
    one_pass = [Tiles(16, 16, 8, 2, atomic_dq=True), Tiles(16, 16, 4, 1, atomic_dq=True)]
    assert candidates("dkdv", 64, cap=16) == [Tiles(16, 16, 8, 1), Tiles(16, 16, 8, 2), *one_pass], "deduplicated"
    assert candidates("dkdv", 128, cap=16) == [Tiles(16, 16, 8, 2), Tiles(16, 16, 4, 2), one_pass[0]]
    assert any(t.pack_gqa for t in candidates("fwd", 64, cap=128, group=4))
    assert not any(t.pack_gqa for t in candidates("fwd", 64, cap=128, group=3)), "packing needs a power-of-two group"


@pytest.mark.parametrize(
    "head_dims,dtypes",
    [
        # minutes of ahead-of-time compiles: the slow suite and `make compile-report` run them
        pytest.param((64, 128), ("bf16",), marks=pytest.mark.slow),
        pytest.param((64, 96, 128), ("fp16", "bf16"), marks=pytest.mark.slow),
    ],
    ids=["bf16-d64-d128", "all"],
)
def test_every_kernel_variant_compiles_for_sm80_and_sm90_without_spills(head_dims, dtypes, tmp_path):
    """Ahead of time, no GPU: Triton's bundled ptxas builds every variant the model can launch
    (3 kernels x dense/S2 x documents or not x head dims x dtypes x every tile configuration the
    autotuner may pick) for sm_80 and sm_90; none spills or overflows shared memory."""
    import itertools
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "compile.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "kernels.compile_report", "--out", str(out), "--head-dims", *map(str, head_dims),
               "--dtypes", *dtypes]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    assert out.is_file(), result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert result.returncode == 0 and not report["problems"], report["problems"] or result.stderr[-3000:]
    launched = {(r["kernel"], r["sparse"], r["docs"], r["head_dim"], r["dtype"], r["arch"]) for r in report["rows"]}
    flags = (False, True)
    wanted = itertools.product(("fwd", "dkdv", "dq"), flags, flags, head_dims, dtypes, (80, 90))
    assert launched == set(wanted)
    assert all(r["registers"] > 0 and 0 < r["shared_bytes"] <= r["shared_limit"] for r in report["rows"])


def test_compile_report_flags_spills_and_shared_memory_over_the_limit():
    from kernels.compile_report import problems

    row = dict(kernel="dq", sparse=False, docs=True, head_dim=128, dtype="bf16", arch=80, block_m=64, block_n=64)
    row.update(num_warps=8, num_stages=2, registers=255, spill_bytes=0, shared_bytes=1000, shared_limit=166_912)
    assert problems([row]) == []
    found = problems([{**row, "spill_bytes": 8}, {**row, "shared_bytes": 200_000}])
    assert "spills 8 bytes" in found[0] and "needs 200000 bytes of shared memory, sm_80 has 166912" in found[1]


@on_gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("choice", range(max(map(len, CANDIDATES.values()))))
def test_gpu_every_tile_configuration_in_bf16(head_dim, choice):
    tiles = {name: CANDIDATES[(name, head_dim)][choice % len(CANDIDATES[(name, head_dim)])] for name in KERNEL_NAMES}
    q, k, v, doc_ids = inputs(1, 2000, 8, 2, head_dim, docs=True, device="cuda", dtype=torch.bfloat16)
    out, lse = flash_attention(q, k, v, doc_ids, return_lse=True, tiles=tiles)
    ref, ref_lse = reference_attention(q, k, v, doc_ids, return_lse=True)
    compare(out, lse, ref, ref_lse, q, k, v, atol=2e-2, rtol=2e-2)
