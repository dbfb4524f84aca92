"""One decode step's attention in one kernel: write the new token's K/V into the cache, then attend.

Per layer and step, a decode otherwise runs a copy of the query out of the QKV projection's
output, two scatters that write K and V into the cache, and the attention kernel. Here one
program per (slot, head) reads its query, key and value straight from the projection's output
[B, 3, N, D], stores the key and value at the slot's position (the caches are aliased to the
outputs, so XLA updates them in place), and runs an online softmax over the older positions,
adding the new one from registers.

Below MIN_PROGRAMS rows that is too few programs for the GPU, each walking a whole context, so the
older positions are cut into runs (flash-decoding): program (b, h, j) walks the j-th run and
writes its partial max, sum and output, and a small XLA fusion merges them with the new token. On
an H200 at ~1,000 tokens of context this took GPT-2 medium at batch 2 from 1.107 to 0.896 ms/step
and at batch 8 from 1.153 to 1.087 (BENCHMARKS.md session 13).

Why Pallas (its Triton lowering) and not a @triton.jit kernel through jax-triton, as the other
kernels here: Pallas emits XLA's own Triton custom call, which XLA compiles itself and launches
back to back with its fusions. jax-triton's call is a legacy custom call that XLA cannot capture in
its command buffers. On an H200 (benchmarks/launch_cost.py, BENCHMARKS.md session 11), in a chain
of kernels inside a jitted loop, a no-op jax-triton launch costs 4.4 us against 0.8 us for an XLA
or Pallas one (a loop whose body is a single Pallas kernel still costs ~2x an XLA one); in a
GPT-2 medium decode step the GPU idled ~4.6 us around each of the 24 jax-triton attention calls,
~110 us a step. Both lowerings go through Triton.

For 16-bit caches the scores and the V sum are dots of a 16-row copy of the query (as
decode_attention.py's tl.dot variant: Triton pipelines the loads that feed a dot); other dtypes
use exact elementwise float32 sums. The softmax denominator sums the probabilities as rounded for
the V product, so numerator and denominator agree.

Layout: qkv [B, 3, N, D] (query, key, value of one token per slot), k_cache / v_cache [B, N, S, D],
positions [B] int32, each >= 0. Slot b's token goes to position p = min(positions[b], S - 1) (a
position past the cache is clamped, as lax.dynamic_update_slice clamps it in the XLA path), and it
attends to positions [0, p]. Negative positions are outside the contract: dynamic_update_slice
would wrap them (p + S), this kernel clips them to 0; the engine never passes one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from ._dispatch import check_head_dim, over_mesh, resolve_impl
from ._flash import LOG2E, MIN_PROGRAMS, merge_partials, splits_per_row
from .decode_attention import decode_attention_reference, one_16bit_dtype

MMA_ROWS = 16  # a dot's smallest M: the query is copied to 16 rows, row 0 kept


def _walk(q, k_in_ref, v_in_ref, b, h, pos, lo, hi, *, scale_log2, block_s, mma):
    """Online softmax of one (slot, head) row's query over cache blocks [lo, hi) (positions < pos
    live): the base-2 running max m, the sum l and the unnormalised float32 output acc [D]. No block
    walked: m = -inf, l = 0, acc = 0."""
    f32 = jnp.float32
    cdt = k_in_ref.dtype
    d = q.shape[0]
    offs = jnp.arange(block_s)
    rows = MMA_ROWS if mma else 1
    if mma:
        q_rd = jnp.broadcast_to(q.astype(cdt)[None, :], (rows, d))
    else:
        q_rd = q.astype(f32)[None, :]

    def step(i, carry):
        m, l, acc = carry  # [rows], [rows], [rows, D]
        start = pl.multiple_of(i * block_s, block_s)
        live = start + offs < pos
        # [block_s, D]; blocks end inside the cache. Rows past pos are stale and may hold anything:
        # they are not loaded but read as 0. A masked load, not a select after the load: in a GPT-2
        # medium step at batch 32 and ~1,000 tokens this kernel took 36.0 us a layer against 36.8
        # (H200, BENCHMARKS.md session 21).
        mask = jnp.broadcast_to(live[:, None], (block_s, d))
        k = plgpu.load(k_in_ref.at[b, h, pl.ds(start, block_s), :], mask=mask, other=0)
        v = plgpu.load(v_in_ref.at[b, h, pl.ds(start, block_s), :], mask=mask, other=0)
        if mma:
            s = jax.lax.dot_general(q_rd, k, (((1,), (1,)), ((), ())), preferred_element_type=f32)
        else:
            s = jnp.sum(k.astype(f32)[None, :, :] * q_rd[:, None, :], axis=2)  # [1, block_s]
        s = jnp.where(live[None, :], s * scale_log2, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))  # finite: every block walked holds a live position
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        if mma:
            p = p.astype(cdt)
            pv = jax.lax.dot_general(p, v, (((1,), (0,)), ((), ())), preferred_element_type=f32)
        else:
            pv = jnp.sum(p[:, :, None] * v.astype(f32)[None, :, :], axis=1)
        return m_new, l * alpha + jnp.sum(p.astype(f32), axis=1), acc * alpha[:, None] + pv

    init = (jnp.full((rows,), -jnp.inf, f32), jnp.zeros((rows,), f32), jnp.zeros((rows, d), f32))
    m, l, acc = jax.lax.fori_loop(lo, hi, step, init)
    if mma:  # every row holds the same values: keep row 0
        first = jnp.arange(rows) == 0
        return (jnp.max(jnp.where(first, m, -jnp.inf)), jnp.sum(jnp.where(first, l, 0.0)),
                jnp.sum(jnp.where(first[:, None], acc, 0.0), axis=0))
    return jnp.max(m), jnp.sum(l), jnp.sum(acc, axis=0)


def _kernel(pos_ref, qkv_ref, k_in_ref, v_in_ref, o_ref, k_ref, v_ref, *, scale_log2, block_s, cache_len, mma):
    # k_in_ref and k_ref (v likewise) are one buffer on the GPU, the input aliased to the output:
    # older positions are read through the input, the new one is stored through the output
    f32 = jnp.float32
    b, h = pl.program_id(0), pl.program_id(1)
    pos = jnp.clip(pos_ref[b], 0, cache_len - 1)  # older positions: [0, pos)
    q = qkv_ref[b, 0, h, :]
    k_new = qkv_ref[b, 1, h, :].astype(k_in_ref.dtype)
    v_new = qkv_ref[b, 2, h, :].astype(k_in_ref.dtype)
    m, l, acc = _walk(q, k_in_ref, v_in_ref, b, h, pos, 0, (pos + block_s - 1) // block_s,
                      scale_log2=scale_log2, block_s=block_s, mma=mma)
    # the new token, at position pos, from registers (its cache row is written below)
    s_new = jnp.sum(q.astype(f32) * k_new.astype(f32)) * scale_log2
    m_all = jnp.maximum(m, s_new)
    alpha = jnp.exp2(m - m_all)  # 0 when there is no older position (m = -inf)
    p_new = jnp.exp2(s_new - m_all)
    acc = acc * alpha + p_new * v_new.astype(f32)
    l = l * alpha + p_new  # >= 1
    o_ref[b, h, :] = (acc / l).astype(o_ref.dtype)
    k_ref[b, h, pos, :] = k_new
    v_ref[b, h, pos, :] = v_new


def _split_kernel(pos_ref, qkv_ref, k_in_ref, v_in_ref, o_ref, m_ref, l_ref, k_ref, v_ref, *, scale_log2, block_s,
                  cache_len, splits, mma):
    # flash-decoding: program (b, h, j) walks the j-th of `splits` runs of whole blocks of the slot's
    # older positions and writes its partial (acc, m, l); the merge, with the new token, is _merge's
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    pos = jnp.clip(pos_ref[b], 0, cache_len - 1)
    blocks = (pos + block_s - 1) // block_s
    per = (blocks + splits - 1) // splits  # runs follow the slot's length, not the cache's: balanced
    lo = jnp.minimum(j * per, blocks)
    hi = jnp.minimum(lo + per, blocks)
    m, l, acc = _walk(qkv_ref[b, 0, h, :], k_in_ref, v_in_ref, b, h, pos, lo, hi,
                      scale_log2=scale_log2, block_s=block_s, mma=mma)
    o_ref[b, h, j, :] = acc
    m_ref[b, h, j] = m
    l_ref[b, h, j] = l

    @pl.when(j == 0)  # another run may load position pos in its last block, masked: no race matters
    def _():
        k_ref[b, h, pos, :] = qkv_ref[b, 1, h, :].astype(k_ref.dtype)
        v_ref[b, h, pos, :] = qkv_ref[b, 2, h, :].astype(v_ref.dtype)


def _merge(qkv, o, m, l, *, scale_log2, cache_dtype):
    """The runs' partials o [B, N, P, D], m / l [B, N, P] and the new token (scored from qkv [B, 3, N, D],
    its key and value rounded to the cache's dtype as stored) merged into the output [B, N, D] in qkv's
    dtype: one small XLA fusion after the kernel (_flash.merge_partials, decode_attention's merge, with
    the token as one more partial)."""
    f32 = jnp.float32
    q = qkv[:, 0].astype(f32)
    k_new, v_new = (qkv[:, i].astype(cache_dtype).astype(f32) for i in (1, 2))
    s_new = jnp.sum(q * k_new, axis=-1) * scale_log2  # [B, N]; finite, so the merged max is too
    return merge_partials(o, m, l, new=(s_new, v_new)).astype(qkv.dtype)


def uses_mma(qkv, k_cache, v_cache) -> bool:
    """The dot variant: query, key and value all of one 16-bit dtype (decode_attention.py's rule)."""
    return one_16bit_dtype(qkv, k_cache, v_cache)


@functools.partial(jax.jit, static_argnames=("scale", "block_s", "splits", "num_warps", "num_stages", "interpret"))
def _decode_append_pallas(qkv, k_cache, v_cache, positions, *, scale, block_s, splits, num_warps, num_stages,
                          interpret):
    b, n, s, d = k_cache.shape
    if splits is None:
        splits = default_splits(b * n, s, block_s)
    mma = uses_mma(qkv, k_cache, v_cache)
    extra = {}
    if not interpret:
        extra["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    caches = (jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype), jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype))
    args = (positions.astype(jnp.int32), qkv, k_cache, v_cache)
    scale_log2 = scale * LOG2E
    if splits == 1:
        kernel = functools.partial(_kernel, scale_log2=scale_log2, block_s=block_s, cache_len=s, mma=mma)
        return pl.pallas_call(kernel, out_shape=(jax.ShapeDtypeStruct((b, n, d), qkv.dtype), *caches), grid=(b, n),
                              input_output_aliases={2: 1, 3: 2}, interpret=interpret, **extra)(*args)
    kernel = functools.partial(_split_kernel, scale_log2=scale_log2, block_s=block_s, cache_len=s, splits=splits,
                               mma=mma)
    f32 = jnp.float32
    parts = (jax.ShapeDtypeStruct((b, n, splits, d), f32), jax.ShapeDtypeStruct((b, n, splits), f32),
             jax.ShapeDtypeStruct((b, n, splits), f32))
    o, m, l, k_cache, v_cache = pl.pallas_call(kernel, out_shape=(*parts, *caches), grid=(b, n, splits),
                                               input_output_aliases={2: 3, 3: 4}, interpret=interpret,
                                               **extra)(*args)
    return _merge(qkv, o, m, l, scale_log2=scale_log2, cache_dtype=k_cache.dtype), k_cache, v_cache


def check_step_shapes(qkv, k_cache, v_cache, positions, block_s: int | None = None):
    if k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} must both be [B, N, S, D]")
    b, n, s, d = k_cache.shape
    if qkv.shape != (b, 3, n, d):
        raise ValueError(f"qkv has shape {qkv.shape}; expected [B, 3, N, D] = {(b, 3, n, d)}")
    if positions.shape != (b,):
        raise ValueError(f"positions has shape {positions.shape}; expected [B] = {(b,)}")
    if block_s is not None and (block_s < 16 or block_s & (block_s - 1) or s % block_s):
        raise ValueError(f"block_s={block_s} must be a power of two >= 16 dividing the cache length {s}")


# 32 positions a loop step, 4 warps, 3 stages: the fastest of 9 settings at both shapes of
# benchmarks/bench_kernels.py --kernels append --sweep on an H200 (BENCHMARKS.md session 11): per
# step in a chain, 48.5 us against 54.5 with blocks of 64 at GPT-2 medium's batch 32 and context
# 992, 124.1 against 145.2 at batch 32, context 2,048 and GPT-2 XL's 25 heads.
DEFAULT_BLOCK_S = 32


def default_block(cache_len: int) -> int:
    """DEFAULT_BLOCK_S cache positions a loop step, or 16 where that does not divide the cache."""
    return DEFAULT_BLOCK_S if cache_len % DEFAULT_BLOCK_S == 0 else 16


# Below MIN_PROGRAMS (slot, head) rows (_flash's, the decode_attention kernel's min_programs too)
# the older positions are cut into runs, one program each, until there are about that many programs
# (flash-decoding): with a program per row, a batch-1 step is a dozen or two programs, each walking
# its whole context while most of the GPU idles. Each run keeps at least MIN_RUN_BLOCKS blocks of the
# cache (decode_attention's chunks go down to one).
MIN_RUN_BLOCKS = 2


def default_splits(rows: int, cache_len: int, block_s: int) -> int:
    """Runs per row for `rows` (slot, head) rows on one device over a cache of cache_len positions."""
    return splits_per_row(rows, cache_len // block_s // MIN_RUN_BLOCKS)


def fits(cache_len: int, head_dim: int) -> bool:
    """Whether the kernel takes this cache: a multiple of 16 positions, and a head dim the Triton
    kernels take (_dispatch.check_head_dim: a power of two >= 16)."""
    try:
        check_head_dim(head_dim)
    except ValueError:
        return False
    return cache_len % 16 == 0


def decode_append_attention(
    qkv: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    positions: jax.Array,
    *,
    scale: float,
    impl: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
    block_s: int | None = None,
    splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Write each slot's new K/V and attend with its query: returns (out [B, N, D] in qkv's dtype,
    k_cache, v_cache) with the caches updated (in place under jit when the old ones are dead, as in a
    decode loop's carry).

    qkv [B, 3, N, D]; positions [B] >= 0; slot b's token goes to position p = min(positions[b], S - 1)
    and attends to [0, p]. Softmax in float32. impl: "auto" (the kernel on a GPU, else the reference), "triton"
    (the kernel) or "xla". interpret: run the kernel through Pallas' interpreter (CPU tests).
    block_s: cache positions per loop step, a power of two >= 16 dividing S (None: default_block(S)).
    splits: programs per (slot, head) row, each walking a run of the older positions, their partials
    merged after the kernel (None: default_splits of one device's rows; 1: no merge).
    With a mesh, slots split over "data" and heads over "tensor"."""
    if block_s is None:
        block_s = default_block(k_cache.shape[2])
    check_step_shapes(qkv, k_cache, v_cache, positions, block_s)
    if splits is not None and (not isinstance(splits, int) or isinstance(splits, bool) or splits < 1):
        raise ValueError(f"splits={splits!r} must be an int >= 1 (or None: chosen from the rows)")
    if interpret or resolve_impl(impl) == "triton":
        check_head_dim(k_cache.shape[3])
        fn = functools.partial(_decode_append_pallas, scale=float(scale), block_s=block_s, splits=splits,
                               num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    else:
        fn = functools.partial(decode_append_reference, scale=float(scale))
    cache = P("data", "tensor", None, None)
    return over_mesh(fn, mesh, (P("data", None, "tensor", None), cache, cache, P("data")),
                     (P("data", "tensor", None), cache, cache), qkv, k_cache, v_cache, positions)


def decode_append_reference(qkv, k_cache, v_cache, positions, *, scale):
    """Plain JAX, same contract: per-row dynamic_update_slice, then decode_attention_reference."""
    s = k_cache.shape[2]

    def put(cache_nsd, new_nd, p):
        return jax.lax.dynamic_update_slice(cache_nsd, new_nd[:, None, :].astype(cache_nsd.dtype), (0, p, 0))

    pos = jnp.clip(positions.astype(jnp.int32), 0, s - 1)
    k_cache = jax.vmap(put)(k_cache, qkv[:, 1], pos)
    v_cache = jax.vmap(put)(v_cache, qkv[:, 2], pos)
    out = decode_attention_reference(qkv[:, 0], k_cache, v_cache, pos + 1, scale=scale).astype(qkv.dtype)
    return out, k_cache, v_cache

