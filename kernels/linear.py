"""A decode step's projections with their neighbours folded in: one kernel computes

    y = [residual +] activation(norm(x) @ w.T + bias)

for the few rows of a decode step (x [M, K], 16 <= M <= 64 a power of two; w [N, K] stored
[out, in] as the models store it). norm is an optional layer norm of x's rows (scale, bias [K]).

Why: at GPT-2 medium, batch 32, ~1,000 tokens of context, a decode step through XLA runs per layer
four GEMMs (17.1 us together) and five small fusions around them: the partial sums of XLA's split-K
GEMMs added with the bias, GELU and residuals, and the two layer norms (10.6 us together; each
reads a few hundred KB and is bound by its launch and ramp, not by bandwidth). H200 profile,
BENCHMARKS.md session 12. Here a layer's projections are four kernels and nothing else.

Split K, reduced in the kernel. With 32 rows a GEMM is a read of its weights; to read them fast it
needs a few hundred programs, more than there are [M, block_n] output tiles. So K is cut into
`splits` slices (program (j, i, s) owns output tile (i, j) and K slice s), as XLA's GEMMs cut it,
but the partial sums are added by the kernel, not by a second one: each program stores its float32
partial and takes a ticket from the tile's counter (an atomic add); the program that draws the last
ticket adds the tile's partials in slice order (the sum does not depend on which program came last,
so results are deterministic), applies bias, GELU and residual, stores the tile and puts the counter
back to zero for the next call. The counters are an int32 buffer the caller threads from call to
call (`counters()`), zero between calls. With one slice there is no counter and no partial.

With a norm each program first walks all of its rows' x (from L2) for their statistics (two-pass:
the mean, then the variance about it), then normalises its K slice of x as it loads it.

Numerics: the normalised rows are rounded to x's dtype before the dot (as the model's layer norm
output is), the dot accumulates in float32, and bias, GELU and residual are applied to the float32
sum before one rounding to the output dtype (the XLA path rounds after the dot and after each add).

Pallas' Triton lowering, as kernels/decode_append.py and for the same reason: XLA launches it back
to back with its own kernels. Only 16-bit x and w: a float32 dot in Triton runs in TF32 unless
asked otherwise. Whole weights on each device: under tensor parallelism the contracted axis of two
of the four projections is split and their sums need a collective, so the model keeps XLA there.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from ._dispatch import over_mesh, resolve_impl

ACTIVATIONS = (None, "gelu_new")
MIN_ROWS, MAX_ROWS = 16, 64
_GELU_C = math.sqrt(2.0 / math.pi)


def _gelu_new(y):
    """GPT-2's tanh GELU (models/layers.gelu_new) on float32."""
    return 0.5 * y * (1.0 + jnp.tanh(_GELU_C * (y + 0.044715 * y * y * y)))


