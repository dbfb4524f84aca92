"""Next-token sampling (energon_jax.engine.sampling): its filters against Hugging Face's
warpers, batch rows with their own settings, seeded sample frequencies. Generation through a
model (seeds, top_k=1 as greedy, padded vocabulary, no recompiles) is in tests/test_gpt2.py."""
import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from energon_jax.engine import sampling
from energon_jax.engine.sampling import (SamplingParams, filter_mask, reference_filtered_logits, row_keys, sample,
                                         step_keys)

# (logits, temperature, top_k, top_p): one batch, each row its own settings
_TOP_K_ROWS = [
    ([2, 2, 2, 0, -1, -3], 1.0, 2, 1.0),  # the 2nd largest ties with the 1st and 3rd: all three stay
    ([2, 2, 2, 0, -1, -3], 1.0, 1, 1.0),  # a tie at the top: top_k=1 keeps it all
    ([2, 2, 2, 0, -1, -3], 1.0, 3, 1.0),
    ([3, 1, 0, 1, 1, -2], 0.5, 2, 1.0),  # the 2nd largest ties with two more, after temperature
    ([1, 4, -1, 4, 0, 4], 2.0, 4, 1.0),  # ties above the boundary, none at it: exactly 4
    ([0.3, -1.2, 2.5, 0.7, -0.1, 1.9], 1.0, 3, 1.0),  # no ties
    ([0.3, -1.2, 2.5, 0.7, -0.1, 1.9], 1.0, 6, 1.0),  # top_k == vocab
    ([0.3, -1.2, 2.5, 0.7, -0.1, 1.9], 0.7, 50, 1.0),  # top_k > vocab
    ([0.3, -1.2, 2.5, 0.7, -0.1, 1.9], 1.0, 2**31 - 1, 1.0),
    ([0.3, -1.2, 2.5, 0.7, -0.1, 1.9], 1.0, 0, 1.0),  # 0 is off
    ([1, 0.5, 0.5, -np.inf, -np.inf, -np.inf], 1.0, 4, 1.0),  # padded vocabulary: the 4th is -inf
    ([1, 0.5, 0.5, -np.inf, -np.inf, -np.inf], 1.0, 2, 1.0),
    # top_k then top_p: top_p on the top_k survivors keeps only the first (0.73 of their mass);
    # top_p first would have kept two (0.64 of the full row's)
    ([2, 1, 0, -1, -5, -6], 1.0, 2, 0.7),
    ([3, 1, 1, 1, 0, -2], 1.0, 2, 0.95),  # top_k keeps the tied three, top_p all four
    ([3, 1, 1, 1, 0, -2], 1.0, 2, 0.6),  # top_p keeps just the top one
    ([0.3, -1.2, 2.5, 0.7, -0.1, 1.9], 1.3, 0, 0.8),  # top_p alone
]


def _reference_in_vocab_order(logits, params):
    sorted_filtered, order = map(np.asarray, reference_filtered_logits(jnp.asarray(logits), params))
    ours = np.empty_like(sorted_filtered)
    np.put_along_axis(ours, order, sorted_filtered, axis=-1)  # back to vocabulary order
    return ours


