"""Few-row projections for decode, fused with what surrounds them in a GPT-2 block.

At batch 1 a decode step is ~12 kernels per layer, and on the GPU each costs a ramp and a drain
of ~2 us besides its bytes (BENCHMARKS.md, sessions 3-7): GPT-2 XL's 48 layers spend ~0.8 ms of
a 2.5 ms step in kernels that touch a few kilobytes. This kernel folds the layer norm before a
projection and the bias, activation and residual after it into the projection itself:

    y[m, :] = act(LN(x[m, :]) @ W[layer] + b[layer]) + residual[m, :]

W is a stack of per-layer weights [L, K, N] with the layer chosen by a traced index, so the
kernel reads the slice of the stack in place (a dynamic slice feeding a custom call would be
copied first). Each program owns BLOCK_N output columns for every row and streams W[layer]'s
[K, BLOCK_N] column strip once; the rows (1-8) share every weight tile. The layer norm's
statistics are recomputed by every program from x, which is a few KB and stays in cache.

Written in Pallas with its Triton lowering rather than a `@triton.jit` kernel through
jax-triton: jax-triton 0.3.1 launches through a legacy custom call that jaxlib looks up by the
whole compressed kernel on every launch, which costs more host time than these ~5 us kernels
take on the GPU (session 6 measured it); Pallas emits XLA's own Triton custom call, launched
like any XLA kernel. `gemv_xla` is the reference; CPU tests run the kernel through Pallas'
interpreter against it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


ACTS = (None, "gelu_new")
MAX_ROWS = 4


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def _gelu_new(x):
    return 0.5 * x * (1.0 + jnp.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


def gemv_xla(x_mk, w_lkn, b_ln, layer, *, ln=None, eps=1e-5, act=None, residual_mn=None, transposed=False):
    """Reference: act(LN(x) @ w[layer] + b[layer]) (+ residual), computed as the model does.

    ln: None or (scale_lk, bias_lk). transposed: w is stored [L, N, K]. The normalised x is rounded to x's dtype before the
    product, the product accumulates in float32."""
    x = x_mk
    if ln is not None:
        g = jax.lax.dynamic_index_in_dim(ln[0], layer, 0, keepdims=False).astype(jnp.float32)
        beta = jax.lax.dynamic_index_in_dim(ln[1], layer, 0, keepdims=False).astype(jnp.float32)
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        x = ((xf - mean) * jax.lax.rsqrt(var + eps) * g + beta).astype(x_mk.dtype)
    w = jax.lax.dynamic_index_in_dim(w_lkn, layer, 0, keepdims=False)
    b = jax.lax.dynamic_index_in_dim(b_ln, layer, 0, keepdims=False)
    y = jnp.dot(x, w.T if transposed else w, preferred_element_type=jnp.float32) + b.astype(jnp.float32)
    if act == "gelu_new":
        y = _gelu_new(y)
    if residual_mn is not None:
        y = y + residual_mn.astype(jnp.float32)
    return y.astype(x_mk.dtype)


def _kernel(layer_ref, x_ref, w_ref, b_ref, *refs, rows, k, block_k, block_n, unroll, transposed, has_ln, eps, act,
            has_res):
    refs = list(refs)
    if has_ln:
        g_ref, beta_ref = refs.pop(0), refs.pop(0)
    res_ref = refs.pop(0) if has_res else None
    (o_ref,) = refs
    f32 = jnp.float32
    layer = layer_ref[0]
    cols = pl.ds(pl.multiple_of(pl.program_id(0) * block_n, block_n), block_n)
    nk = k // block_k

    def chunk(i):
        if isinstance(i, int):
            return pl.ds(i * block_k, block_k)
        return pl.ds(pl.multiple_of(i * block_k, block_k), block_k)

    if has_ln:  # x is a few KB: read it in straight-line code, every load in flight at once
        xs = [x_ref[:, chunk(i)].astype(f32) for i in range(nk)]
        mean = sum(jnp.sum(c, axis=1) for c in xs) / k
        var = sum(jnp.sum((c - mean[:, None]) ** 2, axis=1) for c in xs) / k
        rstd = jax.lax.rsqrt(var + eps)

    def step(j, accs):
        # `unroll` chunks per iteration, written out so that their weight loads are issued
        # together (Triton does not software-pipeline loads that feed no tl.dot). Each row
        # multiply-accumulates into its own [block_k, block_n] tile; the reduction over k
        # happens once, after the loop.
        accs = list(accs)
        for u in range(unroll):
            ks = chunk(j * unroll + u)
            x = x_ref[:, ks]
            if has_ln:
                xn = (x.astype(f32) - mean[:, None]) * rstd[:, None]
                xn = xn * g_ref[layer, ks].astype(f32)[None, :] + beta_ref[layer, ks].astype(f32)[None, :]
                x = xn.astype(x_ref.dtype)
            x = x.astype(f32)
            if transposed:  # W stored [L, N, K]: each output column's weights are contiguous
                w = w_ref[layer, cols, ks].astype(f32)  # [block_n, block_k]
                accs = [acc + w * x[r][None, :] for r, acc in enumerate(accs)]
            else:
                w = w_ref[layer, ks, cols].astype(f32)  # [block_k, block_n]
                accs = [acc + x[r][:, None] * w for r, acc in enumerate(accs)]
        return tuple(accs)

    tile, red = ((block_n, block_k), 1) if transposed else ((block_k, block_n), 0)
    accs = jax.lax.fori_loop(0, nk // unroll, step, tuple(jnp.zeros(tile, f32) for _ in range(rows)))
    acc = jnp.stack([jnp.sum(a, axis=red) for a in accs]) if rows > 1 else jnp.sum(accs[0], axis=red)[None, :]
    y = acc + b_ref[layer, cols].astype(f32)[None, :]
    if act == "gelu_new":
        y = _gelu_new(y)
    if has_res:
        y = y + res_ref[:, cols].astype(f32)
    o_ref[:, cols] = y.astype(o_ref.dtype)


def _largest_divisor(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


# Pallas is imported at module level: it ships with jax (no extra dependency, no GPU needed).
from jax.experimental import pallas as pl  # noqa: E402


@functools.partial(jax.jit, static_argnames=("eps", "act", "transposed", "block_n", "block_k", "unroll", "num_warps",
                                             "num_stages", "interpret"))
def gemv_pallas(x_mk, w_lkn, b_ln, layer, *, ln=None, eps=1e-5, act=None, residual_mn=None, transposed=False,
                block_n=None,
                block_k=None, unroll=None, num_warps=4, num_stages=3, interpret=False):
    """The fused kernel; same contract as gemv_xla."""
    rows, k = x_mk.shape
    n_layers, k_w, n = w_lkn.shape
    if transposed:
        n, k_w = k_w, n
    if k_w != k or b_ln.shape != (n_layers, n):
        raise ValueError(f"gemv: x {x_mk.shape}, w {w_lkn.shape}, b {b_ln.shape} do not agree")
    if rows > MAX_ROWS or rows & (rows - 1):
        raise ValueError(f"gemv: rows must be a power of two <= {MAX_ROWS}, got {rows}")
    if act not in ACTS:
        raise ValueError(f"gemv: act={act!r} is not one of {ACTS}")
    block_n = block_n or _pow2_divisor(n, 16)
    block_k = block_k or _pow2_divisor(k, 128 // rows)
    if n % block_n or k % block_k:
        raise ValueError(f"gemv: block_n={block_n}, block_k={block_k} must divide N={n}, K={k}")
    unroll = unroll or _largest_divisor(k // block_k, 32)
    if (k // block_k) % unroll:
        raise ValueError(f"gemv: unroll={unroll} must divide K / block_k = {k // block_k}")
    args = [jnp.reshape(layer, (1,)).astype(jnp.int32), x_mk, w_lkn, b_ln]
    if ln is not None:
        args += [ln[0], ln[1]]
    if residual_mn is not None:
        args.append(residual_mn)
    kernel = functools.partial(_kernel, rows=rows, k=k, block_k=block_k, block_n=block_n, unroll=unroll,
                               transposed=transposed, has_ln=ln is not None,
                               eps=eps, act=act, has_res=residual_mn is not None)
    extra = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu
        extra["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((rows, n), x_mk.dtype), grid=(n // block_n,),
                          interpret=interpret, **extra)(*args)
