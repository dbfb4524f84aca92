"""varlen_attention: the Triton kernel (interpreted on CPU) and the sharded XLA path vs references."""

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

from energon_jax.kernels import varlen_attention as va  # noqa: E402

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _inputs(seed, seq_lens, pad, n, d, dtype=jnp.float32):
    """Sequences of seq_lens packed back to back, then pad padding tokens."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    t = sum(seq_lens) + pad
    q, k, v = (jax.random.normal(key, (t, n, d), dtype) for key in keys)
    return q, k, v, jnp.asarray(np.concatenate([[0], np.cumsum(seq_lens)]), jnp.int32)


def _naive(q, k, v, cu, scale):
    """Sequence by sequence, head by head, in float64 numpy; padding rows zero."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    out = np.zeros_like(q)
    cu = np.asarray(cu)
    for lo, hi in zip(cu[:-1], cu[1:]):
        if hi == lo:
            continue
        for n in range(q.shape[1]):
            s = q[lo:hi, n] @ k[lo:hi, n].T * scale  # [L, L]
            p = np.exp(s - s.max(axis=1, keepdims=True))
            out[lo:hi, n] = p @ v[lo:hi, n] / p.sum(axis=1, keepdims=True)
    return out


def test_reference_matches_naive():
    q, k, v, cu = _inputs(0, [1, 7, 0, 30], 5, 2, 16)
    ref = va.varlen_attention_reference(q, k, v, cu, scale=0.25, max_seqlen=30)
    np.testing.assert_allclose(ref, _naive(q, k, v, cu, 0.25), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_triton_kernel_matches_reference(dtype):
    # sequences of 1, 7, 129 (three 64-row blocks), an empty one, 40; then 5 padding tokens
    q, k, v, cu = _inputs(1, [1, 7, 129, 0, 40], 5, 3, 32, dtype)
    out = va._launch_torch(q, k, v, cu, scale=32**-0.5, max_seqlen=129)
    ref = va.varlen_attention_reference(q, k, v, cu, scale=32**-0.5, max_seqlen=129)
    assert out.dtype == dtype
    tol = TOL[dtype]
    np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32), rtol=tol, atol=tol)
    assert not np.any(out[-5:].astype(np.float32))


def test_triton_kernel_long_sequence_small_tiles():
    tiles = va.FlashTiles(block_m=32, block_n=64)  # unequal blocks
    q, k, v, cu = _inputs(2, [1000, 7], 3, 1, 16)
    out = va._launch_torch(q, k, v, cu, scale=0.25, max_seqlen=1000, tiles=tiles)
    ref = va.varlen_attention_reference(q, k, v, cu, scale=0.25, max_seqlen=1000)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_triton_kernel_d64():
    q, k, v, cu = _inputs(3, [33, 64], 0, 2, 64)
    out = va._launch_torch(q, k, v, cu, scale=0.125, max_seqlen=64)
    ref = va.varlen_attention_reference(q, k, v, cu, scale=0.125, max_seqlen=64)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_xla_path_under_mesh_matches_unsharded():
    devices = np.array(jax.devices()[:8])
    mesh = Mesh(devices.reshape(2, 1, -1) if devices.size % 2 == 0 else devices.reshape(1, 1, -1),
                ("data", "stage", "tensor"))
    q, k, v, cu = _inputs(4, [3, 17, 1], 4, 8, 16)
    sharded = jax.jit(lambda *a: va.varlen_attention(*a, scale=0.25, max_seqlen=17, impl="xla", mesh=mesh))
    out = sharded(q, k, v, cu)
    ref = va.varlen_attention(q, k, v, cu, scale=0.25, max_seqlen=17, impl="xla")
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_bad_inputs_raise():
    q, k, v, cu = _inputs(5, [3, 5], 0, 2, 16)
    with pytest.raises(ValueError, match="'pallas'.*auto"):
        va.varlen_attention(q, k, v, cu, scale=0.25, max_seqlen=5, impl="pallas")
    with pytest.raises(ValueError, match="max_seqlen"):
        va.varlen_attention(q, k, v, cu, scale=0.25, max_seqlen=jnp.int32(5))
    with pytest.raises(ValueError, match="cu_seqlens"):
        va.varlen_attention(q, k, v, cu[:1], scale=0.25, max_seqlen=5)
