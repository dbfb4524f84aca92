"""Skinny matmul: a few rows of activations times a weight matrix, for batch-1/2 decode.

At batch 1-2 a decode step's projections are bound by reading each weight once: out[M, N] =
x[M, K] @ w[K, N] with M <= 16 and w row-major ([K, N], N contiguous, the layout the models
store). The K axis is cut into `splits` ranges handled by different programs, so even a
[1600, 1600] matrix keeps every SM streaming; each program accumulates a [16, BLOCK_N] tile
(rows padded to 16 for the tensor cores) over its K range and stores float32 partials
[splits, M, N]; the sum over splits (and whatever bias, activation or residual follows) is
left to XLA, which fuses it into one small kernel.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from ._dispatch import from_torch, interpreted, jax_triton, resolve_impl, to_torch

MAX_ROWS = 16  # one tensor-core tile of rows; more rows are a GEMM, XLA's job


@dataclasses.dataclass(frozen=True)
class SkinnyTiles:
    """block_n output columns and block_k weight rows per loop step; k_per_split weight rows per
    program (a multiple of block_k)."""

    block_n: int = 128
    block_k: int = 64
    k_per_split: int = 256
    num_warps: int = 4
    num_stages: int = 4

    def __post_init__(self):
        for name in ("block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two >= 16")
        if self.k_per_split < self.block_k or self.k_per_split % self.block_k:
            raise ValueError(f"k_per_split={self.k_per_split} must be a positive multiple of block_k={self.block_k}")

    def splits(self, k: int) -> int:
        return triton.cdiv(k, self.k_per_split)


@triton.jit
def _skinny_kernel(
    x_ptr, w_ptr,  # x [M, K], w [K, N] row-major
    M, K, N,
    out_ptr,  # float32 partials [splits, M, N]
    K_PER_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % K_PER_SPLIT == 0: no mask on the K axis
    EVEN_N: tl.constexpr,  # N % BLOCK_N == 0
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_live = offs_m < M
    col_live = offs_n < N
    k_lo = split * K_PER_SPLIT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        offs_k = k_lo + k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=row_live[:, None], other=0.0)
            if EVEN_N:
                w = tl.load(w_ptr + offs_k[:, None] * N + offs_n[None, :])
            else:
                w = tl.load(w_ptr + offs_k[:, None] * N + offs_n[None, :], mask=col_live[None, :], other=0.0)
        else:
            k_live = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=row_live[:, None] & k_live[None, :],
                        other=0.0)
            w = tl.load(w_ptr + offs_k[:, None] * N + offs_n[None, :], mask=k_live[:, None] & col_live[None, :],
                        other=0.0)
        acc += tl.dot(x, w)
    out_offs = (split * M + offs_m[:, None]) * N + offs_n[None, :]
    tl.store(out_ptr + out_offs, acc, mask=row_live[:, None] & col_live[None, :])


def _check(x, w):
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"skinny_matmul needs x [M, K] and w [K, N]; got {x.shape} and {w.shape}")
    if not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"skinny_matmul takes 1 to {MAX_ROWS} rows, got {x.shape[0]}; use a GEMM")


def _constexprs(m, k, n, tiles):
    return dict(K_PER_SPLIT=tiles.k_per_split, BLOCK_M=MAX_ROWS, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
                EVEN_K=k % tiles.k_per_split == 0, EVEN_N=n % tiles.block_n == 0)


def _partials_triton(x, w, tiles):
    m, k = x.shape
    n = w.shape[1]
    splits = tiles.splits(k)
    return jax_triton().triton_call(
        x.astype(w.dtype), w, m, k, n,
        kernel=_skinny_kernel,
        out_shape=jax.ShapeDtypeStruct((splits, m, n), jnp.float32),
        grid=(triton.cdiv(n, tiles.block_n), splits),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        **_constexprs(m, k, n, tiles),
    )


def _launch_torch(x, w, tiles=SkinnyTiles()):
    """Run _skinny_kernel under Triton's interpreter on torch CPU copies; returns the partials."""
    import torch

    _check(x, w)
    m, k = x.shape
    n = w.shape[1]
    splits = tiles.splits(k)
    out = torch.full((splits, m, n), float("nan"))  # NaN poison: an unwritten partial shows
    interpreted(_skinny_kernel)[(triton.cdiv(n, tiles.block_n), splits)](
        to_torch(x.astype(w.dtype)), to_torch(w), m, k, n, out, **_constexprs(m, k, n, tiles))
    return from_torch(out, jnp.float32)


def skinny_matmul(x: jax.Array, w: jax.Array, *, impl: str = "auto", tiles: SkinnyTiles = SkinnyTiles()) -> jax.Array:
    """x [M, K] @ w [K, N] -> float32 [M, N], for 1 <= M <= 16 (decode at batch 1-2).

    impl "auto": the Triton kernel on a GPU when w is bfloat16 or float16 (its tensor-core dot
    would round float32 operands to tf32), the reference otherwise; "triton"; "xla". One device:
    under a mesh the caller keeps XLA's GEMMs, which GSPMD partitions."""
    _check(x, w)
    use = resolve_impl(impl)
    if use == "triton" and w.dtype not in (jnp.bfloat16, jnp.float16):
        if impl == "triton":
            raise ValueError(f"skinny_matmul's Triton kernel takes bfloat16/float16 weights, got {w.dtype}")
        use = "xla"
    if use == "xla":
        return skinny_matmul_reference(x, w)
    return jnp.sum(_partials_triton(x, w, tiles), axis=0)


def skinny_matmul_reference(x, w):
    """Plain-JAX x @ w with float32 accumulation, x cast to w's dtype as the kernel does."""
    return jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)
