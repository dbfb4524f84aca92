"""Causal flash attention over a padded batch of prompts (GPT prefill).

q, k, v [B, T, N, D] (batch, position, head, head dim); row b holds lengths[b] real tokens
and padding after them. Each program takes BLOCK_M query rows of one (row, head) and
streams keys up to its last row (causal), so work past the diagonal and past the length is
skipped; output rows at or after the length are zeros.
"""

from __future__ import annotations

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
from ._flash import LOG2E, FlashTiles, attend_rows


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, len_ptr,  # q / k / v [B, T, N, D], lengths [B]
    scale_log2,
    seq_len,  # T
    o_ptr,  # [B, T, N, D]
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bn = tl.program_id(1).to(tl.int64)  # row * NUM_HEADS + head; int64 keeps offsets from overflowing
    b = bn // NUM_HEADS
    length = tl.minimum(tl.load(len_ptr + b), seq_len)
    row_stride = NUM_HEADS * HEAD_DIM
    base = b * seq_len * row_stride + (bn % NUM_HEADS) * HEAD_DIM

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_offs = base + offs_m[:, None] * row_stride + offs_d[None, :]  # [BLOCK_M, D]
    live = offs_m < length
    q = tl.load(q_ptr + q_offs, mask=live[:, None], other=0.0)
    # causal: keys up to the block's last row; a block wholly past the length visits none
    hi = tl.where(start_m < length, tl.minimum(start_m + BLOCK_M, length), 0)
    out = attend_rows(q, k_ptr + base, v_ptr + base, row_stride, offs_m, length, hi, scale_log2,
                      True, HEAD_DIM, BLOCK_M, BLOCK_N)
    out = tl.where(live[:, None], out, 0.0)
    tl.store(o_ptr + q_offs, out.to(o_ptr.dtype.element_ty), mask=(offs_m < seq_len)[:, None])


def _check_shapes(q, k, v, lengths):
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape} must all be one [B, T, N, D] shape")
    if lengths.shape != q.shape[:1]:
        raise ValueError(f"lengths has shape {lengths.shape}; expected [B] = {q.shape[:1]}")


def _prefill_triton(q, k, v, lengths, *, scale, tiles):
    b, t, n, d = q.shape
    check_head_dim(d)
    return jax_triton().triton_call(
        # np.float32: jax-triton passes a python float as fp64, which would promote the math
        q, k, v, lengths.astype(jnp.int32), np.float32(scale * LOG2E), t,
        kernel=_prefill_kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(triton.cdiv(t, tiles.block_m), b * n),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        NUM_HEADS=n, HEAD_DIM=d, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
    )


def _launch_torch(q, k, v, lengths, *, scale, tiles=FlashTiles()):
    """Run _prefill_kernel under Triton's interpreter on torch CPU copies (tests use this)."""
    import torch

    _check_shapes(q, k, v, lengths)
    b, t, n, d = q.shape
    tq = to_torch(q)
    o = torch.full_like(tq, float("nan"))  # poison: rows the kernel forgot show up as NaN
    interpreted(_prefill_kernel)[(triton.cdiv(t, tiles.block_m), b * n)](
        tq, to_torch(k), to_torch(v), to_torch(lengths.astype(jnp.int32)), scale * LOG2E, t, o,
        NUM_HEADS=n, HEAD_DIM=d, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
    )
    return from_torch(o, q.dtype)


def prefill_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    impl: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
    tiles: FlashTiles = FlashTiles(),
) -> jax.Array:
    """Causal attention within each row: q, k, v [B, T, N, D] -> [B, T, N, D] in q's dtype.

    Row b has lengths[b] real tokens; output positions >= lengths[b] are zeros. Softmax in
    float32. impl: "auto" (Triton on a GPU, else XLA), "triton" or "xla". With a mesh, rows
    split over "data" and heads over "tensor".
    """
    _check_shapes(q, k, v, lengths)
    if resolve_impl(impl) == "triton":
        fn = lambda *a: _prefill_triton(*a, scale=scale, tiles=tiles)  # noqa: E731
    else:
        fn = lambda *a: prefill_attention_reference(*a, scale=scale)  # noqa: E731
    spec = P("data", None, "tensor", None)
    return over_mesh(fn, mesh, (spec, spec, spec, P("data")), spec, q, k, v, lengths)


def prefill_attention_reference(q, k, v, lengths, *, scale):
    """Plain-JAX causal attention, same contract as prefill_attention, softmax in float32."""
    f32 = jnp.float32
    hi = jax.lax.Precision.HIGHEST
    t = q.shape[1]
    s = jnp.einsum("bqnd,bknd->bnqk", q.astype(f32), k.astype(f32), precision=hi) * scale
    pos = jnp.arange(t)
    live = pos[None, :] < lengths[:, None]  # [B, T]
    keep = (pos[None, :] <= pos[:, None])[None] & live[:, None, :]  # [B, Tq, Tk]
    s = jnp.where(keep[:, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))  # [B, N, Tq, Tk]
    l = jnp.sum(p, axis=-1)  # [B, N, Tq]
    o = jnp.einsum("bnqk,bknd->bqnd", p, v.astype(f32), precision=hi)
    o = o / jnp.where(l > 0, l, 1.0).transpose(0, 2, 1)[..., None]
    return jnp.where(live[:, :, None, None], o, 0.0).astype(q.dtype)
