"""kernels/_dispatch.py: implementation choice, mesh wrapping and their errors."""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from energon_jax.kernels import _dispatch  # noqa: E402


def test_resolve_impl():
    assert _dispatch.resolve_impl("xla") == "xla"
    assert _dispatch.resolve_impl("triton") == "triton"
    assert _dispatch.resolve_impl("auto") == ("triton" if jax.default_backend() == "gpu" else "xla")
    with pytest.raises(ValueError, match=r"impl='Triton' is not one of \('auto', 'triton', 'xla'\)"):
        _dispatch.resolve_impl("Triton")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="jax-triton imports on a CUDA jax")
def test_jax_triton_off_gpu_says_what_to_do():
    with pytest.raises(ImportError, match="impl='xla'"):
        _dispatch.jax_triton()


def test_check_head_dim():
    _dispatch.check_head_dim(64)
    for d in (8, 48):
        with pytest.raises(ValueError, match=f"got {d}"):
            _dispatch.check_head_dim(d)


def _mesh(names=("data", "stage", "tensor")):
    devices = np.array(jax.devices()[:8])
    return Mesh(devices.reshape(2, 1, -1) if devices.size % 2 == 0 else devices.reshape(1, 1, -1), names)


def test_over_mesh_without_mesh_calls_directly():
    x = jnp.arange(6.0)
    assert _dispatch.over_mesh(lambda a: a * 2, None, (P("data"),), P("data"), x).tolist() == (x * 2).tolist()


def test_over_mesh_runs_per_shard():
    mesh = _mesh()
    x = jnp.arange(4 * 8.0).reshape(4, 8)
    # each device sees its own [B/data, N/tensor] block: a per-shard mean shows it
    out = _dispatch.over_mesh(lambda a: a - a.mean(), mesh, (P("data", "tensor"),), P("data", "tensor"), x)
    blocks = np.asarray(x).reshape(mesh.shape["data"], 4 // mesh.shape["data"], mesh.shape["tensor"], -1)
    want = blocks - blocks.mean(axis=(1, 3), keepdims=True)
    np.testing.assert_allclose(out, want.reshape(4, 8))


def test_over_mesh_errors():
    mesh = _mesh()
    if mesh.size == 1:
        pytest.skip("needs several devices")
    with pytest.raises(ValueError, match="does not divide over mesh axis 'tensor'"):
        _dispatch.over_mesh(lambda a: a, mesh, (P(None, "tensor"),), P(None, "tensor"), jnp.zeros((2, 3)))
    odd = _mesh(("batch", "stage", "model"))
    with pytest.raises(ValueError, match="lack"):
        _dispatch.over_mesh(lambda a: a, odd, (P("data"),), P("data"), jnp.zeros((8,)))


def test_auto_decode_attention_uses_xla_below_the_row_threshold():
    """impl="auto" on a GPU sends small decode batches (slots x heads below MIN_TRITON_DECODE_ROWS)
    to XLA's attention, where the Triton kernel is slower; larger ones to the kernel."""
    from energon_jax.engine import gpt
    from energon_jax.models.gpt2 import decode_attention_xla

    calls = []

    def fake_triton(q, k, v, lengths, *, scale):
        calls.append(q.shape)
        return q

    rng = np.random.default_rng(0)
    for b, n in [(1, 12), (2, 25), (32, 12), (64, 16)]:
        q = jnp.asarray(rng.standard_normal((b, n, 16)), jnp.float32)
        k = v = jnp.asarray(rng.standard_normal((b, n, 8, 16)), jnp.float32)
        lengths = jnp.full((b,), 5, jnp.int32)
        out = gpt._decode_by_size(fake_triton, q, k, v, lengths, scale=0.25)
        if b * n < gpt.MIN_TRITON_DECODE_ROWS:
            np.testing.assert_allclose(out, decode_attention_xla(q, k, v, lengths, scale=0.25))
        else:
            assert out is q
    assert calls == [(32, 12, 16), (64, 16, 16)]
