"""The sampler's top_k and top_p thresholds by radix select, one program per row.

A sampled decode step with top_k or top_p needs, per row, the k-th largest logit and the top_p
cut: the smallest logit whose mass before it, in descending order, is still < top_p. Sorting the
row for them cost ~0.42 ms at batch 32 over GPT-2's 50,257 entries on an H200, about a whole GPT-2
small step (benchmarks/bench_sampling.py). Neither needs the order, only a threshold: float32
logits map to 32-bit keys in the same order, and the largest key T whose measure (the count of
keys >= T for top_k, their probability mass for top_p) reaches the target is built from its top
bits down, BITS a pass: each pass measures the next 2**BITS - 1 candidates over the row. That is
exact for any spread of logits, with no fallback. XLA runs each pass as a reduction over the row
and was slow at it (~10-20 us a pass at batch 32: 16 passes took top_p alone from 463 to 294 us),
so here one program walks its row for every pass, from L2 after the first.

The sampler (engine/sampling.filter_mask) still takes top_k <= 64 from its 2,048 candidates, which
were faster than this kernel (109-122 us against 420-490 at batch 32): the kernel replaces only the
whole-row sort, for top_p alone or a larger top_k, from MIN_KERNEL_ROWS rows. A single program
walks a row 16 times a search, ~14 us a pass at batch 32, still well above what its bytes and
compares need. Its keys and weights come from one XLA fusion before it, and each walk loads the
next block before it uses the current one: Triton pipelines only loads that feed a tl.dot, and
these feed compares (BENCHMARKS.md sessions 16-17).

Semantics (sampling.reference_filtered_logits is the reference; HF's warpers in order): top_k
keeps every token >= the k-th largest (ties with it stay); top_p then keeps, of the survivors in
descending order with ties by ascending id, each token whose renormalised mass before it is
< top_p. So above the cut everything stays, and of the m tokens tied at the cut the first
ceil((top_p * total - mass above) / their weight) by id, found by a third search over the ids.

Outputs per row: kth and cut as uint32 keys (order_keys), and last_id, the largest id kept among
the ties at the cut (the vocabulary size when all of them are). keep_mask turns them into the
[B, V] mask. The reference computes the same three in XLA with the same passes.

Why Pallas (its Triton lowering): as kernels/decode_append.py, XLA compiles and launches it back
to back with its own fusions inside the decode loop; a jax-triton call cannot be captured.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from ._dispatch import over_mesh, resolve_impl

INT_MIN = -(2**31)
# Settings timed on an H200 (benchmarks/bench_sampling.py --kernel, BENCHMARKS.md sessions 16-17):
# top_p alone, flat / peaked logits, us per call at batch 32 (16): 2,048 x 8 warps 263 / 262 (233 /
# 224); 4,096 x 8 258 / 272 (245 / 245); 4,096 x 16 294 / 274; 2,048 x 4 283 / 272; 4,096 x 4 636.
# Before the keys and weights came from XLA and the next block was prefetched, the best was 8,192 x
# 16: 305 / 321 (281 / 275).
BITS = 2  # key bits decided per pass: 16 passes of 3 candidates
BLOCK = 2048  # logits a program reads per loop step
NUM_WARPS = 8
NUM_STAGES = 2  # Triton's software pipelining (of the loads that feed a dot; there are none here)
# "auto" runs the kernel from this many rows a device. One program walks one row, ~230-260 us
# whatever the batch, while the whole-row sort it replaces grows with the rows (session 17: 194-235
# us at batch 4, 216-248 at 8, 307-325 at 16, 448-494 at 32; 119-124 at batch 1, session 16). At
# batch 8 the two were level (kernel 243-249), so the kernel starts at 16.
MIN_KERNEL_ROWS = 16


def _signed_keys(x):
    """int32 keys in the order of the float32 values, compared signed (the kernel's form):
    -0.0 and 0.0 one key."""
    s = jax.lax.bitcast_convert_type(jnp.where(x == 0, jnp.zeros_like(x), x), jnp.int32)
    return jnp.where(s < 0, s ^ 0x7FFFFFFF, s)


def order_keys(x_bv):
    """uint32 keys in the order of the float32 values (the signed keys with the sign bit flipped):
    -inf above 0, and key 0 is a negative NaN's, so T = 0 keeps every real value."""
    return jax.lax.bitcast_convert_type(_signed_keys(x_bv) ^ INT_MIN, jnp.uint32)


def row_weights(x_bv):
    """exp(x - the row's max), the top_p masses before top_k's mask: the reference's and the
    kernel's (computed once, before it) are this one function, so both searches weigh alike. A row
    of -inf only (no max) weighs 0 everywhere."""
    top_b = jnp.max(x_bv, axis=-1, keepdims=True)
    return jnp.exp(x_bv - jnp.where(top_b == -jnp.inf, 0.0, top_b))


def filters_on(top_k, top_p, vocab: int):
    """(top_k on, top_p on), per row or for one row: top_k filters only in [1, vocab), top_p only
    below 1. The one rule every filter path and the sampler's "any filter?" test share."""
    return (top_k > 0) & (top_k < vocab), top_p < 1.0


def _id_bits(v: int, bits: int) -> int:
    """Key bits an id search decides: enough for ids < v, in whole passes."""
    need = max(1, (v - 1).bit_length())
    return -(-need // bits) * bits


# ---------------------------------------------------------------------------------------------
# Reference (XLA): the same searches, one reduction over [B, 2**bits - 1, V] a pass.


def _largest_threshold(keys_bv, weights_bv, target_b, *, top_bits: int = 32, bits: int = BITS):
    """[B] uint32: per row the largest T (bits >= top_bits zero) with sum(weights[keys >= T]) >=
    target, or 0 when none reaches it. Weights are >= 0, so the measure only falls as T rises; a
    pass's nested masks sum in one reduction order, so its verdicts are monotone too."""
    t_b = jnp.zeros(keys_bv.shape[:1], jnp.uint32)
    shift = top_bits
    while shift > 0:
        step = min(bits, shift)
        shift -= step
        cand_bj = t_b[:, None] | (jnp.arange(1, 2**step, dtype=jnp.uint32) << shift)
        reached_bjv = keys_bv[:, None, :] >= cand_bj[:, :, None]
        measure_bj = jnp.sum(jnp.where(reached_bjv, weights_bv[:, None, :], 0), axis=-1)
        t_b = t_b | (jnp.sum(measure_bj >= target_b[:, None], axis=-1).astype(jnp.uint32) << shift)
    return t_b


def filter_thresholds_reference(scaled_bv, top_k_b, top_p_b, *, bits: int = BITS):
    """(kth [B] uint32, cut [B] uint32, last_id [B] int32) as the kernel computes them, in XLA.
    A filter no row uses costs nothing (lax.cond)."""
    b, v = scaled_bv.shape
    keys_bv = order_keys(scaled_bv)
    use_k, use_p = filters_on(top_k_b, top_p_b, v)
    none_b = jnp.zeros((b,), jnp.uint32)
    kth_b = jax.lax.cond(jnp.any(use_k), lambda: _largest_threshold(
        keys_bv, jnp.ones(keys_bv.shape, jnp.int32), jnp.where(use_k, top_k_b, v + 1), bits=bits), lambda: none_b)
    keep_k_bv = keys_bv >= kth_b[:, None]

    def nucleus():
        weights_bv = jnp.where(keep_k_bv, row_weights(scaled_bv), 0.0)
        target_b = top_p_b * jnp.sum(weights_bv, axis=-1)
        cut_b = _largest_threshold(keys_bv, weights_bv, jnp.where(use_p, target_b, jnp.inf), bits=bits)
        at_bv = (keys_bv == cut_b[:, None]) & keep_k_bv
        above_b = jnp.sum(jnp.where(keys_bv > cut_b[:, None], weights_bv, 0.0), axis=-1)
        tied_b = jnp.sum(at_bv, axis=-1, dtype=jnp.int32)
        weight_at_b = jnp.max(jnp.where(at_bv, weights_bv, 0.0), axis=-1)
        first_b = _ties_kept(target_b, above_b, weight_at_b, tied_b)
        split_b = use_p & (first_b < tied_b)
        ids_bv = jnp.broadcast_to(jnp.arange(v, dtype=jnp.uint32), keys_bv.shape)
        # the first-th smallest tied id is the (tied - first + 1)-th largest
        last_b = jax.lax.cond(jnp.any(split_b), lambda: _largest_threshold(
            ids_bv, at_bv.astype(jnp.int32), jnp.where(split_b, tied_b - first_b + 1, v + 1),
            top_bits=_id_bits(v, bits), bits=bits).astype(jnp.int32), lambda: jnp.zeros((b,), jnp.int32))
        return jnp.where(use_p, cut_b, 0), jnp.where(split_b, last_b, v)

    cut_b, last_b = jax.lax.cond(jnp.any(use_p), nucleus, lambda: (none_b, jnp.full((b,), v, jnp.int32)))
    return kth_b, cut_b, last_b


def _ties_kept(target, above, weight_at, tied):
    """How many of the tokens tied at the cut stay: the i-th (by id, from 0) has mass before it
    above + i * weight_at, kept while < target; the first always stays."""
    room = jnp.ceil((target - above) / jnp.where(weight_at > 0, weight_at, 1.0))
    return jnp.clip(room, 1, jnp.maximum(tied, 1)).astype(jnp.int32)


def keep_mask(scaled_bv, kth_b, cut_b, last_b, top_p_b):
    """[B, V] bool from the thresholds: keys >= kth, and under top_p the keys above the cut and
    the ties at it up to last_id. Elementwise: XLA fuses it into the draw."""
    keys_bv = order_keys(scaled_bv)
    ids_bv = jnp.arange(scaled_bv.shape[-1], dtype=jnp.int32)
    in_p_bv = (keys_bv > cut_b[:, None]) | ((keys_bv == cut_b[:, None]) & (ids_bv <= last_b[:, None]))
    p_off_b = ~filters_on(0, top_p_b, scaled_bv.shape[-1])[1]
    return (keys_bv >= kth_b[:, None]) & (in_p_bv | p_off_b[:, None])


# ---------------------------------------------------------------------------------------------
# Kernel: keys are signed int32 here (_signed_keys; order_keys' bits ^ INT_MIN), so every compare
# is signed.


def _kernel(key_ref, e_ref, k_ref, p_ref, kth_ref, cut_ref, last_ref, *, vocab: int, block: int, bits: int):
    # key_ref: the row's signed keys; e_ref: exp(x - the row's max), both [B, Vp] from one XLA fusion
    f32, i32 = jnp.float32, jnp.int32
    b = pl.program_id(0)
    blocks = key_ref.shape[1] // block
    top_k, top_p = k_ref[b], p_ref[b]
    use_k, use_p = filters_on(top_k, top_p, vocab)
    j = jnp.arange(2**bits, dtype=i32)
    offs = jnp.arange(block, dtype=i32)

    def load(i):
        at = pl.ds(pl.multiple_of(i * block, block), block)
        return key_ref[b, at], e_ref[b, at]

    def walk(n, body, init):
        """fori_loop of body(i, load(i), carry) over blocks [0, n), block i + 1 loaded before block i
        is used: the loads feed compares, which Triton does not pipeline, so its latency would
        otherwise stall every step."""
        def step(i, c):
            carry, cur = c
            nxt = load(jnp.minimum(i + 1, blocks - 1))
            return body(i, cur, carry), nxt

        return jax.lax.fori_loop(jnp.int32(0), n, step, (init, load(jnp.int32(0))))[0]

    def search(keys_weights, target, passes, top_bits, start, zero):
        """The largest t (as uint32 bits, below top_bits free, above them `start`'s) with
        sum(weights[keys >= t]) >= target, over `passes` passes (0: start)."""

        def one_pass(s, t):
            shift = top_bits - bits * (s + 1)
            cand = (t | (j << shift)) ^ INT_MIN  # [2**bits] signed; j = 0 is t itself

            def step(i, data, acc):  # elementwise: one cross-warp reduction a pass, not one a block
                key, w = keys_weights(i, data)
                return acc + jnp.where(key[None, :] >= cand[:, None], w[None, :], zero)

            acc = walk(blocks, step, jnp.zeros((2**bits, block), zero.dtype))
            measure = jnp.sum(acc, axis=1)
            return t | (jnp.sum(((j > 0) & (measure >= target)).astype(i32)) << shift)

        return jax.lax.fori_loop(jnp.int32(0), passes, one_pass, start)  # a traced trip count: both i32

    def counted(i, data):
        return data[0], jnp.ones((block,), i32)

    kth_u = search(counted, top_k, use_k.astype(i32) * (32 // bits), 32, jnp.int32(0), jnp.int32(0))
    kth = kth_u ^ INT_MIN

    def weighted(i, data):
        key, e = data
        return key, jnp.where(key >= kth, e, 0.0)

    p_blocks = use_p.astype(i32) * blocks  # (jnp.where of two Python ints lowered to an i1 trip count)
    total = walk(p_blocks, lambda i, data, t: t + jnp.sum(weighted(i, data)[1]), jnp.float32(0))
    target = top_p * total
    cut_u = search(weighted, target, use_p.astype(i32) * (32 // bits), 32, jnp.int32(0), jnp.float32(0))
    cut = cut_u ^ INT_MIN

    def tie_stats(i, data, carry):
        above, tied, weight_at = carry
        key, w = weighted(i, data)
        at = (key == cut) & (key >= kth)
        return (above + jnp.sum(jnp.where(key > cut, w, 0.0)), tied + jnp.sum(at.astype(i32)),
                jnp.maximum(weight_at, jnp.max(jnp.where(at, w, 0.0))))

    above, tied, weight_at = walk(p_blocks, tie_stats, (jnp.float32(0), jnp.int32(0), jnp.float32(0)))
    first = _ties_kept(target, above, weight_at, tied)
    split = use_p & (first < tied)

    def tie_ids(i, data):
        return i * block + offs, ((data[0] == cut) & (data[0] >= kth)).astype(i32)

    id_bits = _id_bits(key_ref.shape[1], bits)
    last_u = search(tie_ids, tied - first + 1, split.astype(i32) * (id_bits // bits), id_bits, jnp.int32(INT_MIN),
                    jnp.int32(0))
    kth_ref[b] = kth_u
    cut_ref[b] = jnp.where(use_p, cut_u, 0)
    last_ref[b] = jnp.where(split, last_u ^ INT_MIN, vocab)


@functools.partial(jax.jit, static_argnames=("bits", "block", "num_warps", "num_stages", "interpret"))
def _thresholds_pallas(scaled_bv, top_k_b, top_p_b, *, bits, block, num_warps, num_stages, interpret):
    b, v = scaled_bv.shape
    vp = -(-v // block) * block
    # -inf padding: the lowest real key, with no mass; it can change neither threshold (tests)
    x_bv = jnp.pad(scaled_bv.astype(jnp.float32), ((0, 0), (0, vp - v)), constant_values=-jnp.inf)
    # the keys and weights every pass reads, made once (one XLA fusion, the reference's exp): computing
    # them in each of a row's 18-35 walks cost more than loading twice the bytes from L2
    weights_bv = row_weights(x_bv)  # -inf padding weighs 0
    extra = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        extra["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    out = tuple(jax.ShapeDtypeStruct((b,), jnp.int32) for _ in range(3))
    kernel = functools.partial(_kernel, vocab=v, block=block, bits=bits)
    kth_b, cut_b, last_b = pl.pallas_call(kernel, out_shape=out, grid=(b,), interpret=interpret, **extra)(
        _signed_keys(x_bv), weights_bv, top_k_b.astype(jnp.int32), top_p_b.astype(jnp.float32))
    as_keys = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.uint32)
    return as_keys(kth_b), as_keys(cut_b), last_b


def runs_kernel(impl: str, rows: int) -> bool:
    """Whether filter_thresholds' kernel serves `rows` rows a device: "triton" insists, "auto"
    takes it on a GPU from MIN_KERNEL_ROWS rows, "xla" never."""
    return impl == "triton" or (resolve_impl(impl) == "triton" and rows >= MIN_KERNEL_ROWS)


def filter_thresholds(scaled_bv, top_k_b, top_p_b, *, impl: str = "auto", mesh: jax.sharding.Mesh | None = None,
                      bits: int | None = None, block: int | None = None, num_warps: int | None = None,
                      num_stages: int | None = None, interpret: bool = False):
    """(kth, cut, last_id) per row of scaled (temperature-applied) logits [B, V], for keep_mask.

    top_k_b [B] int (<= 0 or >= V: off), top_p_b [B] float (>= 1: off). impl: "auto" (the kernel on
    a GPU, else the reference), "triton" (the kernel) or "xla". interpret: the kernel through
    Pallas' interpreter (CPU tests). bits: key bits a pass, 1, 2 or 4; block: logits a loop step, a
    power of two; num_warps, num_stages: the kernel's (None: the module's BITS, BLOCK, NUM_WARPS,
    NUM_STAGES, read at each call). With a mesh the rows split over "data" (each device's kernel walks whole rows)."""
    bits, block, num_warps, num_stages = (BITS if bits is None else bits, BLOCK if block is None else block,
                                          NUM_WARPS if num_warps is None else num_warps,
                                          NUM_STAGES if num_stages is None else num_stages)
    if bits not in (1, 2, 4):
        raise ValueError(f"bits={bits!r} must be 1, 2 or 4 (a divisor of 32 whose candidates fit one pass)")
    if not isinstance(block, int) or block < 16 or block & (block - 1):
        raise ValueError(f"block={block!r} must be a power of two >= 16")
    if scaled_bv.ndim != 2 or top_k_b.shape != scaled_bv.shape[:1] or top_p_b.shape != scaled_bv.shape[:1]:
        raise ValueError(f"logits {scaled_bv.shape}, top_k {top_k_b.shape} and top_p {top_p_b.shape} must be "
                         "[B, V], [B] and [B]")
    if interpret or resolve_impl(impl) == "triton":
        fn = functools.partial(_thresholds_pallas, bits=bits, block=block, num_warps=num_warps, num_stages=num_stages,
                               interpret=interpret)
    else:
        fn = functools.partial(filter_thresholds_reference, bits=bits)
    rows = P("data")
    return over_mesh(fn, mesh, (P("data", None), rows, rows), (rows, rows, rows), scaled_bv, top_k_b, top_p_b)
