"""decode_attention_pallas: the Pallas kernel through Pallas' interpreter (CPU) vs the reference."""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from energon_jax.kernels.decode_attention import decode_attention_reference  # noqa: E402
from energon_jax.kernels.decode_attention_pallas import decode_attention_pallas  # noqa: E402

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _inputs(seed, b, n, s, d, lengths, dtype):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (b, n, d), dtype)
    k = jax.random.normal(kk, (b, n, s, d), dtype)
    v = jax.random.normal(kv, (b, n, s, d), dtype)
    return q, k, v, jnp.asarray(lengths, jnp.int32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("b,n,s,lengths,block_s", [
    (4, 3, 1024, [1, 7, 129, 1000], 64),
    (2, 5, 256, [0, 256], 32),  # an empty slot gives zeros; a full one reads every block
    (1, 25, 128, [65], 16),  # GPT-2 XL's heads at batch 1
])
def test_matches_reference(dtype, b, n, s, lengths, block_s):
    q, k, v, lens = _inputs(b * s, b, n, s, 64, lengths, dtype)
    # garbage past each slot's length must not leak in
    k = jnp.where(jnp.arange(s)[None, None, :, None] < lens[:, None, None, None], k, 1e4)
    out = decode_attention_pallas(q, k, v, lens, scale=0.125, block_s=block_s, interpret=True)
    ref = decode_attention_reference(q, k, v, lens, scale=0.125)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=TOL[dtype], rtol=0)
    if 0 in lengths:
        assert not np.asarray(out[lengths.index(0)], np.float32).any()


def test_over_a_mesh_each_device_runs_its_heads():
    q, k, v, lens = _inputs(3, 4, 8, 64, 16, [3, 64, 17, 1], jnp.float32)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 1, 4), ("data", "stage", "tensor"))
    out = decode_attention_pallas(q, k, v, lens, scale=0.25, block_s=16, mesh=mesh, interpret=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(decode_attention_reference(q, k, v, lens, scale=0.25)),
                               atol=1e-5, rtol=0)


def test_bad_block_size_is_refused():
    q, k, v, lens = _inputs(0, 1, 2, 96, 16, [5], jnp.float32)
    with pytest.raises(ValueError, match="block_s=64 must be a power of two dividing the cache length 96"):
        decode_attention_pallas(q, k, v, lens, scale=1.0, block_s=64, interpret=True)
