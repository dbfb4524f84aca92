"""Decode attention (one new query per slot against its KV cache), flash-decoding style.

With enough (slot, head) rows to fill the GPU, one program takes a whole row and writes its
output. With fewer, the key axis of each row is cut into chunks handled by different programs;
each writes its unnormalised output with its running max and sum, and a small JAX step merges
the chunks. Reading K and V once is the whole cost: the kernel is bound by memory bandwidth.
For 16-bit caches the scores and the weighted sum of V are tl.dot products of a 16-row copy of
the query: the MMA wastes 15 rows of arithmetic, but Triton pipelines the loads that feed a
tl.dot (num_stages), and that is what brings the reads near the copy rate.

Layout: q [B, N, D], k_cache / v_cache [B, N, S, D] (slot, head, cache position, head dim),
lengths [B] int32; slot b attends to positions [0, lengths[b]).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl
from jax.sharding import PartitionSpec as P

from ._dispatch import (
    check_head_dim,
    from_torch,
    interpreted,
    jax_triton,
    over_mesh,
    resolve_impl,
    to_torch,
)
from ._flash import LOG2E, MIN_PROGRAMS, merge_partials, splits_per_row


@dataclasses.dataclass(frozen=True)
class DecodeTiles:
    """Tile sizes: block_s cache positions per loop step, chunk positions per program.

    chunk None: one chunk per (slot, head) row, so no merge step, unless there are fewer than
    min_programs rows; then the cache is cut into chunks of whole blocks until there are that many
    programs (or one block per program).
    The defaults come from measurements on an H200 (BENCHMARKS.md, session 10):
    - per call inside a chain, GPT-2 medium's batch-32 decode at context 992 took 43.5 us with
      these tiles, against 47.9 for XLA's attention and 56.8 for the earlier elementwise kernel
      in 256-key chunks (benchmarks/bench_kernels.py --sweep);
    - end to end, one chunk per row beat two at 256 and 384 rows: GPT-2 medium at batch 16 decoded
      at 1.032 against 1.154 ms/step, GPT-2 small at batch 32 at 0.549 against 0.626
      (benchmarks/decode.py). "auto" runs this kernel only from 256 rows (engine/gpt.py).
    """

    block_s: int = 64
    chunk: int | None = None
    num_warps: int = 4
    num_stages: int = 3
    mma: bool = True  # tl.dot over a 16-row copy of the query, for 16-bit caches (fp32 keeps exact sums)
    min_programs: int = MIN_PROGRAMS  # _flash's rule, which decode_append's runs follow too

    def __post_init__(self):
        if self.block_s < 16 or self.block_s & (self.block_s - 1):  # tl.arange and tl.dot sizes
            raise ValueError(f"block_s={self.block_s} must be a power of two >= 16")
        if self.chunk is not None and (self.chunk < self.block_s or self.chunk % self.block_s):
            raise ValueError(f"chunk={self.chunk} must be a multiple of block_s={self.block_s} (or None)")
        if self.min_programs < 1:
            raise ValueError(f"min_programs={self.min_programs} must be >= 1")

    def chunk_for(self, cache_len: int, rows: int) -> int:
        """Cache positions per program for a cache of cache_len positions and rows (slot, head) rows:
        whole blocks, and at least min_programs programs where the cache has that many blocks
        (_flash.splits_per_row's count, which decode_append's runs take too)."""
        if self.chunk is not None:
            return self.chunk
        blocks = max(triton.cdiv(cache_len, self.block_s), 1)  # an empty cache: one block
        # one chunk a row from min_programs rows on, or in a one-block cache; else down to a block a program
        splits = splits_per_row(rows, blocks, self.min_programs)
        return blocks // splits * self.block_s  # rounded down: at least `splits` chunks

    def num_splits(self, cache_len: int, rows: int) -> int:
        return triton.cdiv(cache_len, self.chunk_for(cache_len, rows))


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, len_ptr,  # q [B*N, D], k/v [B*N, S, D], lengths [B]
    scale_log2,  # softmax scale times log2(e): the kernel works in base 2 (exp2 is cheaper)
    cache_len,
    o_ptr, m_ptr, l_ptr,  # per chunk: o [B*N, P, D] unnormalised, m / l [B*N, P]; one chunk (P 1):
    # o [B*N, D] normalised in q's dtype, m / l unused
    NUM_HEADS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_S: tl.constexpr,
    MMA: tl.constexpr,  # scores and the V sum as tl.dot of 16 copies of the query (16-bit caches)
):
    bn = tl.program_id(0).to(tl.int64)  # slot * NUM_HEADS + head; int64 keeps big caches addressable
    split = tl.program_id(1)
    length = tl.load(len_ptr + bn // NUM_HEADS)
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, length)

    offs_d = tl.arange(0, HEAD_DIM)
    k_base = k_ptr + bn * cache_len * HEAD_DIM
    v_base = v_ptr + bn * cache_len * HEAD_DIM
    if MMA:
        # tl.dot needs 16 rows; its operands' loads are the ones Triton pipelines (num_stages).
        # Every row is the same query: row 0 is the answer.
        rows = tl.arange(0, 16)
        q = tl.load(q_ptr + bn * HEAD_DIM + offs_d[None, :] + 0 * rows[:, None])  # [16, D]
        m_i = tl.full([16], -float("inf"), tl.float32)
        l_i = tl.zeros([16], tl.float32)
        acc = tl.zeros([16, HEAD_DIM], tl.float32)
    else:
        q = tl.load(q_ptr + bn * HEAD_DIM + offs_d).to(tl.float32) * scale_log2
        m_i = -float("inf")
        l_i = 0.0
        acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_S):
        offs_s = start + tl.arange(0, BLOCK_S)
        live = offs_s < hi
        kv_offs = offs_s[:, None] * HEAD_DIM + offs_d[None, :]  # [BLOCK_S, D]
        k = tl.load(k_base + kv_offs, mask=live[:, None], other=0.0)
        v = tl.load(v_base + kv_offs, mask=live[:, None], other=0.0)  # issued with K's, before the math
        if MMA:
            s = tl.where(live[None, :], tl.dot(q, tl.trans(k)) * scale_log2, -float("inf"))  # [16, BLOCK_S]
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every step has a live position
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            l_i = l_i * alpha + tl.sum(p, axis=1)
        else:
            s = tl.where(live, tl.sum(k.to(tl.float32) * q[None, :], axis=1), -float("inf"))  # [BLOCK_S]
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new

    if MMA:  # keep row 0
        first = rows == 0
        acc = tl.sum(tl.where(first[:, None], acc, 0.0), axis=0)
        l_i = tl.sum(tl.where(first, l_i, 0.0), axis=0)
        m_i = tl.max(tl.where(first, m_i, -float("inf")), axis=0)
    if NUM_SPLITS == 1:  # the whole row in one program: the normalised output, in o's dtype
        out = tl.where(l_i > 0, acc / tl.where(l_i > 0, l_i, 1.0), 0.0)  # a slot of length 0 gives zeros
        tl.store(o_ptr + bn * HEAD_DIM + offs_d, out.to(o_ptr.dtype.element_ty))
    else:
        part = bn * NUM_SPLITS + split
        tl.store(o_ptr + part * HEAD_DIM + offs_d, acc)
        tl.store(m_ptr + part, m_i)
        tl.store(l_ptr + part, l_i)


def _check_shapes(q, k_cache, v_cache, lengths):
    if k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache {k_cache.shape} and v_cache {v_cache.shape} must both be [B, N, S, D]"
        )
    b, n, _, d = k_cache.shape
    if q.shape != (b, n, d):
        raise ValueError(f"q has shape {q.shape}; expected [B, N, D] = {(b, n, d)}")
    if lengths.shape != (b,):
        raise ValueError(f"lengths has shape {lengths.shape}; expected [B] = {(b,)}")


def one_16bit_dtype(*arrays) -> bool:
    """Whether the arrays share one 16-bit dtype: what a tl.dot of them takes (one operand type;
    an fp32 query over a bf16 cache keeps its precision in elementwise sums instead)."""
    dtypes = {jnp.dtype(x.dtype) for x in arrays}
    return len(dtypes) == 1 and dtypes.pop().itemsize == 2


def _use_mma(tiles: DecodeTiles, q, k_cache, v_cache) -> bool:
    """The tl.dot variant: asked for, and q, K and V of one 16-bit dtype."""
    return tiles.mma and one_16bit_dtype(q, k_cache, v_cache)


def _launch_plan(q, k_cache, v_cache, tiles: DecodeTiles) -> tuple[int, dict]:
    """(chunks per row, the kernel's constexprs) for one call; both launchers use this."""
    b, n, s, d = k_cache.shape
    chunk = tiles.chunk_for(s, b * n)
    splits = triton.cdiv(s, chunk)
    return splits, dict(NUM_HEADS=n, NUM_SPLITS=splits, HEAD_DIM=d, CHUNK=chunk, BLOCK_S=tiles.block_s,
                        MMA=_use_mma(tiles, q, k_cache, v_cache))


def _decode_triton(q, k_cache, v_cache, lengths, *, scale, tiles):
    b, n, s, d = k_cache.shape
    check_head_dim(d)
    splits, constexprs = _launch_plan(q, k_cache, v_cache, tiles)
    partial = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    if splits == 1:  # no merge step: the kernel writes the output (m / l: one unused float each)
        out_shape = (jax.ShapeDtypeStruct((b, n, d), q.dtype), partial(1), partial(1))
    else:
        out_shape = (partial(b, n, splits, d), partial(b, n, splits), partial(b, n, splits))
    o, m, l = jax_triton().triton_call(
        # np.float32: jax-triton passes a python float as fp64, which would promote the math
        q, k_cache, v_cache, lengths.astype(jnp.int32), np.float32(scale * LOG2E), s,
        kernel=_decode_kernel,
        out_shape=out_shape,
        grid=(b * n, splits),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        **constexprs,
    )
    return o if splits == 1 else merge_partials(o, m, l).astype(q.dtype)


def _launch_torch(q, k_cache, v_cache, lengths, *, scale, tiles=DecodeTiles()):
    """Run _decode_kernel under Triton's interpreter on torch CPU copies (tests use this)."""
    import torch

    _check_shapes(q, k_cache, v_cache, lengths)
    b, n, s, d = k_cache.shape
    splits, constexprs = _launch_plan(q, k_cache, v_cache, tiles)
    tq = to_torch(q)
    # NaN poison: a partial the kernel forgot to write shows up in the result
    if splits == 1:
        o, m, l = torch.full((b, n, d), float("nan"), dtype=tq.dtype), torch.zeros(1), torch.zeros(1)
    else:
        o = torch.full((b, n, splits, d), float("nan"))
        m = torch.full((b, n, splits), float("nan"))
        l = torch.full((b, n, splits), float("nan"))
    interpreted(_decode_kernel)[(b * n, splits)](
        tq, to_torch(k_cache), to_torch(v_cache), to_torch(lengths.astype(jnp.int32)),
        scale * LOG2E, s, o, m, l, **constexprs,
    )
    if splits == 1:
        return from_torch(o, q.dtype)
    parts = [from_torch(t, jnp.float32) for t in (o, m, l)]
    return merge_partials(*parts).astype(q.dtype)


def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    impl: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
    tiles: DecodeTiles = DecodeTiles(),
) -> jax.Array:
    """Attention of one query per slot over its cache: q [B, N, D] -> [B, N, D] in q's dtype.

    k_cache / v_cache [B, N, S, D]; slot b sees cache positions [0, lengths[b]); a slot of
    length 0 gives zeros. Softmax in float32. impl: "auto" (Triton on a GPU, else XLA),
    "triton" or "xla". With a mesh, slots split over "data" and heads over "tensor".
    """
    _check_shapes(q, k_cache, v_cache, lengths)
    if resolve_impl(impl) == "triton":
        fn = lambda *a: _decode_triton(*a, scale=scale, tiles=tiles)  # noqa: E731
    else:
        fn = lambda *a: decode_attention_reference(*a, scale=scale)  # noqa: E731
    heads = P("data", "tensor", None)
    cache = P("data", "tensor", None, None)
    return over_mesh(fn, mesh, (heads, cache, cache, P("data")), heads,
                     q, k_cache, v_cache, lengths)


def decode_attention_reference(q, k_cache, v_cache, lengths, *, scale):
    """Plain-JAX decode attention, same contract as decode_attention, softmax in float32."""
    f32 = jnp.float32
    hi = jax.lax.Precision.HIGHEST
    s = jnp.einsum("bnd,bnsd->bns", q.astype(f32), k_cache.astype(f32), precision=hi) * scale
    live = jnp.arange(k_cache.shape[2])[None, :] < lengths[:, None]  # [B, S]
    s = jnp.where(live[:, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))  # [B, N, S]; 0 where not live
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bns,bnsd->bnd", p, v_cache.astype(f32), precision=hi)
    return jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0).astype(q.dtype)
