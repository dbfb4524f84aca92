"""Bidirectional flash attention over sequences packed back to back (Bert, no padding computed).

q, k, v [T, N, D] (token, head, head dim) hold sequence i at tokens
[cu_seqlens[i], cu_seqlens[i+1]); tokens from cu_seqlens[-1] on are padding. Each program
takes BLOCK_M query rows of one (sequence, head) and streams that sequence's keys, so no
work crosses sequences and none is spent on padding.
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
def _varlen_kernel(
    q_ptr, k_ptr, v_ptr, cu_ptr,  # q / k / v [T, N, D], cu_seqlens [S + 1]
    scale_log2,
    o_ptr,  # [T, N, D], zeroed before launch: padding rows stay 0
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    sn = tl.program_id(1)  # sequence * NUM_HEADS + head
    seq = sn // NUM_HEADS
    first = tl.load(cu_ptr + seq)
    seq_len = tl.load(cu_ptr + seq + 1) - first
    row_stride = NUM_HEADS * HEAD_DIM
    # int64: T * N * D can pass 2**31 in a long packed stream
    base = first.to(tl.int64) * row_stride + (sn % NUM_HEADS) * HEAD_DIM

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_offs = base + offs_m[:, None] * row_stride + offs_d[None, :]  # [BLOCK_M, D]
    live = (offs_m < seq_len)[:, None]
    q = tl.load(q_ptr + q_offs, mask=live, other=0.0)
    hi = tl.where(start_m < seq_len, seq_len, 0)  # a block past the sequence's end does nothing
    out = attend_rows(q, k_ptr + base, v_ptr + base, row_stride, offs_m, seq_len, hi, scale_log2,
                      False, HEAD_DIM, BLOCK_M, BLOCK_N)
    # rows past the end belong to the next sequence: never write them
    tl.store(o_ptr + q_offs, out.to(o_ptr.dtype.element_ty), mask=live)


def _check_shapes(q, k, v, cu_seqlens, max_seqlen):
    if q.ndim != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape} must all be one [T, N, D] shape")
    if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens has shape {cu_seqlens.shape}; expected [num_seqs + 1] >= [2]")
    if not isinstance(max_seqlen, int) or max_seqlen < 1:
        raise ValueError(f"max_seqlen={max_seqlen!r} must be a python int >= 1 (a static bound)")


def _varlen_triton(q, k, v, cu_seqlens, *, scale, max_seqlen, tiles):
    _, n, d = q.shape
    check_head_dim(d)
    num_seqs = cu_seqlens.shape[0] - 1
    return jax_triton().triton_call(
        # np.float32: jax-triton passes a python float as fp64, which would promote the math
        q, k, v, cu_seqlens.astype(jnp.int32), np.float32(scale * LOG2E),
        kernel=_varlen_kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(triton.cdiv(max_seqlen, tiles.block_m), num_seqs * n),
        zeroed_outputs=(0,),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        NUM_HEADS=n, HEAD_DIM=d, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
    )


def _launch_torch(q, k, v, cu_seqlens, *, scale, max_seqlen, tiles=FlashTiles()):
    """Run _varlen_kernel under Triton's interpreter on torch CPU copies (tests use this)."""
    import torch

    _check_shapes(q, k, v, cu_seqlens, max_seqlen)
    _, n, d = q.shape
    tq = to_torch(q)
    o = torch.zeros_like(tq)  # as zeroed_outputs does on the GPU
    grid = (triton.cdiv(max_seqlen, tiles.block_m), (cu_seqlens.shape[0] - 1) * n)
    interpreted(_varlen_kernel)[grid](
        tq, to_torch(k), to_torch(v), to_torch(cu_seqlens.astype(jnp.int32)), scale * LOG2E, o,
        NUM_HEADS=n, HEAD_DIM=d, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
    )
    return from_torch(o, q.dtype)


def varlen_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cu_seqlens: jax.Array,
    *,
    scale: float,
    max_seqlen: int,
    impl: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
    tiles: FlashTiles = FlashTiles(),
) -> jax.Array:
    """Attention within each packed sequence: q, k, v [T, N, D] -> [T, N, D] in q's dtype.

    cu_seqlens int32 [num_seqs + 1]: sequence i is tokens [cu_seqlens[i], cu_seqlens[i+1]),
    starting at cu_seqlens[0] = 0; tokens from cu_seqlens[-1] on are padding and give zeros.
    max_seqlen (static) must bound every sequence's length. Softmax in float32. impl:
    "auto" (Triton on a GPU, else XLA), "triton" or "xla". With a mesh, heads split over
    "tensor" (the token stream stays whole on every device).
    """
    _check_shapes(q, k, v, cu_seqlens, max_seqlen)
    if resolve_impl(impl) == "triton":
        fn = lambda *a: _varlen_triton(*a, scale=scale, max_seqlen=max_seqlen, tiles=tiles)  # noqa: E731
    else:
        fn = lambda *a: varlen_attention_reference(*a, scale=scale, max_seqlen=max_seqlen)  # noqa: E731
    spec = P(None, "tensor", None)
    return over_mesh(fn, mesh, (spec, spec, spec, P()), spec, q, k, v, cu_seqlens)


def varlen_attention_reference(q, k, v, cu_seqlens, *, scale, max_seqlen):
    """Plain-JAX packed attention, same contract as varlen_attention, softmax in float32.

    Gathers each sequence into a padded [S, L = max_seqlen] batch, attends there, and
    gathers the rows back: O(S * L^2) work rather than O(T^2) for a dense masked stream.
    """
    f32 = jnp.float32
    hi = jax.lax.Precision.HIGHEST
    t = q.shape[0]
    starts, lens = cu_seqlens[:-1], jnp.diff(cu_seqlens)  # [S]
    pos = jnp.arange(max_seqlen)
    live = pos[None, :] < lens[:, None]  # [S, L]
    gather = jnp.where(live, starts[:, None] + pos[None, :], 0)  # [S, L] token index
    qs, ks, vs = (x.astype(f32)[gather] for x in (q, k, v))  # [S, L, N, D]
    s = jnp.einsum("sqnd,sknd->snqk", qs, ks, precision=hi) * scale
    s = jnp.where(live[:, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)  # every live row sees >= 1 key; dead rows are dropped below
    o = jnp.einsum("snqk,sknd->sqnd", p, vs, precision=hi)  # [S, L, N, D]
    tok = jnp.arange(t)
    seq = jnp.clip(jnp.searchsorted(cu_seqlens, tok, side="right") - 1, 0, lens.shape[0] - 1)  # [T]
    row = tok - cu_seqlens[seq]
    real = (tok >= cu_seqlens[0]) & (tok < cu_seqlens[-1]) & (row < max_seqlen)
    out = o[seq, jnp.clip(row, 0, max_seqlen - 1)]  # [T, N, D]
    return jnp.where(real[:, None, None], out, 0.0).astype(q.dtype)
