"""A decode step's projections with their neighbours folded in: one kernel computes

    y = [residual +] activation(norm(x) @ w.T + bias)

for the few rows of a decode step (x [M, K], 16 <= M <= 64 a power of two; w [N, K] stored
[out, in] as the models store it). norm is an optional layer norm of x's rows (scale, bias [K]).

Why: at GPT-2 medium, batch 32, ~1,000 tokens of context, a decode step through XLA runs per layer
four GEMMs (17.2 us together) and five small fusions around them: the two layer norms, the bias +
GELU, the two bias + residual adds (10.4 us together; each reads or writes a few hundred KB and is
bounded by its launch and ramp, not by bandwidth). H200 profile, BENCHMARKS.md session 11. Folding
the layer norm into the GEMM that reads its output, and the bias, GELU and residual into the GEMM
that produces them, leaves four kernels and the attention per layer.

Each program owns `block_n` output columns and walks K in `block_k` chunks: it loads all M rows of
the chunk of x (normalising them on the way when there is a norm) and its [block_n, block_k] tile
of w, and accumulates their dot in float32. With a norm each program first walks x once for the
rows' statistics (sum and sum of squares of x minus its first column, so a mean far from zero does
not cancel). x is small (M x K, read from L2); w is read once in all.

Numerics: the normalised rows are rounded to x's dtype before the dot (as the model's layer norm
output is), the dot accumulates in float32, and bias, GELU and residual are applied to the float32
sum before one rounding to the output dtype (the XLA path rounds after the dot and after each add).

Pallas' Triton lowering, as kernels/decode_append.py and for the same reason: XLA launches it back
to back with its own kernels (jax-triton's custom call costs ~4.4 us a launch, launch_cost.py).
Only 16-bit x and w: a float32 dot in Triton runs in TF32 unless asked otherwise.
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


def _kernel(*refs, block_m, block_n, block_k, eps, norm, activation, residual, swap, one_loop):
    refs = list(refs)
    x_ref, w_ref, b_ref = refs[:3]
    g_ref, beta_ref = refs[3:5] if norm else (None, None)
    r_ref = refs[5 if norm else 3] if residual else None
    o_ref = refs[-1]
    f32 = jnp.float32
    k_dim = x_ref.shape[1]
    steps = k_dim // block_k
    cols = pl.ds(pl.multiple_of(pl.program_id(0) * block_n, block_n), block_n)
    rows = pl.ds(pl.multiple_of(pl.program_id(1) * block_m, block_m), block_m)

    def chunk(i):
        return pl.ds(pl.multiple_of(i * block_k, block_k), block_k)

    def dot_t(a, w):  # a [R, bk] . w [bn, bk] -> [R, bn]
        if swap:
            return jax.lax.dot_general(w, a, (((1,), (1,)), ((), ())), preferred_element_type=f32).T
        return jax.lax.dot_general(a, w, (((1,), (1,)), ((), ())), preferred_element_type=f32)

    shift = x_ref[rows, 0].astype(f32) if norm else None  # [bm]: sums of x - shift, for the variance

    if norm and not one_loop:
        def stats(i, carry):
            s1, s2 = carry
            xs = x_ref[rows, chunk(i)].astype(f32) - shift[:, None]
            return s1 + jnp.sum(xs, axis=1), s2 + jnp.sum(xs * xs, axis=1)

        zeros = jnp.zeros(shift.shape, f32)
        s1, s2 = jax.lax.fori_loop(0, steps, stats, (zeros, zeros))
        mean_s = s1 / k_dim
        rstd = jax.lax.rsqrt(jnp.maximum(s2 / k_dim - mean_s * mean_s, 0.0) + eps)
        mean = mean_s + shift

    def step(i, carry):
        ks = chunk(i)
        a = x_ref[rows, ks]
        w = w_ref[cols, ks]  # [block_n, block_k]
        if not norm:
            return carry + dot_t(a, w)
        g = g_ref[ks].astype(f32)
        if not one_loop:
            a = ((a.astype(f32) - mean[:, None]) * rstd[:, None] * g[None, :]
                 + beta_ref[ks].astype(f32)[None, :]).astype(x_ref.dtype)
            return carry + dot_t(a, w)
        # one loop: sum (x - mean) * rstd * g * w = rstd * (sum x g w - mean * sum g w); the sums of g w
        # and beta w come from a 16-row dot of [g; beta; 0 ...] against the same tile
        acc, gb_acc, s1, s2 = carry
        af = a.astype(f32)
        xs = af - shift[:, None]
        r16 = jax.lax.broadcasted_iota(jnp.int32, (16, block_k), 0)
        gb = jnp.where(r16 == 0, g[None, :], jnp.where(r16 == 1, beta_ref[ks].astype(f32)[None, :], 0.0))
        return (acc + dot_t((af * g[None, :]).astype(x_ref.dtype), w), gb_acc + dot_t(gb.astype(x_ref.dtype), w),
                s1 + jnp.sum(xs, axis=1), s2 + jnp.sum(xs * xs, axis=1))

    zeros_mn = jnp.zeros((block_m, block_n), f32)
    if norm and one_loop:
        zeros_m = jnp.zeros((block_m,), f32)
        acc, gb_acc, s1, s2 = jax.lax.fori_loop(0, steps, step, (zeros_mn, jnp.zeros((16, block_n), f32), zeros_m,
                                                                 zeros_m))
        mean_s = s1 / k_dim
        rstd = jax.lax.rsqrt(jnp.maximum(s2 / k_dim - mean_s * mean_s, 0.0) + eps)
        mean = mean_s + shift
        r16 = jax.lax.broadcasted_iota(jnp.int32, (16, block_n), 0)
        gw = jnp.sum(jnp.where(r16 == 0, gb_acc, 0.0), axis=0)  # [bn]: sum_k g w
        bw = jnp.sum(jnp.where(r16 == 1, gb_acc, 0.0), axis=0)  # [bn]: sum_k beta w
        acc = rstd[:, None] * (acc - mean[:, None] * gw[None, :]) + bw[None, :]
    else:
        acc = jax.lax.fori_loop(0, steps, step, zeros_mn)
    y = acc + b_ref[cols].astype(f32)[None, :]
    if activation == "gelu_new":
        y = _gelu_new(y)
    if residual:
        y = y + r_ref[rows, cols].astype(f32)
    o_ref[rows, cols] = y.astype(o_ref.dtype)


def pick_block(dim: int, preferred: int) -> int | None:
    """The largest power of two <= preferred that divides dim, at least 16; None if there is none."""
    b = preferred
    while b >= 16:
        if dim % b == 0:
            return b
        b //= 2
    return None


# Set from benchmarks/bench_kernels.py --kernels linear --sweep (BENCHMARKS.md).
DEFAULT_BLOCK_N = 32
DEFAULT_BLOCK_K = 256
DEFAULT_WARPS = 4
DEFAULT_STAGES = 3


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


@functools.partial(jax.jit, static_argnames=("eps", "activation", "block_m", "block_n", "block_k", "num_warps",
                                             "num_stages", "interpret", "swap", "one_loop"))
def _linear_pallas(x, w, bias, norm, residual, *, eps, activation, block_n, block_k, num_warps, num_stages,
                   interpret, block_m=None, swap=False, one_loop=True):
    m, k = x.shape
    n = w.shape[0]
    if m < MIN_ROWS or m & (m - 1):
        raise ValueError(f"the fused linear kernel takes a power-of-two row count >= {MIN_ROWS}, got {m}")
    if x.dtype.itemsize != 2 or w.dtype != x.dtype:
        raise ValueError(f"the fused linear kernel takes x and w of one 16-bit dtype, got {x.dtype} and {w.dtype}")
    if n % block_n or k % block_k or block_n < 16 or block_k < 16 or block_n & (block_n - 1) or block_k & (block_k - 1):
        raise ValueError(f"block_n={block_n} and block_k={block_k} must be powers of two >= 16 dividing "
                         f"N={n} and K={k}")
    block_m = block_m or m
    if m % block_m or block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m={block_m} must be a power of two >= 16 dividing the {m} rows")
    kernel = functools.partial(_kernel, block_m=block_m, block_n=block_n, block_k=block_k, eps=eps,
                               norm=norm is not None, activation=activation, residual=residual is not None, swap=swap,
                               one_loop=one_loop)
    args = [x, w, bias] + (list(norm) if norm is not None else []) + ([residual] if residual is not None else [])
    extra = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        extra["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    out_dtype = residual.dtype if residual is not None else x.dtype
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((m, n), out_dtype), grid=(n // block_n, m // block_m),
                          interpret=interpret, **extra)(*args)


def fused_linear(
    x: jax.Array,
    w: jax.Array,
    bias: jax.Array,
    *,
    norm: tuple[jax.Array, jax.Array] | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
    residual: jax.Array | None = None,
    impl: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int = DEFAULT_WARPS,
    num_stages: int = DEFAULT_STAGES,
    block_m: int | None = None,
    swap: bool = False,
    one_loop: bool = True,
    interpret: bool = False,
) -> jax.Array:
    """[residual +] activation(layer_norm(x) @ w.T + bias) -> [M, N] in x's dtype (residual's if given).

    x [M, K]; w [N, K]; bias [N]; norm: (scale, bias) of a layer norm over K with epsilon eps, or
    None; activation: None or "gelu_new"; residual [M, N] or None. impl: "auto" (the kernel on a
    GPU, else the reference), "triton" (the kernel) or "xla". interpret: run the kernel through
    Pallas' interpreter (CPU tests). block_n / block_k: output columns per program and K per loop
    step, powers of two dividing N and K (None: the defaults, halved until they divide). With a
    mesh, rows split over "data"; the weights must be whole on each device (no "tensor" split)."""
    _check(x, w, bias, norm, activation, residual)
    eps = float(eps)
    if interpret or resolve_impl(impl) == "triton":
        bn = block_n or pick_block(w.shape[0], DEFAULT_BLOCK_N)
        bk = block_k or pick_block(x.shape[1], DEFAULT_BLOCK_K)
        if bn is None or bk is None:
            raise ValueError(f"N={w.shape[0]} and K={x.shape[1]} must each be divisible by 16 for the fused "
                             "linear kernel; use impl='xla'")

        def fn(x, w, bias, norm, residual):
            return _linear_pallas(x, w, bias, norm, residual, eps=eps, activation=activation, block_n=bn,
                                  block_k=bk, num_warps=num_warps, num_stages=num_stages, interpret=interpret,
                                  block_m=block_m, swap=swap, one_loop=one_loop)
    else:
        fn = functools.partial(fused_linear_reference, eps=eps, activation=activation)
    if mesh is not None and mesh.size > 1 and mesh.shape.get("tensor", 1) > 1:
        raise ValueError(f"fused_linear takes whole weights on each device; the mesh splits 'tensor' "
                         f"{mesh.shape['tensor']} ways")
    rows = P("data", None)
    args, specs = [x, w, bias], [rows, P(None, None), P(None)]
    if norm is not None:
        args, specs = args + list(norm), specs + [P(None), P(None)]
    if residual is not None:
        args, specs = args + [residual], specs + [rows]

    def call(*a):
        return fn(a[0], a[1], a[2], None if norm is None else (a[3], a[4]), None if residual is None else a[-1])

    return over_mesh(call, mesh, specs, rows, *args)


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