def _kernel(*refs, block_m, block_n, block_k, splits, eps, norm, stats_in, stats_out, activation, residual, swap,
            interpret):
    refs = iter(refs)
    x_ref, w_ref, b_ref = next(refs), next(refs), next(refs)
    g_ref, beta_ref = (next(refs), next(refs)) if norm else (None, None)
    mean_in, m2_in = (next(refs), next(refs)) if stats_in else (None, None)
    r_ref = next(refs) if residual else None
    if splits > 1:
        next(refs)  # the counters' input, aliased to their output below
    o_ref = next(refs)
    mean_out, m2_out = (next(refs), next(refs)) if stats_out else (None, None)
    part_ref, cnt_ref = (next(refs), next(refs)) if splits > 1 else (None, None)
    f32 = jnp.float32
    k_dim = x_ref.shape[1]
    steps = k_dim // splits // block_k  # loop steps of this program's K slice
    j, i, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    cols = pl.ds(pl.multiple_of(j * block_n, block_n), block_n)
    rows = pl.ds(pl.multiple_of(i * block_m, block_m), block_m)

    def chunk(c):
        return pl.ds(pl.multiple_of(c * block_k, block_k), block_k)

    def dot_t(a, w):  # a [R, bk] . w [bn, bk] -> [R, bn]
        if swap:  # the weights as the dot's M operand: bn rows of the MMA instead of the few rows of x
            return jax.lax.dot_general(w, a, (((1,), (1,)), ((), ())), preferred_element_type=f32).T
        return jax.lax.dot_general(a, w, (((1,), (1,)), ((), ())), preferred_element_type=f32)

    if stats_in:  # the producer's per-tile (mean, M2) of these rows [T, bm], combined (Chan et al.)
        mt = mean_in[:, rows]
        tiles = mt.shape[0]
        mean = jnp.sum(mt, axis=0) / tiles
        m2 = jnp.sum(m2_in[:, rows], axis=0) + (k_dim // tiles) * jnp.sum(jnp.square(mt - mean[None, :]), axis=0)
        rstd = jax.lax.rsqrt(m2 / k_dim + eps)
    elif norm:  # the rows' statistics over all of K, whatever this program's slice
        all_steps = k_dim // block_k
        s1 = jax.lax.fori_loop(0, all_steps, lambda c, t: t + jnp.sum(x_ref[rows, chunk(c)].astype(f32), axis=1),
                               jnp.zeros((block_m,), f32))
        mean = s1 / k_dim

        def sq(c, t):
            xc = x_ref[rows, chunk(c)].astype(f32) - mean[:, None]
            return t + jnp.sum(xc * xc, axis=1)

        rstd = jax.lax.rsqrt(jax.lax.fori_loop(0, all_steps, sq, jnp.zeros((block_m,), f32)) / k_dim + eps)

    def step(c, acc):
        ks = chunk(s * steps + c)
        a = x_ref[rows, ks]
        if norm:
            a = ((a.astype(f32) - mean[:, None]) * rstd[:, None] * g_ref[ks].astype(f32)[None, :]
                 + beta_ref[ks].astype(f32)[None, :]).astype(x_ref.dtype)
        return acc + dot_t(a, w_ref[cols, ks])

    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((block_m, block_n), f32))

    def finish(total):
        y = total + b_ref[cols].astype(f32)[None, :]
        if activation == "gelu_new":
            y = _gelu_new(y)
        if residual:
            y = y + r_ref[rows, cols].astype(f32)
        y = y.astype(o_ref.dtype)
        o_ref[rows, cols] = y
        if stats_out:  # this tile's (mean, M2) per row, of the values as stored, for the next norm
            yf = y.astype(f32)
            mt = jnp.sum(yf, axis=1) / block_n
            mean_out[j, rows] = mt
            m2_out[j, rows] = jnp.sum(jnp.square(yf - mt[:, None]), axis=1)

    if splits == 1:
        finish(acc)
        return
    part_ref[s, rows, cols] = acc
    idx = j * pl.num_programs(1) + i
    if not interpret:
        # every thread's partial is stored before the (one-thread, acquire-release, GPU-scope) ticket
        from jax.experimental.pallas import triton as plgpu

        plgpu.debug_barrier()
        ticket = plgpu.atomic_add(cnt_ref, (idx,), 1)
    else:  # the interpreter runs programs one by one: a plain read-modify-write is the atomic
        ticket = cnt_ref[idx]
        cnt_ref[idx] = ticket + 1

    @pl.when(ticket == splits - 1)
    def _():
        finish(jnp.sum(part_ref[:, rows, cols], axis=0))  # the partials in slice order, one load
        cnt_ref[idx] = 0  # the tile's other programs are done with it


def pick_block(dim: int, preferred: int) -> int | None:
    """The largest power of two <= preferred that divides dim, at least 16; None if there is none."""
    b = preferred
    while b >= 16:
        if dim % b == 0:
            return b
        b //= 2
    return None


# Set from benchmarks/bench_kernels.py --kernels linear --sweep (BENCHMARKS.md).
DEFAULT_BLOCK_N = 64
DEFAULT_BLOCK_K = 128
DEFAULT_SPLITS = 4
DEFAULT_WARPS = 4
DEFAULT_STAGES = 3
MAX_TILES = 4096  # counters() holds one per output tile: N / 16 tiles of 16 columns, 64 rows / 16 = 4 row blocks


def counters() -> jax.Array:
    """The zeroed int32 counter buffer a caller threads through split-K calls (`fused_linear`'s
    `counters`): each call leaves it zero again."""
    return jnp.zeros((MAX_TILES,), jnp.int32)


def fits(rows: int, k_dim: int, n_dim: int, dtype) -> bool:
    """Whether the kernel takes these shapes: rows a power of two in [MIN_ROWS, MAX_ROWS] (a dot's
    M, loaded whole), K and N each divisible by a power of two >= 16, and a 16-bit dtype."""
    return (MIN_ROWS <= rows <= MAX_ROWS and rows & (rows - 1) == 0 and pick_block(k_dim, 16) is not None
            and pick_block(n_dim, 16) is not None and jnp.dtype(dtype).itemsize == 2)


def _check(x, w, bias, norm, activation, residual):
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x {x.shape} must be [M, K] and w {w.shape} [N, K] with the same K")
    m, k = x.shape
    n = w.shape[0]
    if bias.shape != (n,):
        raise ValueError(f"bias has shape {bias.shape}; expected [N] = {(n,)}")
    if norm is not None and (len(norm) != 2 or any(t.shape != (k,) for t in norm)):
        raise ValueError(f"norm must be (scale, bias), each of shape [K] = {(k,)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not one of {ACTIVATIONS}")
    if residual is not None and residual.shape != (m, n):
        raise ValueError(f"residual has shape {residual.shape}; expected [M, N] = {(m, n)}")


