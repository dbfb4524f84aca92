"""kernels/sample_filter.py: the sampler's top_k / top_p thresholds by radix select, through
Pallas' interpreter on CPU, against its XLA reference (the same three thresholds) and against the
whole-row sort (sampling.reference_filtered_logits); over a mesh; and the sampler drawing through
it. GPU: benchmarks/bench_sampling.py --kernel checks its mask against the XLA filter's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from energon_jax.engine import sampling
from energon_jax.engine.sampling import SamplingParams, row_keys, sample, step_keys
from energon_jax.kernels import sample_filter as sf


def _params(rows):
    return SamplingParams(*(jnp.asarray([r[i] for r in rows], dtype)
                            for i, dtype in ((0, jnp.float32), (1, jnp.int32), (2, jnp.float32))))


def _sorted_reference_mask(logits, params):
    """[B, V] bool: the whole-row sort's kept tokens, in vocabulary order."""
    filtered, order = map(np.asarray, sampling.reference_filtered_logits(jnp.asarray(logits), params))
    kept = np.zeros(filtered.shape, bool)
    np.put_along_axis(kept, order, np.isfinite(filtered), axis=-1)
    return kept


def _logits(b, v, seed, scale=2.0, ties=4):
    rng = np.random.default_rng(seed)
    x = np.round(rng.normal(size=(b, v)) * scale * ties) / ties  # ties at the k-th logit and the cut
    x[::3, v - max(1, v // 9):] = -np.inf  # padded vocabulary entries
    x[:, 0] = np.maximum(x[:, 0], 0.0)  # never a row of -inf only
    return x.astype(np.float32)


def _check(logits, rows, **kernel):
    params = _params(rows)
    scaled = sampling._scaled(jnp.asarray(logits), params)
    want = sf.filter_thresholds(scaled, params.top_k, params.top_p, impl="xla")
    got = sf.filter_thresholds(scaled, params.top_k, params.top_p, interpret=True, **kernel)
    for name, w, g in zip(("kth", "cut", "last_id"), want, got):
        assert g.dtype == w.dtype, name
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=f"{name} {kernel}")
    real = np.isfinite(logits)  # -inf entries may be in a mask: they are never drawn
    kept = np.asarray(sf.keep_mask(scaled, *got, params.top_p)) & real
    np.testing.assert_array_equal(kept, _sorted_reference_mask(logits, params), err_msg=str(kernel))
    return kept


@pytest.mark.parametrize("v", [1, 7, 129, 1000])
def test_odd_vocabularies_match_reference_and_sort(v):
    """Every (top_k, top_p) row of one batch, at vocabulary sizes that leave a partial last block."""
    ks = sorted({0, 1, 2, 7, 50, v - 1, v, v + 5} - {-1})
    rows = [(t, k, p) for k in ks for p in (1.0, 0.9, 0.5, 0.02) for t in (0.7,)]
    logits = _logits(len(rows), v, seed=v)
    _check(logits, rows, block=64)


@pytest.mark.parametrize("bits,block", [(1, 256), (2, 16), (4, 128)])
def test_pass_widths_and_blocks(bits, block):
    """The thresholds do not depend on how many key bits a pass decides nor on the block walked;
    flat rows (a top_p nucleus of most of the row) and peaked ones (a few tokens)."""
    rows = [(1.0, k, p) for k in (0, 5, 64, 300) for p in (1.0, 0.95, 0.3)]
    for scale in (0.3, 8.0):
        _check(_logits(len(rows), 3001, seed=bits, scale=scale), rows, bits=bits, block=block)


def test_ties_split_at_the_cut_keep_the_first_ids():
    """A tie group that the top_p cut falls inside keeps its first ids (the sort's stable order);
    -0.0 ties with 0.0; a top_p a hair under 1 keeps all; top_k keeps every token tied with the
    k-th, before top_p."""
    flat = np.zeros((6, 100), np.float32)
    flat[1, 50:] = -0.0
    flat[2, :10] = 1.0  # ten tied tops, then a tied plateau where the cut falls
    flat[3, ::2] = -np.inf
    # top_p clear of the ties' multiples of 1/n: there a cumsum's rounding decides, not the filter
    rows = [(1.0, 0, 0.505), (1.0, 0, 0.305), (1.0, 0, 0.9), (1.0, 0, 0.51), (1.0, 0, float(np.float32(1 - 2**-24))),
            (1.0, 30, 0.505)]
    kept = _check(flat, rows, block=32)
    assert kept[0, :51].all() and not kept[0, 51:].any()
    assert kept[1].sum() == 31 and kept[2].sum() == 89
    assert kept[3].sum() == 26 and kept[4].all() and kept[5].sum() == 51


def test_over_a_mesh():
    """Rows split over "data" (logits arriving split over "tensor" too): the same thresholds."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 1, 4), ("data", "stage", "tensor"))
    rows = [(1.0, k, p) for k in (0, 3, 40) for p in (1.0, 0.8)] * 2
    params = _params(rows)
    scaled = sampling._scaled(jnp.asarray(_logits(len(rows), 500, seed=9)), params)
    want = sf.filter_thresholds(scaled, params.top_k, params.top_p, impl="xla")
    got = sf.filter_thresholds(scaled, params.top_k, params.top_p, interpret=True, block=64, mesh=mesh)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_bad_settings_are_named():
    x, k, p = jnp.zeros((2, 10)), jnp.zeros((2,), jnp.int32), jnp.ones((2,))
    with pytest.raises(ValueError, match="bits=3"):
        sf.filter_thresholds(x, k, p, bits=3)
    with pytest.raises(ValueError, match="block=100"):
        sf.filter_thresholds(x, k, p, block=100)
    with pytest.raises(ValueError, match=r"top_k \(3,\)"):
        sf.filter_thresholds(x, jnp.zeros((3,), jnp.int32), p)


def test_the_sampler_draws_the_same_tokens_through_the_kernel(monkeypatch):
    """sample(impl="triton") keeps the XLA filter's tokens, so with the same keys it draws the
    same tokens, row by row, in a batch mixing greedy, temperature, top_k and top_p rows."""
    monkeypatch.setattr(sf, "filter_thresholds", functools.partial(sf.filter_thresholds, interpret=True, block=128))
    rows = [(0.0, 0, 1.0), (0.9, 0, 1.0), (1.0, 20, 1.0), (1.3, 0, 0.9), (0.8, 50, 0.7), (1.0, 200, 0.99)] * 3
    logits = jnp.asarray(_logits(len(rows), 1500, seed=4, scale=3.0))
    params = _params(rows)
    for step in range(3):
        keys = step_keys(row_keys(jnp.arange(len(rows), dtype=jnp.uint32)), step)
        want = jax.jit(functools.partial(sample, impl="xla"))(logits, params, keys)
        got = jax.jit(functools.partial(sample, impl="triton"))(logits, params, keys)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_which_batches_take_the_kernel():
    """"triton" insists at any size; "auto" takes the kernel only on a GPU from MIN_KERNEL_ROWS rows
    (this CPU: never); "xla" never."""
    assert sf.runs_kernel("triton", 1) and sf.runs_kernel("triton", sf.MIN_KERNEL_ROWS)
    assert not sf.runs_kernel("auto", 10 * sf.MIN_KERNEL_ROWS) and not sf.runs_kernel("xla", 10 * sf.MIN_KERNEL_ROWS)

