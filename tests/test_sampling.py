"""Next-token sampling (energon_jax.engine.sampling): its filters against Hugging Face's
warpers, batch rows with their own settings, seeded sample frequencies. Generation through a
model (seeds, top_k=1 as greedy, padded vocabulary, no recompiles) is in tests/test_gpt2.py."""
import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from energon_jax.engine.sampling import SamplingParams, _sorted_filtered_logits, row_keys, sample, step_keys

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


def test_top_k_keeps_ties_at_the_kth_logit_as_hugging_face():
    """top_k keeps every token whose logit is >= the k-th largest, as HF's TopKLogitsWarper does
    (it kept exactly k by rank, so [2, 2, 2, 0, -1] at top_k=2 gave [1/2, 1/2, 0, 0, 0], not
    thirds), after temperature and before top_p as HF's sampling warpers run; the whole batch in
    one call, each row with its own settings."""
    logits = np.array([r[0] for r in _TOP_K_ROWS], np.float32)
    params = SamplingParams(*(jnp.asarray([r[i] for r in _TOP_K_ROWS], dtype) for i, dtype in
                              ((1, jnp.float32), (2, jnp.int32), (3, jnp.float32))))
    sorted_filtered, order = map(np.asarray, _sorted_filtered_logits(jnp.asarray(logits), params))
    ours = np.empty_like(sorted_filtered)
    np.put_along_axis(ours, order, sorted_filtered, axis=-1)  # back to vocabulary order
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
