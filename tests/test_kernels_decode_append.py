"""kernels/decode_append.py: the fused cache write + decode attention, through Pallas' interpreter
on CPU, against its plain-JAX reference; and the model decoding through it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from energon_jax.kernels import decode_append as da

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}


def _inputs(b, n, s, d, dtype, seed=0, cache_dtype=None):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    qkv = jax.random.normal(ks[0], (b, 3, n, d), jnp.float32).astype(dtype)
    cache_dtype = cache_dtype or dtype
    k = jax.random.normal(ks[1], (b, n, s, d), jnp.float32).astype(cache_dtype)
    v = jax.random.normal(ks[2], (b, n, s, d), jnp.float32).astype(cache_dtype)
    return qkv, k, v


def _check(qkv, k, v, pos, *, scale, block_s, tol):
    """The kernel with one program per row (splits=1) and with its default runs (a few rows here:
    several runs each) against the reference."""
    want, k2, v2 = da.decode_append_reference(qkv, k, v, pos, scale=scale)
    for splits in (1, None):
        out, k1, v1 = da.decode_append_attention(qkv, k, v, pos, scale=scale, block_s=block_s, splits=splits,
                                                 interpret=True)
        assert out.dtype == qkv.dtype and k1.dtype == k.dtype
        np.testing.assert_array_equal(np.asarray(k1, np.float32), np.asarray(k2, np.float32))
        np.testing.assert_array_equal(np.asarray(v1, np.float32), np.asarray(v2, np.float32))
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)
    return out, k1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_against_reference_odd_positions(dtype):
    # positions 0 (nothing older), 1, 6, 128 and 999 (last block partly live), 1023 (the last slot)
    pos = jnp.array([0, 1, 6, 128, 999, 1023], jnp.int32)
    qkv, k, v = _inputs(6, 3, 1024, 32, dtype)
    _check(qkv, k, v, pos, scale=32 ** -0.5, block_s=64, tol=TOL[dtype])


@pytest.mark.parametrize("heads,block_s", [(1, 16), (5, 32), (12, 128)])
def test_head_counts_and_blocks(heads, block_s):
    pos = jnp.array([129, 7], jnp.int32)
    qkv, k, v = _inputs(2, heads, 256, 16, jnp.bfloat16, seed=heads)
    _check(qkv, k, v, pos, scale=0.25, block_s=block_s, tol=TOL[jnp.bfloat16])


def test_positions_past_the_cache_clamp_like_dynamic_update_slice():
    qkv, k, v = _inputs(2, 2, 64, 16, jnp.float32)
    out, k1 = _check(qkv, k, v, jnp.array([64, 500], jnp.int32), scale=0.25, block_s=16, tol=2e-5)
    np.testing.assert_array_equal(k1[:, :, 63], qkv[:, 1])  # written at the last position


def test_nothing_but_the_row_at_pos_changes():
    qkv, k, v = _inputs(3, 2, 128, 16, jnp.bfloat16)
    pos = jnp.array([5, 0, 127], jnp.int32)
    _, k1, v1 = da.decode_append_attention(qkv, k, v, pos, scale=0.25, block_s=32, interpret=True)
    changed = np.argwhere(np.any(np.asarray(k1, np.float32) != np.asarray(k, np.float32), axis=-1))
    assert {(int(b), int(s)) for b, _, s in changed} <= {(0, 5), (1, 0), (2, 127)}
    np.testing.assert_array_equal(np.asarray(v1[np.arange(3), :, pos], np.float32),
                                  np.asarray(qkv[:, 2], np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_stale_values_from_the_position_on_are_ignored(dtype):
    """The cache from a slot's position on may hold anything (an earlier request's tokens, or
    garbage): NaN keys and infinite values there change nothing, in the dot path (16-bit) and the
    elementwise one (float32)."""
    qkv, k, v = _inputs(1, 2, 128, 16, dtype)
    pos = jnp.array([40], jnp.int32)
    k_bad = k.at[:, :, 40:].set(jnp.nan)
    v_bad = v.at[:, :, 40:].set(jnp.inf)
    for splits in (1, 2):
        base, _, _ = da.decode_append_attention(qkv, k, v, pos, scale=0.25, block_s=32, splits=splits,
                                                interpret=True)
        out, _, _ = da.decode_append_attention(qkv, k_bad, v_bad, pos, scale=0.25, block_s=32, splits=splits,
                                               interpret=True)
        assert not np.isnan(np.asarray(out, np.float32)).any()
        np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(base, np.float32))


def test_equals_the_models_xla_write_and_attention():
    """Against what the XLA path of models/gpt2.py does: write_token, then decode_attention_xla over
    positions + 1 (a position past the cache is clamped by dynamic_update_slice: both agree)."""
    from energon_jax.models.gpt2 import decode_attention_xla, write_token

    qkv, k, v = _inputs(4, 2, 64, 16, jnp.float32)
    pos = jnp.array([0, 9, 63, 80], jnp.int32)
    out, k1, v1 = da.decode_append_attention(qkv, k, v, pos, scale=0.25, block_s=16, interpret=True)
    k2 = write_token(k[None], qkv[:, 1], 0, pos)[0]
    v2 = write_token(v[None], qkv[:, 2], 0, pos)[0]
    want = decode_attention_xla(qkv[:, 0], k2, v2, pos + 1, scale=0.25)
    np.testing.assert_array_equal(k1, k2)
    np.testing.assert_array_equal(v1, v2)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)


def test_mixed_dtypes_use_exact_sums():
    """A float32 token over a bfloat16 cache: no dot (one operand type), elementwise float32 sums."""
    qkv, k, v = _inputs(2, 2, 128, 16, jnp.float32, cache_dtype=jnp.bfloat16)
    assert not da.uses_mma(qkv, k, v)
    _check(qkv, k, v, jnp.array([3, 100], jnp.int32), scale=0.25, block_s=32, tol=2e-5)


def test_over_a_mesh():
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 1, 4), ("data", "stage", "tensor"))
    qkv, k, v = _inputs(4, 8, 128, 16, jnp.float32)
    pos = jnp.array([0, 17, 64, 127], jnp.int32)
    out, k1, v1 = da.decode_append_attention(qkv, k, v, pos, scale=0.25, block_s=32, mesh=mesh, interpret=True)
    want, k2, v2 = da.decode_append_reference(qkv, k, v, pos, scale=0.25)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(k1, k2)
    np.testing.assert_array_equal(v1, v2)


def test_bad_shapes_and_blocks():
    qkv, k, v = _inputs(2, 2, 96, 16, jnp.float32)
    pos = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match=r"block_s=64 must be a power of two >= 16 dividing the cache length 96"):
        da.decode_append_attention(qkv, k, v, pos, scale=1.0, block_s=64, interpret=True)
    with pytest.raises(ValueError, match=r"qkv has shape \(2, 2, 2, 16\); expected \[B, 3, N, D\]"):
        da.decode_append_attention(qkv[:, :2], k, v, pos, scale=1.0, block_s=32, interpret=True)
    with pytest.raises(ValueError, match=r"positions has shape \(3,\)"):
        da.decode_append_attention(qkv, k, v, jnp.zeros((3,), jnp.int32), scale=1.0, block_s=32, interpret=True)
    assert da.fits(1024, 64) and da.fits(96, 64) and not da.fits(72, 64) and not da.fits(1024, 48)
    assert [da.default_block(s) for s in (1024, 96, 48)] == [32, 32, 16]


def _check_splits(qkv, k, v, pos, *, scale, block_s, splits, tol):
    out, k1, v1 = da.decode_append_attention(qkv, k, v, pos, scale=scale, block_s=block_s, splits=splits,
                                             interpret=True)
    want, k2, v2 = da.decode_append_reference(qkv, k, v, pos, scale=scale)
    np.testing.assert_array_equal(np.asarray(k1, np.float32), np.asarray(k2, np.float32))
    np.testing.assert_array_equal(np.asarray(v1, np.float32), np.asarray(v2, np.float32))
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)
    return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("splits", [2, 3, 7, 40])
def test_runs_over_the_older_positions_merge_to_the_reference(dtype, splits):
    """Flash-decoding: each row's older positions cut into `splits` runs of whole blocks, merged with
    the new token after the kernel. Positions 0 (every run empty), 1, 7, 129, 1000, 1023; 40 runs
    is more than a 1,000-position slot has blocks of 16 (empty runs merge to nothing)."""
    pos = jnp.array([0, 1, 7, 129, 1000, 1023], jnp.int32)
    qkv, k, v = _inputs(6, 3, 1024, 32, dtype, seed=splits)
    out = _check_splits(qkv, k, v, pos, scale=32 ** -0.5, block_s=16, splits=splits, tol=TOL[dtype])
    one, _, _ = da.decode_append_attention(qkv, k, v, pos, scale=32 ** -0.5, block_s=16, splits=1, interpret=True)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(one, np.float32), atol=TOL[dtype],
                               rtol=TOL[dtype])


def test_runs_ignore_stale_values_and_clamp_past_the_cache():
    qkv, k, v = _inputs(3, 2, 128, 16, jnp.bfloat16)
    pos = jnp.array([40, 0, 300], jnp.int32)  # 300: clamped to the last position, 127
    base = _check_splits(qkv, k, v, pos, scale=0.25, block_s=16, splits=4, tol=TOL[jnp.bfloat16])
    k_bad = k.at[0, :, 40:].set(jnp.nan).at[1].set(jnp.nan)
    v_bad = v.at[0, :, 40:].set(jnp.inf).at[1].set(jnp.inf)
    out, _, _ = da.decode_append_attention(qkv, k_bad, v_bad, pos, scale=0.25, block_s=16, splits=4, interpret=True)
    np.testing.assert_array_equal(np.asarray(out[:2], np.float32), np.asarray(base[:2], np.float32))


def test_runs_over_a_mesh():
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 1, 4), ("data", "stage", "tensor"))
    qkv, k, v = _inputs(4, 8, 128, 16, jnp.float32)
    pos = jnp.array([0, 17, 64, 127], jnp.int32)
    out, k1, v1 = da.decode_append_attention(qkv, k, v, pos, scale=0.25, block_s=16, splits=3, mesh=mesh,
                                             interpret=True)
    want, k2, v2 = da.decode_append_reference(qkv, k, v, pos, scale=0.25)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(k1, k2)
    np.testing.assert_array_equal(v1, v2)


def test_default_splits_and_bad_splits():
    """Runs until ~MIN_PROGRAMS programs, each at least MIN_RUN_BLOCKS blocks of the cache; none from
    MIN_PROGRAMS rows (GPT-2 medium's batch 32 is 512 rows)."""
    from energon_jax.kernels import _flash, decode_attention

    assert (da.MIN_PROGRAMS, da.MIN_RUN_BLOCKS) == (256, 2)
    assert _flash.MIN_PROGRAMS == decode_attention.DecodeTiles().min_programs == da.MIN_PROGRAMS  # one rule
    assert da.default_splits(512, 1024, 32) == 1 and da.default_splits(256, 1024, 32) == 1
    assert da.default_splits(128, 1024, 32) == 2 and da.default_splits(96, 1024, 32) == 3
    assert da.default_splits(12, 1024, 32) == 16  # 22 wanted; 32 blocks give 16 runs of 2
    assert da.default_splits(25, 384, 32) == 6 and da.default_splits(1, 32, 32) == 1
    qkv, k, v = _inputs(1, 2, 64, 16, jnp.float32)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=rf"splits={bad!r} must be an int >= 1"):
            da.decode_append_attention(qkv, k, v, jnp.zeros((1,), jnp.int32), scale=1.0, splits=bad, interpret=True)


