"""Flash attention pieces: the prefill (causal) and varlen (bidirectional) kernels' tile sizes and
inner loop, and what both decode kernels share (LOG2E; flash-decoding's split rule and merge).

One program of the inner loop holds BLOCK_M query rows and streams its sequence's keys and values
through in blocks of BLOCK_N with a running max and sum per row (online softmax), never storing [T, T] scores.
"""

import dataclasses
import math

import jax.numpy as jnp
import triton
import triton.language as tl

LOG2E = math.log2(math.e)  # the kernels fold it into the scale and use exp2, cheaper than exp


@dataclasses.dataclass(frozen=True)
class FlashTiles:
    """Tile sizes: block_m query rows per program, block_n keys per loop step."""

    # fastest of a sweep on an H100 (benchmarks/bench_kernels.py --sweep), for prefill and varlen alike
    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def attend_rows(
    q,  # [BLOCK_M, HEAD_DIM] query rows, input dtype
    k_base, v_base,  # pointers to key / value row 0 of this sequence and head
    row_stride,  # elements between consecutive tokens of k and v
    offs_m,  # [BLOCK_M] query positions within the sequence
    kv_len,  # keys at positions >= kv_len are not attended
    hi,  # keys are visited up to hi (exclusive); 0 skips the loop
    scale_log2,  # softmax scale times log2(e): scores live in base 2 (exp2 is cheaper)
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Return softmax(q k^T) v for the rows, float32 [BLOCK_M, HEAD_DIM]; 0 for rows that saw no key."""
    offs_d = tl.arange(0, HEAD_DIM)
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_seq = offs_n < kv_len
        kv_offs = offs_n[:, None] * row_stride + offs_d[None, :]  # [BLOCK_N, D]
        k = tl.load(k_base + kv_offs, mask=in_seq[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2  # [BLOCK_M, BLOCK_N] f32
        keep = in_seq[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(keep, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # a row with no key yet keeps m = -inf: subtract 0 there instead, or -inf - -inf = NaN
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        v = tl.load(v_base + kv_offs, mask=in_seq[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    return acc / tl.where(l_i > 0, l_i, 1.0)[:, None]


# Flash-decoding: with one program per (slot, head) row, a decode batch of few rows is a few dozen
# programs, each walking its whole context while most of the GPU idles. Below this many rows the
# decode kernels cut each row's cache into pieces, a program each, until there are about this many
# programs, and merge the pieces' partials after the kernel (merge_partials). On an H200 one program a
# row beat two at 256, 384 (decode_attention, BENCHMARKS.md session 10) and 512 rows (decode_append, 13).
MIN_PROGRAMS = 256


def splits_per_row(rows: int, most: int, min_programs: int = MIN_PROGRAMS) -> int:
    """Programs per (slot, head) row for `rows` rows: 1 from min_programs rows on; below, enough for
    rows * splits to reach min_programs, but at most `most` (what the cache allows), and at least 1."""
    if rows >= min_programs:
        return 1
    return max(1, min(-(-min_programs // max(rows, 1)), most))


def merge_partials(o, m, l, new=None):
    """Merge flash-decoding partials into the normalised output [..., D], float32: o [..., P, D]
    unnormalised outputs, m [..., P] their base-2 running maxima, l [..., P] their sums, all float32.

    new: None, or (s [...], v [..., D]) float32, one more position given apart from the partials
    (decode_append's new token, scored after its kernel): its base-2 score and value, merged as a
    partial of sum 1. Without it, a row whose partials are all empty (m = -inf, l = 0: a slot of
    length 0) gives zeros; with it the score is finite, so the merged max is and the sum is >= 1
    (no guards).
    """
    if new is None:
        m_max = jnp.max(m, axis=-1, keepdims=True)
        m_max = jnp.where(jnp.isfinite(m_max), m_max, 0.0)  # avoids -inf - -inf = NaN
    else:
        s, v = new
        m_all = jnp.maximum(jnp.max(m, axis=-1), s)
        m_max = m_all[..., None]
    w = jnp.exp2(m - m_max)  # [..., P]; 0 for empty partials (m = -inf)
    if new is not None:
        w_new = jnp.exp2(s - m_all)
    # weighted sums as elementwise products: an f32 einsum may run in tf32 on a GPU
    num = jnp.sum(w[..., None] * o, axis=-2)
    if new is not None:
        num = num + w_new[..., None] * v
    den = jnp.sum(w * l, axis=-1)
    if new is not None:
        return num / (den + w_new)[..., None]  # den + w_new >= 1: the max's own term is exp2(0)
    den = den[..., None]
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