def _power_of_two(name, value, lo):
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or value & (value - 1):
        raise ValueError(f"{name}={value!r} must be a power of two >= {lo}")


@functools.partial(jax.jit, static_argnames=("eps", "activation", "block_m", "block_n", "block_k", "splits",
                                             "emit_stats", "num_warps", "num_stages", "interpret", "swap"))
def _linear_pallas(x, w, bias, norm, stats, residual, cnt, *, eps, activation, block_n, block_k, splits, emit_stats,
                   num_warps, num_stages, interpret, block_m=None, swap=False):
    m, k = x.shape
    n = w.shape[0]
    if m < MIN_ROWS or m & (m - 1):
        raise ValueError(f"the fused linear kernel takes a power-of-two row count >= {MIN_ROWS}, got {m}")
    if x.dtype.itemsize != 2 or w.dtype != x.dtype:
        raise ValueError(f"the fused linear kernel takes x and w of one 16-bit dtype, got {x.dtype} and {w.dtype}")
    for name, v in (("block_n", block_n), ("block_k", block_k)):
        _power_of_two(name, v, 16)
    _power_of_two("splits", splits, 1)
    if n % block_n or k % (block_k * splits):
        raise ValueError(f"block_n={block_n} must divide N={n} and block_k={block_k} x splits={splits} must "
                         f"divide K={k}")
    block_m = block_m or m
    _power_of_two("block_m", block_m, 16)
    if m % block_m:
        raise ValueError(f"block_m={block_m} must divide the {m} rows")
    tiles = (n // block_n) * (m // block_m)
    if splits > 1 and tiles > cnt.shape[0]:
        raise ValueError(f"{tiles} output tiles need more counters than the {cnt.shape[0]} given")
    kernel = functools.partial(_kernel, block_m=block_m, block_n=block_n, block_k=block_k, splits=splits, eps=eps,
                               norm=norm is not None, stats_in=stats is not None, stats_out=emit_stats,
                               activation=activation, residual=residual is not None, swap=swap, interpret=interpret)
    args = [x, w, bias]
    for extra_args in (norm, stats, None if residual is None else (residual,)):
        args += list(extra_args or ())
    extra = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        extra["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    shapes = [jax.ShapeDtypeStruct((m, n), residual.dtype if residual is not None else x.dtype)]
    if emit_stats:
        shapes += [jax.ShapeDtypeStruct((n // block_n, m), jnp.float32)] * 2
    grid = (n // block_n, m // block_m, splits)
    if splits == 1:
        outs = pl.pallas_call(kernel, out_shape=tuple(shapes), grid=grid, interpret=interpret, **extra)(*args)
        return tuple(outs) + (cnt,)
    shapes += [jax.ShapeDtypeStruct((splits, m, n), jnp.float32), jax.ShapeDtypeStruct(cnt.shape, cnt.dtype)]
    outs = pl.pallas_call(kernel, out_shape=tuple(shapes), grid=grid, input_output_aliases={len(args): len(shapes) - 1},
                          interpret=interpret, **extra)(*args, cnt)
    return tuple(outs[:-2]) + (outs[-1],)


def tile_stats(x, tiles: int):
    """Per-row (mean, M2) of each of `tiles` equal column blocks of x [M, K], as [tiles, M] float32
    each: what a producing kernel with `emit_stats` stores for the layer norm that reads its output."""
    xf = x.astype(jnp.float32).reshape(x.shape[0], tiles, -1)
    mean = xf.mean(-1)
    return mean.T, jnp.square(xf - mean[..., None]).sum(-1).T


def fused_linear(
    x: jax.Array,
    w: jax.Array,
    bias: jax.Array,
    *,
    norm: tuple[jax.Array, jax.Array] | None = None,
    stats: tuple[jax.Array, jax.Array] | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
    residual: jax.Array | None = None,
    emit_stats: bool = False,
    counters: jax.Array | None = None,
    impl: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    splits: int | None = None,
    num_warps: int = DEFAULT_WARPS,
    num_stages: int = DEFAULT_STAGES,
    block_m: int | None = None,
    swap: bool = False,
    interpret: bool = False,
):
    """[residual +] activation(layer_norm(x) @ w.T + bias) -> [M, N] in x's dtype (residual's if given).

    x [M, K]; w [N, K]; bias [N]; norm: (scale, bias) of a layer norm over K with epsilon eps, or
    None; stats: with a norm, x's per-tile (mean, M2) [T, M] from the kernel that produced x
    (`emit_stats`, or `tile_stats`), so the rows' statistics are not walked here; activation: None
    or "gelu_new"; residual [M, N] or None; emit_stats: also return y's per-tile (mean, M2), [N / block_n, M]
    each. impl: "auto" (the kernel on a GPU, else the reference), "triton" (the kernel) or "xla".
    interpret: run the kernel through Pallas' interpreter (CPU tests). block_n / block_k: output
    columns per program and K per loop step, powers of two (None: the defaults, halved until they
    divide); splits: K slices, one program each, reduced in the kernel (None: DEFAULT_SPLITS, halved
    until block_k x splits divides K). counters: a buffer from `counters()` threaded through calls.
    Returns y, then (mean, M2) with emit_stats, then counters when given. With a mesh, rows split
    over "data"; the weights must be whole on each device (no "tensor" split)."""
    _check(x, w, bias, norm, activation, residual)
    if stats is not None and norm is None:
        raise ValueError("stats are a layer norm's: pass norm too")
    eps = float(eps)
    threaded = counters is not None
    cnt = counters if threaded else jnp.zeros((MAX_TILES,), jnp.int32)
    bn = block_n or pick_block(w.shape[0], DEFAULT_BLOCK_N)
    if interpret or resolve_impl(impl) == "triton":
        bk = block_k or pick_block(x.shape[1], DEFAULT_BLOCK_K)
        if bn is None or bk is None:
            raise ValueError(f"N={w.shape[0]} and K={x.shape[1]} must each be divisible by 16 for the fused "
                             "linear kernel; use impl='xla'")
        sp = splits
        if sp is None:
            sp = DEFAULT_SPLITS
            while sp > 1 and x.shape[1] % (bk * sp):
                sp //= 2

        def fn(x, w, bias, norm, stats, residual, cnt):
            return _linear_pallas(x, w, bias, norm, stats, residual, cnt, eps=eps, activation=activation,
                                  block_n=bn, block_k=bk, splits=sp, emit_stats=emit_stats, num_warps=num_warps,
                                  num_stages=num_stages, interpret=interpret, block_m=block_m, swap=swap)
    else:
        def fn(x, w, bias, norm, stats, residual, cnt):
            y = fused_linear_reference(x, w, bias, norm, residual, eps=eps, activation=activation)
            return (y,) + (tile_stats(y, w.shape[0] // bn) if emit_stats else ()) + (cnt,)
    if mesh is not None and mesh.size > 1 and mesh.shape.get("tensor", 1) > 1:
        raise ValueError(f"fused_linear takes whole weights on each device; the mesh splits 'tensor' "
                         f"{mesh.shape['tensor']} ways")
    rows = P("data", None)
    args, specs = [x, w, bias], [rows, P(None, None), P(None)]
    if norm is not None:
        args, specs = args + list(norm), specs + [P(None), P(None)]
    if stats is not None:
        args, specs = args + list(stats), specs + [P(None, "data"), P(None, "data")]
    if residual is not None:
        args, specs = args + [residual], specs + [rows]
    # each device threads its own counters (the buffer is split over "data" with the rows)
    per_device = 1 if mesh is None else mesh.shape.get("data", 1)
    if per_device > 1 and cnt.shape[0] % per_device:
        raise ValueError(f"counters of {cnt.shape[0]} entries do not split over 'data' {per_device} ways")
    args, specs = args + [cnt], specs + [P("data")]

    def call(*a):
        a = list(a)
        take = lambda n: [a.pop(0) for _ in range(n)]  # noqa: E731
        x_, w_, b_ = take(3)
        norm_ = tuple(take(2)) if norm is not None else None
        stats_ = tuple(take(2)) if stats is not None else None
        residual_ = take(1)[0] if residual is not None else None
        return fn(x_, w_, b_, norm_, stats_, residual_, a[0])

    out_specs = (rows,) + ((P(None, "data"),) * 2 if emit_stats else ()) + (P("data"),)
    outs = over_mesh(call, mesh, specs, out_specs, *args)
    y, cnt = outs[0], outs[-1]
    result = (y,) + ((tuple(outs[1:3]),) if emit_stats else ()) + ((cnt,) if threaded else ())
    return result[0] if len(result) == 1 else result


def fused_linear_reference(x, w, bias, norm=None, residual=None, *, eps=1e-5, activation=None):
    """Plain JAX, same contract and roundings as the kernel."""
    f32 = jnp.float32
    a = x
    if norm is not None:
        xf = x.astype(f32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        a = ((xf - mean) * jax.lax.rsqrt(var + eps) * norm[0].astype(f32) + norm[1].astype(f32)).astype(x.dtype)
    y = jax.lax.dot_general(a, w, (((1,), (1,)), ((), ())), preferred_element_type=f32) + bias.astype(f32)
    if activation == "gelu_new":
        y = _gelu_new(y)
    if residual is not None:
        y = y + residual.astype(f32)
    return y.astype(residual.dtype if residual is not None else x.dtype)