def test_decode_step_dispatch(monkeypatch):
    """engine.gpt._decode_step: the fused step from MIN_FUSED_STEP_ROWS (96) rows per device where the
    cache is a multiple of 16 positions; otherwise the two writes, then the decode attention given."""
    from energon_jax.engine import gpt
    from energon_jax.models.gpt2 import decode_attention_xla

    fused_calls, decode_calls = [], []

    def fused(qkv, k, v, pos, *, scale):
        fused_calls.append(qkv.shape)
        return da.decode_append_reference(qkv, k, v, pos, scale=scale)

    def decode(q, k, v, lengths, *, scale):
        decode_calls.append(q.shape)
        return decode_attention_xla(q, k, v, lengths, scale=scale)

    assert gpt.MIN_FUSED_STEP_ROWS == 96
    for b, n, s, shards, want_fused in [(32, 8, 64, 1, True), (12, 8, 64, 1, True), (11, 8, 64, 1, False),
                                        (1, 12, 64, 1, False), (24, 16, 64, 4, True), (20, 16, 64, 4, False),
                                        (64, 8, 72, 1, False)]:
        fused_calls.clear()
        decode_calls.clear()
        qkv, k, v = _inputs(b, n, s, 16, jnp.float32)
        pos = jnp.arange(b, dtype=jnp.int32) % s
        out, k1, v1 = gpt._decode_step(fused, decode, qkv, k, v, pos, scale=0.25, shards=shards)
        assert (len(fused_calls), len(decode_calls)) == ((1, 0) if want_fused else (0, 1)), (b, n, s, shards)
        want, k2, v2 = da.decode_append_reference(qkv, k, v, pos, scale=0.25)
        np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
        np.testing.assert_array_equal(k1, k2)
        np.testing.assert_array_equal(v1, v2)


