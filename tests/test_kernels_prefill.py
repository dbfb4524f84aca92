"""prefill_attention: the Triton kernel (interpreted on CPU) and the sharded XLA path vs references."""

import os

# Triton reads TRITON_INTERPRET when first imported, jax its device count when first used
os.environ.setdefault("TRITON_INTERPRET", "1")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from energon_jax.kernels import prefill_attention as pa  # noqa: E402

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _inputs(seed, b, t, n, d, lengths, dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q, k, v = (jax.random.normal(key, (b, t, n, d), dtype) for key in keys)
    return q, k, v, jnp.asarray(lengths, jnp.int32)


def _naive(q, k, v, lengths, scale):
    """Row by row, head by head, query by query, in float64 numpy."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    out = np.zeros_like(q)
    for b, length in enumerate(np.asarray(lengths)):
        for n in range(q.shape[2]):
            for i in range(length):
                s = k[b, : i + 1, n] @ q[b, i, n] * scale
                p = np.exp(s - s.max())
                out[b, i, n] = p @ v[b, : i + 1, n] / p.sum()
    return out


def test_reference_matches_naive():
    q, k, v, lengths = _inputs(0, 3, 20, 2, 16, [1, 20, 0])
    ref = pa.prefill_attention_reference(q, k, v, lengths, scale=0.25)
    np.testing.assert_allclose(ref, _naive(q, k, v, lengths, 0.25), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_triton_kernel_matches_reference(dtype):
    # 129 positions over three 64-row blocks; a row of 1 token, one of 7, one full
    q, k, v, lengths = _inputs(1, 3, 129, 2, 32, [1, 7, 129], dtype)
    out = pa._launch_torch(q, k, v, lengths, scale=32**-0.5)
    ref = pa.prefill_attention_reference(q, k, v, lengths, scale=32**-0.5)
    assert out.dtype == dtype
    tol = TOL[dtype]
    np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32), rtol=tol, atol=tol)


def test_triton_kernel_long_row_small_tiles():
    tiles = pa.FlashTiles(block_m=32, block_n=16)  # unequal blocks: the diagonal moves inside a block
    q, k, v, lengths = _inputs(2, 2, 1000, 1, 16, [1000, 0])
    out = pa._launch_torch(q, k, v, lengths, scale=0.25, tiles=tiles)
    ref = pa.prefill_attention_reference(q, k, v, lengths, scale=0.25)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert not np.any(out[1])


def test_triton_kernel_d64_three_heads():
    q, k, v, lengths = _inputs(3, 1, 70, 3, 64, [70])
    out = pa._launch_torch(q, k, v, lengths, scale=0.125)
    ref = pa.prefill_attention_reference(q, k, v, lengths, scale=0.125)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_xla_path_under_mesh_matches_unsharded():
    devices = np.array(jax.devices()[:8])
    mesh = Mesh(devices.reshape(2, 1, -1) if devices.size % 2 == 0 else devices.reshape(1, 1, -1),
                ("data", "stage", "tensor"))
    q, k, v, lengths = _inputs(4, 4, 12, 8, 16, [12, 0, 5, 1])
    sharded = jax.jit(lambda *a: pa.prefill_attention(*a, scale=0.25, impl="xla", mesh=mesh))
    out = sharded(q, k, v, lengths)
    ref = pa.prefill_attention(q, k, v, lengths, scale=0.25, impl="xla")
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_bad_inputs_raise():
    q, k, v, lengths = _inputs(5, 2, 8, 2, 16, [8, 3])
    with pytest.raises(ValueError, match="'gpu'.*auto"):
        pa.prefill_attention(q, k, v, lengths, scale=0.25, impl="gpu")
    with pytest.raises(ValueError, match=r"\[B, T, N, D\]"):
        pa.prefill_attention(q, k[:, :4], v, lengths, scale=0.25)
    with pytest.raises(ValueError, match="lengths"):
        pa.prefill_attention(q, k, v, lengths[:1], scale=0.25)