def test_top_k_keeps_ties_at_the_kth_logit_as_hugging_face():
    """top_k keeps every token whose logit is >= the k-th largest, as HF's TopKLogitsWarper does
    (it kept exactly k by rank, so [2, 2, 2, 0, -1] at top_k=2 gave [1/2, 1/2, 0, 0, 0], not
    thirds), after temperature and before top_p as HF's sampling warpers run; the whole batch in
    one call, each row with its own settings."""
    logits = np.array([r[0] for r in _TOP_K_ROWS], np.float32)
    params = SamplingParams(*(jnp.asarray([r[i] for r in _TOP_K_ROWS], dtype) for i, dtype in
                              ((1, jnp.float32), (2, jnp.int32), (3, jnp.float32))))
    ours = _reference_in_vocab_order(logits, params)
    kept = np.asarray(filter_mask(sampling._scaled(jnp.asarray(logits), params), params))  # the sampler's filter
    np.testing.assert_array_equal(kept & np.isfinite(logits), np.isfinite(ours))  # -inf entries: never drawn
    for row, (x, temperature, top_k, top_p), got in zip(logits, _TOP_K_ROWS, ours):
        scores = torch.tensor(row[None])
        warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
        warpers += [TopKLogitsWarper(top_k)] if top_k else []
        warpers += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
        for warper in warpers:
            scores = warper(None, scores)
        want = scores[0].numpy()
        where = f"logits={x} temperature={temperature} top_k={top_k} top_p={top_p}"
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want), err_msg=where)
        np.testing.assert_allclose(np.asarray(torch.softmax(torch.tensor(got), -1)),
                                   np.asarray(torch.softmax(scores[0], -1)), rtol=1e-6, atol=1e-7, err_msg=where)
    np.testing.assert_allclose(np.exp(ours[0]) / np.exp(ours[0]).sum(), [1 / 3] * 3 + [0] * 3, rtol=1e-6)


def test_top_k_tie_sampling_frequencies():
    """Seeded samples of [2, 2, 2, 0, -1] at top_k=2 come out near a third each of the tied
    tokens and never anything else; top_k past the real tokens never reaches padded -inf ones,
    whatever the temperature. Changing top_k changes the programme's inputs, not the programme."""
    n = 3000
    logits = jnp.asarray(np.array([[2, 2, 2, 0, -1, -np.inf]] * n + [[1, 1, 0, -np.inf, -np.inf, -np.inf]] * n,
                                  np.float32))
    jitted = jax.jit(sample)
    keys = step_keys(row_keys(jnp.arange(2 * n, dtype=jnp.uint32)), 3)

    def counts(temperature, top_k):
        params = SamplingParams(jnp.asarray([1.0] * n + [temperature] * n, jnp.float32),
                                jnp.asarray([top_k[0]] * n + [top_k[1]] * n, jnp.int32), jnp.ones(2 * n, jnp.float32))
        toks = np.asarray(jitted(logits, params, keys))
        return np.bincount(toks[:n], minlength=6), np.bincount(toks[n:], minlength=6)

    tied, padded = counts(3e38, (2, 6))
    assert tied[3:].sum() == 0 and np.all(np.abs(tied[:3] - n / 3) < 5 * np.sqrt(n * 2 / 9)), tied  # 5 sigma
    assert padded[3:].sum() == 0 and padded[:3].min() > 0, padded
    tied, padded = counts(1.0, (1, 4))  # a tie at the top: top_k=1 keeps all three too
    assert tied[3:].sum() == 0 and np.all(np.abs(tied[:3] - n / 3) < 5 * np.sqrt(n * 2 / 9)), tied
    assert padded[3:].sum() == 0 and padded[2] > 0, padded  # top_k=4 > 3 real tokens: all three, no padding
    assert jitted._cache_size() == 1


def _params(rows):
    return SamplingParams(jnp.asarray([r[0] for r in rows], jnp.float32), jnp.asarray([r[1] for r in rows], jnp.int32),
                          jnp.asarray([r[2] for r in rows], jnp.float32))


# (temperature, top_k, top_p) for a vocabulary of 5,003 (157 groups of 32, 64 of them candidates)
_WIDE_ROWS = [(1.0, k, p) for k in (0, 1, 7, 50, 64, 65, 300, 5002, 5003, 2**31 - 1) for p in (1.0, 0.9, 0.5, 0.02)]


def _wide_logits(scale, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(len(_WIDE_ROWS), 5003)) * scale
    x = np.round(x * 4) / 4  # many ties, at the k-th logit and at the top_p cut too
    x[::3, -40:] = -np.inf  # padded vocabulary entries in the last group
    return x.astype(np.float32)