def test_auto_passes_one_devices_share_to_the_decode_step(monkeypatch):
    from energon_jax.config import GPT2Config
    from energon_jax.engine import gpt
    from energon_jax.kernels import _dispatch
    from energon_jax.runtime.mesh import make_mesh

    monkeypatch.setattr(_dispatch, "resolve_impl", lambda impl: "triton")
    cfg = GPT2Config(vocab_size=64, n_positions=64, n_embd=64, n_layer=1, n_head=4)
    for impl in ("auto", "triton"):
        for (tp, dp), shards in [((1, 1), 1), ((2, 2), 4)]:
            step = gpt.attention_kernels(cfg, make_mesh(tp=tp, dp=dp), impl).decode_step
            assert step.func is gpt._decode_step and step.keywords == {"shards": shards}
            assert step.args[0].func is da.decode_append_attention and step.args[0].keywords["impl"] == "triton"


def test_xla_impl_is_the_reference():
    qkv, k, v = _inputs(2, 2, 64, 16, jnp.float32)
    pos = jnp.array([3, 9], jnp.int32)
    got = da.decode_append_attention(qkv, k, v, pos, scale=0.5, impl="xla")
    want = da.decode_append_reference(qkv, k, v, pos, scale=0.5)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def _xla_prefill(q, k, v, lengths, *, scale):
    from energon_jax.models.layers import masked_attention

    t = q.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))[None] & (jnp.arange(t)[None, :] < lengths[:, None])[:, None, :]
    return masked_attention(q, k, v, mask, scale)


