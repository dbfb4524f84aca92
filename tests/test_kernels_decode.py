"""decode_attention: the Triton kernel (interpreted on CPU) and the sharded XLA path vs references."""

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

from energon_jax.kernels import decode_attention as da  # noqa: E402

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _inputs(seed, b, n, s, d, lengths, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (b, n, d), dtype)
    k = jax.random.normal(kk, (b, n, s, d), dtype)
    v = jax.random.normal(kv, (b, n, s, d), dtype)
    return q, k, v, jnp.asarray(lengths, jnp.int32)


def _naive(q, k, v, lengths, scale):
    """Slot by slot, head by head, in float64 numpy."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    out = np.zeros_like(q)
    for b, length in enumerate(np.asarray(lengths)):
        for n in range(q.shape[1]):
            if length == 0:
                continue
            s = k[b, n, :length] @ q[b, n] * scale
            p = np.exp(s - s.max())
            out[b, n] = p @ v[b, n, :length] / p.sum()
    return out


def test_reference_matches_naive():
    q, k, v, lengths = _inputs(0, 4, 3, 130, 16, [1, 7, 0, 129])
    ref = da.decode_attention_reference(q, k, v, lengths, scale=0.25)
    np.testing.assert_allclose(ref, _naive(q, k, v, lengths, 0.25), rtol=1e-5, atol=1e-6)
    assert not np.any(ref[2])  # the empty slot gives zeros, not NaN


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_triton_kernel_matches_reference(dtype):
    # default tiles, a cache of 1000 over four chunks: slots ending mid-chunk, empty chunks, an empty slot
    q, k, v, lengths = _inputs(1, 4, 3, 1000, 32, [1, 7, 0, 1000], dtype)
    out = da._launch_torch(q, k, v, lengths, scale=32**-0.5)
    ref = da.decode_attention_reference(q, k, v, lengths, scale=32**-0.5)
    assert out.dtype == dtype
    tol = TOL[dtype]
    np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("n,d", [(1, 64), (5, 16)])
def test_triton_kernel_small_tiles_and_heads(n, d):
    tiles = da.DecodeTiles(block_s=16, chunk=32)  # many chunks per slot
    q, k, v, lengths = _inputs(2, 3, n, 129, d, [129, 1, 70])
    out = da._launch_torch(q, k, v, lengths, scale=0.3, tiles=tiles)
    ref = da.decode_attention_reference(q, k, v, lengths, scale=0.3)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_xla_path_under_mesh_matches_unsharded():
    devices = np.array(jax.devices()[:8])
    mesh = Mesh(devices.reshape(2, 1, -1) if devices.size % 2 == 0 else devices.reshape(1, 1, -1),
                ("data", "stage", "tensor"))
    q, k, v, lengths = _inputs(3, 4, 8, 33, 16, [33, 0, 5, 17])
    sharded = jax.jit(lambda *a: da.decode_attention(*a, scale=0.25, impl="xla", mesh=mesh))
    out = sharded(q, k, v, lengths)
    ref = da.decode_attention(q, k, v, lengths, scale=0.25, impl="xla")
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_auto_on_cpu_is_the_reference():
    q, k, v, lengths = _inputs(4, 2, 2, 9, 16, [9, 3])
    out = da.decode_attention(q, k, v, lengths, scale=0.25)
    np.testing.assert_array_equal(out, da.decode_attention_reference(q, k, v, lengths, scale=0.25))


def test_bad_inputs_raise():
    q, k, v, lengths = _inputs(5, 2, 2, 9, 16, [9, 3])
    with pytest.raises(ValueError, match="'cuda'.*auto"):
        da.decode_attention(q, k, v, lengths, scale=0.25, impl="cuda")
    with pytest.raises(ValueError, match="q has shape"):
        da.decode_attention(q[:, :1], k, v, lengths, scale=0.25)
    with pytest.raises(ValueError, match="lengths"):
        da.decode_attention(q, k, v, lengths[:1], scale=0.25)
    with pytest.raises(ValueError, match="multiple of block_s"):
        da.DecodeTiles(block_s=64, chunk=100)