def test_filters_from_candidates_match_the_whole_row_sort():
    """Over a vocabulary wider than the 2,048 candidates, the tokens kept are those of the
    reference that sorts whole rows: for top_k up to 64 from the candidates, for the rest by sorting
    whole rows (the sampler decides per batch). What the candidates decide on their own is right
    wherever they say they reached: peaked rows (scale 6) keep short top_p nuclei inside them,
    flat ones (scale 0.3) do not."""
    params = _params(_WIDE_ROWS)
    for scale, seed in ((6.0, 0), (0.3, 1), (2.0, 2)):
        logits = _wide_logits(scale, seed)
        want = np.isfinite(_reference_in_vocab_order(logits, params))
        scaled = sampling._scaled(jnp.asarray(logits), params)
        real = np.isfinite(logits)  # -inf entries may be in a mask: they are never drawn
        np.testing.assert_array_equal(np.asarray(filter_mask(scaled, params)) & real, want, err_msg=f"scale {scale}")
        keep, reached = map(np.asarray, sampling._keep_mask(*sampling._candidates(scaled), scaled, params))
        keep = keep & real
        for i, (row, ok) in enumerate(zip(_WIDE_ROWS, reached)):
            if ok:  # what the candidates decided is right on its own
                np.testing.assert_array_equal(keep[i], want[i], err_msg=f"scale {scale} row {row}")
        top_k = np.array([r[1] for r in _WIDE_ROWS])
        top_p = np.array([r[2] for r in _WIDE_ROWS])
        assert reached[(top_k <= 64) & (top_p == 1.0)].all()  # top_k alone, up to 64: always from the candidates
        assert not reached[(top_k >= 300) & (top_k < 5003) & (top_p == 1.0)].any()  # far past the floor
        if scale == 6.0:
            assert reached[(top_k == 0) & (top_p < 1.0)].all()  # a peaked row's nucleus lies in the candidates
        if scale == 0.3:
            assert not reached[(top_k == 0) & (top_p >= 0.5) & (top_p < 1.0)].any()


def test_a_rows_sample_does_not_depend_on_its_batch():
    """The same row, key and settings give the same token alone, beside rows that the candidates
    serve, and beside a row that makes the batch sort whole rows (top_k=300)."""
    logits = _wide_logits(2.0, 3)[:4]
    row = (0.9, 40, 0.8)
    jitted = jax.jit(sample)
    for step in range(5):
        key = step_keys(row_keys(jnp.asarray([7], jnp.uint32)), step)
        alone = jitted(jnp.asarray(logits[:1]), _params([row]), key)
        keys = jnp.concatenate([key, step_keys(row_keys(jnp.asarray([1, 2, 3], jnp.uint32)), step)])
        served = jitted(jnp.asarray(logits), _params([row, (1.0, 5, 1.0), (0.0, 0, 1.0), (1.0, 0, 1.0)]), keys)
        sorting = jitted(jnp.asarray(logits), _params([row, (1.0, 300, 1.0), (0.0, 0, 1.0), (1.0, 0, 1.0)]), keys)
        assert int(alone[0]) == int(served[0]) == int(sorting[0])
        assert int(served[2]) == int(np.argmax(logits[2]))  # a greedy row beside sampled ones


def test_sample_frequencies_follow_the_filtered_distribution():
    """Seeded samples of one row (top_k 20 then top_p 0.9 over 5,003 entries) land only on the kept
    tokens, at their renormalised probabilities (chi-square, far past the 1e-6 tail)."""
    n = 4000
    logits = np.tile(_wide_logits(3.0, 4)[:1], (n, 1))
    params = _params([(1.3, 20, 0.9)] * n)
    toks = np.asarray(jax.jit(sample)(jnp.asarray(logits), params, row_keys(jnp.arange(n, dtype=jnp.uint32))))
    want = _reference_in_vocab_order(logits[:1], _params([(1.3, 20, 0.9)]))[0]
    kept = np.flatnonzero(np.isfinite(want))
    assert set(np.unique(toks)) <= set(kept.tolist())
    probs = np.exp(want[kept] - want[kept].max())
    probs /= probs.sum()
    counts = np.array([(toks == t).sum() for t in kept])
    chi2 = ((counts - n * probs) ** 2 / (n * probs)).sum()
    assert chi2 < len(kept) + 12 * np.sqrt(2 * len(kept)), (chi2, len(kept))

