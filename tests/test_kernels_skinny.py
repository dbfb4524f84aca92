"""skinny_matmul: the split-K Triton kernel (interpreted on CPU) against x @ w in float64."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read by Triton at its first import

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from energon_jax.kernels import skinny_matmul as sm  # noqa: E402


def _inputs(seed, m, k, n, dtype):
    kx, kw = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(kx, (m, k), jnp.float32).astype(dtype), jax.random.normal(kw, (k, n), jnp.float32).astype(dtype)


def _exact(x, w):
    return np.asarray(x, np.float64) @ np.asarray(w, np.float64)


@pytest.mark.parametrize("m,k,n,tiles", [
    (1, 7, 1000, sm.SkinnyTiles(block_n=64, block_k=16, k_per_split=16)),  # K under one step; ragged N
    (2, 129, 129, sm.SkinnyTiles(block_n=32, block_k=32, k_per_split=64)),  # ragged last split and columns
    (3, 256, 96, sm.SkinnyTiles(block_n=32, block_k=32, k_per_split=64)),  # even K and N: the unmasked loads
    (16, 1000, 48, sm.SkinnyTiles(block_n=16, block_k=64, k_per_split=128)),
], ids=["m1", "m2-ragged", "m3-even", "m16"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_kernel_partials_sum_to_product(m, k, n, tiles, dtype):
    x, w = _inputs(m + k, m, k, n, dtype)
    parts = sm._launch_torch(x, w, tiles)
    assert parts.shape == (tiles.splits(k), m, n)
    assert not np.isnan(np.asarray(parts)).any()  # every partial written
    # bf16/f16 products are exact in f32: only the f32 summation order differs from float64
    np.testing.assert_allclose(np.asarray(parts.sum(0)), _exact(x, w), rtol=1e-4, atol=1e-3 * np.sqrt(k))


def test_reference_and_dispatch():
    x, w = _inputs(0, 2, 40, 24, jnp.bfloat16)
    ref = sm.skinny_matmul_reference(x, w)
    assert ref.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ref), _exact(x, w), rtol=1e-5, atol=1e-4)
    # on CPU "auto" is the reference
    np.testing.assert_array_equal(np.asarray(sm.skinny_matmul(x, w)), np.asarray(ref))
    # float32 activations are cast to the weights' dtype, as the kernel reads them
    np.testing.assert_array_equal(np.asarray(sm.skinny_matmul(x.astype(jnp.float32), w, impl="xla")), np.asarray(ref))


def test_bad_input_names_the_value():
    x, w = _inputs(0, 2, 40, 24, jnp.bfloat16)
    with pytest.raises(ValueError, match=r"x \[M, K\] and w \[K, N\]"):
        sm.skinny_matmul(x, w.T)
    with pytest.raises(ValueError, match="1 to 16 rows, got 17"):
        sm.skinny_matmul(jnp.zeros((17, 40), jnp.bfloat16), w)
    with pytest.raises(ValueError, match="bfloat16/float16 weights, got float32"):
        sm.skinny_matmul(x, w.astype(jnp.float32), impl="triton")
    with pytest.raises(ValueError, match="block_n=48 must be a power of two"):
        sm.SkinnyTiles(block_n=48)
    with pytest.raises(ValueError, match="k_per_split=100 must be a positive multiple of block_k=64"):
        sm.SkinnyTiles(k_per_split=100)