@pytest.mark.parametrize("tp,dp", [(1, 1), (2, 2)])
def test_generate_through_the_fused_step_equals_xla(tiny_gpt2_factory, monkeypatch, tp, dp):
    """GPT-2 generate with every decode step's cache write and attention through the fused kernel
    (Pallas' interpreter, threshold lowered so the tiny model takes it) gives XLA's tokens."""
    from energon_jax import load_sharded_model
    from energon_jax.engine import gpt
    from energon_jax.models.gpt2 import AttentionKernels, decode_attention_xla

    folder, _ = tiny_gpt2_factory(n_positions=128, n_head=4, n_embd=64)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42]] * 2
    want = [o.token_ids for o in load_sharded_model(folder, tp=tp, dp=dp).generate(
        prompts, max_new_tokens=12)]

    calls = []

    def fused(*args, **kw):
        calls.append(args[0].shape)
        return da.decode_append_attention(*args, **kw, mesh=mesh, interpret=True)

    def kernels(config, mesh_, impl):
        nonlocal mesh
        mesh = mesh_ if mesh_.devices.size > 1 else None
        shards = mesh_.shape["data"] * mesh_.shape["tensor"]
        return AttentionKernels(prefill=_xla_prefill, decode=decode_attention_xla,
                                decode_step=functools.partial(gpt._decode_step, fused, decode_attention_xla,
                                                              shards=shards))

    mesh = None
    monkeypatch.setattr(gpt, "attention_kernels", kernels)
    monkeypatch.setattr(gpt, "MIN_FUSED_STEP_ROWS", 1)
    gpt._compiled_steps.cache_clear()
    try:
        model = load_sharded_model(folder, tp=tp, dp=dp)  # "auto": the patched kernels
        got = [o.token_ids for o in model.generate(prompts, max_new_tokens=12)]
        # the serving engine's decode loop (its cache donated to a fori_loop) through the same step
        from energon_jax.engine.slots import SlotEngine

        assert calls, "generate did not take the fused step"
        calls.clear()
        eng = SlotEngine(model, 4, decode_steps=4, cache_len=32, max_prefill_batch=4)
        slots, four = [2, 0, 3, 1], prompts[:3] + [prompts[0][:2]]
        firsts = np.asarray(eng.prefill_batch(slots, four, temperature=[0.0] * 4, top_k=[0] * 4, top_p=[1.0] * 4,
                                              seed=[0] * 4))[:4]
        rest = np.concatenate([np.asarray(eng.decode(4, [True] * 4)) for _ in range(2)])
        assert calls, "the serving engine's decode did not take the fused step"
    finally:
        gpt._compiled_steps.cache_clear()
    assert got == want
    alone = [o.token_ids for o in load_sharded_model(folder, tp=tp, dp=dp).generate([four[3]], max_new_tokens=9)]
    for i, slot in enumerate(slots):  # generate stops at EOS; the engine decodes on (its scheduler stops)
        expected = (want[i] if i < 3 else alone[0])[:9]
        assert ([int(firsts[i])] + rest[:, slot].tolist())[: len(expected)] == expected
