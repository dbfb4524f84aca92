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

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}


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
    # default tiles: 12 rows cut a cache of 1000 into 16 chunks (slots ending mid-chunk, empty
    # chunks, an empty slot); the bf16 cache goes through the tl.dot variant, fp32 through exact sums
    q, k, v, lengths = _inputs(1, 4, 3, 1000, 32, [1, 7, 0, 1000], dtype)
    assert da.DecodeTiles().num_splits(1000, 12) == 16
    out = da._launch_torch(q, k, v, lengths, scale=32**-0.5)
    ref = da.decode_attention_reference(q, k, v, lengths, scale=32**-0.5)
    assert out.dtype == dtype
    tol = TOL[dtype]
    np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("n,d", [(1, 64), (5, 16)])
def test_triton_kernel_small_tiles_and_heads(n, d):
    tiles = da.DecodeTiles(block_s=16, chunk=32, mma=False)  # many chunks per slot
    q, k, v, lengths = _inputs(2, 3, n, 129, d, [129, 1, 70])
    out = da._launch_torch(q, k, v, lengths, scale=0.3, tiles=tiles)
    ref = da.decode_attention_reference(q, k, v, lengths, scale=0.3)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_triton_kernel_one_chunk_per_slot_writes_the_output(dtype):
    # chunk >= cache length: one program per (slot, head) normalises and stores in q's dtype, no merge
    tiles = da.DecodeTiles(block_s=64, chunk=1024, mma=False)
    assert tiles.num_splits(1000, 12) == 1
    q, k, v, lengths = _inputs(6, 4, 3, 1000, 32, [1000, 7, 0, 129], dtype)
    out = da._launch_torch(q, k, v, lengths, scale=32**-0.5, tiles=tiles)
    ref = da.decode_attention_reference(q, k, v, lengths, scale=32**-0.5)
    assert out.dtype == dtype and out.shape == q.shape
    assert not np.any(np.asarray(out[2], np.float32))  # the empty slot gives zeros, not NaN
    tol = TOL[dtype]
    np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("chunk", [32, 1024], ids=["chunks", "one-chunk"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_triton_kernel_mma_variant_matches_reference(dtype, chunk):
    # mma=True: scores and the V sum through tl.dot for bf16; an fp32 cache keeps the exact sums
    tiles = da.DecodeTiles(block_s=32, chunk=chunk, mma=True)
    q, k, v, lengths = _inputs(7, 3, 2, 1000, 16, [1000, 0, 33], dtype)
    assert da._use_mma(tiles, q, k, v) == (dtype == jnp.bfloat16)
    out = da._launch_torch(q, k, v, lengths, scale=0.25, tiles=tiles)
    ref = da.decode_attention_reference(q, k, v, lengths, scale=0.25)
    assert out.dtype == dtype and not np.any(np.asarray(out[1], np.float32))
    tol = TOL[dtype]
    np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
def test_triton_kernel_default_tiles_one_program_per_row(dtype):
    # the defaults as a decode batch of >= min_programs rows runs them: tl.dot, one chunk, no merge
    tiles = da.DecodeTiles(min_programs=1)
    q, k, v, lengths = _inputs(9, 3, 2, 300, 64, [300, 0, 129], dtype)
    assert tiles.num_splits(300, 6) == 1 and da._use_mma(tiles, q, k, v)
    out = da._launch_torch(q, k, v, lengths, scale=0.125, tiles=tiles)
    ref = da.decode_attention_reference(q, k, v, lengths, scale=0.125)
    assert out.dtype == dtype and not np.any(np.asarray(out[1], np.float32))
    np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32), rtol=TOL[dtype], atol=TOL[dtype])


def test_triton_kernel_mma_several_blocks_per_chunk_and_a_merge():
    tiles = da.DecodeTiles(block_s=16, chunk=64)  # 4 loop steps a program, 16 chunks merged
    q, k, v, lengths = _inputs(10, 2, 3, 1000, 32, [1000, 517], jnp.bfloat16)
    assert tiles.num_splits(1000, 6) == 16 and da._use_mma(tiles, q, k, v)
    out = da._launch_torch(q, k, v, lengths, scale=32**-0.5, tiles=tiles)
    ref = da.decode_attention_reference(q, k, v, lengths, scale=32**-0.5)
    np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32), rtol=1e-2, atol=1e-2)


def test_triton_kernel_fp32_query_over_a_bf16_cache():
    # tl.dot takes one operand type: a mixed call keeps the elementwise sums (and the fp32 query)
    q, k, v, lengths = _inputs(8, 2, 3, 200, 32, [200, 57], jnp.bfloat16)
    q = q.astype(jnp.float32) * 1.001  # not representable in bf16
    assert not da._use_mma(da.DecodeTiles(), q, k, v)
    out = da._launch_torch(q, k, v, lengths, scale=0.2)
    ref = da.decode_attention_reference(q, k, v, lengths, scale=0.2)
    assert out.dtype == jnp.float32
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
    with pytest.raises(ValueError, match="block_s=48 must be a power of two"):
        da.DecodeTiles(block_s=48)


def test_default_tiles_split_only_to_fill_the_gpu():
    tiles = da.DecodeTiles()  # block_s 64, min_programs 256
    assert tiles.chunk_for(1024, 512) == 1024  # GPT-2 medium at batch 32: a program per row, no merge
    assert tiles.chunk_for(2048, 800) == 2048 and tiles.num_splits(512, 256) == 1
    assert tiles.num_splits(1024, 128) == 2  # 256 programs
    assert tiles.num_splits(512, 25) == 8  # one slot of GPT-2 XL: one block of 64 positions per program
    assert tiles.chunk_for(1000, 3) == 64 and tiles.num_splits(1000, 3) == 16
    assert tiles.chunk_for(1000, 100) == 320 and tiles.num_splits(1000, 100) == 4  # chunks stay whole blocks
    for s in range(1, 1100, 7):  # every split reaches min_programs where the cache has enough blocks
        for rows in (1, 3, 25, 64, 86, 100, 255, 256, 300):
            chunk = tiles.chunk_for(s, rows)
            assert chunk % 64 == 0 and chunk >= 64
            assert rows * tiles.num_splits(s, rows) >= min(256, rows * -(-s // 64)), (s, rows)
    assert tiles.chunk_for(0, 0) == 64  # an empty batch or cache: one block, no division by zero
    with pytest.raises(ValueError, match="min_programs=0"):
        da.DecodeTiles(min_programs=0)
