"""Decode attention for few (slot, head) rows, in Pallas with its Triton lowering: one kernel.

What it is for: GPT-2 XL at batch 1 (25 rows) decodes with XLA's attention, because the Triton
kernel of decode_attention.py costs more than it saves there. XLA's attention for one query is
several small kernels per layer (scores, max, exp and sum, the weighted sum of V, casts), and a
jax-triton call costs the host more than an XLA launch (BENCHMARKS.md, sessions 6-8). Pallas
emits XLA's own Triton custom call, launched like any XLA kernel, so one program per (slot,
head) that reads only the live positions may replace those kernels. That is still to be
measured on the GPU (benchmarks/bench_kernels.py --kernels decode-small); nothing calls this
kernel by default.

One program per (slot, head) walks its live positions in blocks of block_s with an online
softmax (running max and sum in float32): no split over the key axis, so it is meant for short
caches and few rows, where decode_attention.py's flash-decoding grid is mostly idle.

Layout and contract as decode_attention.decode_attention: q [B, N, D], k_cache / v_cache
[B, N, S, D], lengths [B]; slot b sees positions [0, lengths[b]); length 0 gives zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from ._dispatch import check_head_dim, over_mesh
from .decode_attention import _check_shapes


def _kernel(len_ref, q_ref, k_ref, v_ref, o_ref, *, scale, block_s, cache_len):
    f32 = jnp.float32
    b, h = pl.program_id(0), pl.program_id(1)
    length = jnp.minimum(len_ref[b], cache_len)
    q = q_ref[b, h, :].astype(f32) * scale  # [D]
    d = q.shape[0]
    offsets = jnp.arange(block_s)

    def step(i, carry):
        m, l, acc = carry
        start = pl.multiple_of(i * block_s, block_s)
        rows = pl.ds(start, block_s)
        k = k_ref[b, h, rows, :].astype(f32)  # [block_s, D]; blocks never pass the cache's end
        v = v_ref[b, h, rows, :].astype(f32)
        live = start + offsets < length
        s = jnp.where(live, jnp.sum(k * q[None, :], axis=1), -jnp.inf)  # [block_s]
        m_new = jnp.maximum(m, jnp.max(s))  # finite: every block walked holds a live position
        p = jnp.exp(s - m_new)  # 0 where not live
        alpha = jnp.exp(m - m_new)  # 0 on the first block (m = -inf)
        return m_new, l * alpha + jnp.sum(p), acc * alpha + jnp.sum(p[:, None] * v, axis=0)

    blocks = (length + block_s - 1) // block_s
    init = (jnp.float32(-jnp.inf), jnp.float32(0.0), jnp.zeros((d,), f32))
    _, l, acc = jax.lax.fori_loop(0, blocks, step, init)
    o_ref[b, h, :] = jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_s", "num_warps", "interpret"))
def _decode_pallas(q, k_cache, v_cache, lengths, *, scale, block_s, num_warps, interpret):
    b, n, s, d = k_cache.shape
    kernel = functools.partial(_kernel, scale=scale, block_s=block_s, cache_len=s)
    extra = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        extra["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((b, n, d), q.dtype), grid=(b, n),
                          interpret=interpret, **extra)(lengths.astype(jnp.int32), q, k_cache, v_cache)


def decode_attention_pallas(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    block_s: int = 64,
    num_warps: int = 4,
    mesh: jax.sharding.Mesh | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Same contract as decode_attention.decode_attention (softmax in float32).

    block_s: cache positions per loop step, a power of two dividing the cache length.
    interpret: run through Pallas' interpreter (CPU tests). With a mesh, slots split over
    "data" and heads over "tensor"."""
    _check_shapes(q, k_cache, v_cache, lengths)
    s, d = k_cache.shape[2], k_cache.shape[3]
    check_head_dim(d)
    if block_s < 1 or block_s & (block_s - 1) or s % block_s:
        raise ValueError(f"block_s={block_s} must be a power of two dividing the cache length {s}")
    fn = functools.partial(_decode_pallas, scale=float(scale), block_s=block_s, num_warps=num_warps,
                           interpret=interpret)
    heads = P("data", "tensor", None)
    cache = P("data", "tensor", None, None)
    return over_mesh(fn, mesh, (heads, cache, cache, P("data")), heads, q, k_cache, v_cache, lengths)
