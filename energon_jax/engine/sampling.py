"""Next-token sampling with per-row traced parameters (changing them never recompiles).

temperature 0 -> greedy; top_k 0 -> off; top_p 1.0 -> off. As in Hugging Face, temperature
scales first, then top_k keeps the tokens whose logit is >= the k-th largest (all tied with it
stay), then top_p. Each row has its own PRNG key, so a row's samples depend only on its seed and
step, not on the rest of the batch. The host-side checks and the stop-string cut here are shared
by offline generate and the serving scheduler.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os

import jax
import jax.numpy as jnp
import numpy as np

MAX_TOP_K = 2**31 - 1  # top_k goes to the device as int32: a larger value fails there, not with a message
MAX_SEED = 2**32 - 1  # seeds go to the device as uint32: a larger one would be wrapped or fail
MAX_TEMPERATURE = float(np.finfo(np.float32).max)  # goes to the device as float32: larger is inf there


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: jax.Array  # f32 [B]
    top_k: jax.Array  # i32 [B]
    top_p: jax.Array  # f32 [B]

    @classmethod
    def make(cls, batch: int, temperature=0.0, top_k=0, top_p=1.0) -> "SamplingParams":
        return cls(jnp.full((batch,), temperature, jnp.float32), jnp.full((batch,), top_k, jnp.int32),
                   jnp.full((batch,), top_p, jnp.float32))


def is_finite_number(value) -> bool:
    """A real number (numpy's too; not a bool, str or None) that is finite: JSON's Infinity and
    NaN parse to Python floats, and an int too large for a float is not finite either."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_int(name: str, value, low: int, high: int | None = None, note: str = "") -> int:
    """`value` as an int if it is one (numpy integers too, bools not) in [low, high], else a
    ValueError naming it and the accepted range."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and low <= value and (
            high is None or value <= high):
        return int(value)
    accepted = f">= {low}" if high is None else f"in [{low}, {high}]"
    raise ValueError(f"{name}={value!r} must be an int {accepted}{note}")


def resolve_seed(seed) -> int:
    """The seed a request samples with: `seed` checked (an int in [0, MAX_SEED]), or a random one
    for None. Offline generate and the Server take exactly the same seeds."""
    if seed is None:
        return int.from_bytes(os.urandom(4), "little") >> 1
    return check_int("seed", seed, 0, MAX_SEED, " (or None: random)")


def validate_sampling(temperature, top_k, top_p) -> None:
    """Sampling settings a request may carry (Python or numpy numbers); anything else is a
    ValueError naming it, never a TypeError from a comparison or a NaN on the device."""
    if not (is_finite_number(temperature) and 0 <= temperature <= MAX_TEMPERATURE):
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 is greedy; float32, so at "
                         f"most {MAX_TEMPERATURE:.4g})")
    check_int("top_k", top_k, 0, MAX_TOP_K, " (0 is off)")
    if not (is_finite_number(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} must be a number in (0, 1] (1 is off)")


def check_stop_strings(stop_strings, detokenizes: bool) -> None:
    """Stop strings are matched in decoded text: without a tokenizer they could never match."""
    if stop_strings and not detokenizes:
        raise ValueError(f"stop={list(stop_strings)!r}: stop strings need a tokenizer, and this model runs in "
                         "token-id mode; give stop token ids (int) instead")


def cut_at_stop_string(body: list[int], text: str, stop_strings, detokenize) -> tuple[str, list[int]] | None:
    """Where the earliest of `stop_strings` occurs in `text` (the text of token ids `body`): the
    text before it and the fewest tokens whose own text holds the whole stop string (as
    `GPTModel.generate` and the serving scheduler keep them); None if none occurs. A prefix that
    ends inside a UTF-8 character decodes to U+FFFD, so its length alone reaches the stop
    string's end a token early: the prefix's text must contain it."""
    hits = [(text.find(s), s) for s in stop_strings if s in text]
    if not hits:
        return None
    cut, s = min(hits)
    upto = text[: cut + len(s)]
    k = next((k for k in range(1, len(body) + 1) if detokenize(body[:k]).startswith(upto)), len(body))
    return text[:cut], body[:k]


def _sorted_filtered_logits(logits_bv, params: SamplingParams):
    """The logits after temperature, then top_k, then top_p (Hugging Face's warper order), sorted
    descending per row, with the permutation that sorted them: ([B, V] logits, [B, V] ids).

    top_k keeps every token whose logit is >= the k-th largest (HF's TopKLogitsWarper), so tokens
    tied with the k-th are all kept; top_k >= V keeps all. Either filter keeps a prefix of the
    sorted row, so one sort serves both."""
    v = logits_bv.shape[-1]
    # -inf (padded vocabulary entries) stays -inf whatever the temperature: -inf / inf would be nan
    scaled_bv = jnp.where(logits_bv == -jnp.inf, -jnp.inf, logits_bv / jnp.maximum(params.temperature, 1e-6)[:, None])
    sorted_bv, order_bv = jax.lax.sort_key_val(-scaled_bv, jnp.broadcast_to(jnp.arange(v), scaled_bv.shape))
    sorted_bv = -sorted_bv  # descending
    kth_b1 = jnp.take_along_axis(sorted_bv, jnp.clip(params.top_k - 1, 0, v - 1)[:, None], axis=-1)
    keep_k = (params.top_k[:, None] <= 0) | (sorted_bv >= kth_b1)
    probs_bv = jax.nn.softmax(jnp.where(keep_k, sorted_bv, -jnp.inf), axis=-1)
    mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    keep_p = mass_before_bv < params.top_p[:, None]  # the top token is always kept
    return jnp.where(keep_k & keep_p, sorted_bv, -jnp.inf), order_bv


def _filtered_sample(logits_bv, params: SamplingParams, keys_b):
    filtered_bv, order_bv = _sorted_filtered_logits(logits_bv, params)
    pick_b = jax.vmap(jax.random.categorical)(keys_b, filtered_bv)
    return jnp.take_along_axis(order_bv, pick_b[:, None], axis=-1)[:, 0]


def sample(logits_bv, params: SamplingParams, keys_b) -> jax.Array:
    """[B, V] float32 logits -> [B] int32 tokens."""
    greedy_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    stochastic = params.temperature > 0
    # The sort over the vocabulary is skipped entirely when every row is greedy.
    sampled_b = jax.lax.cond(jnp.any(stochastic), lambda: _filtered_sample(logits_bv, params, keys_b).astype(jnp.int32),
                             lambda: greedy_b)
    return jnp.where(stochastic, sampled_b, greedy_b)


def row_keys(seeds_b) -> jax.Array:
    """One PRNG key per row from int seeds [B]."""
    return jax.vmap(jax.random.key)(seeds_b)


def step_keys(keys_b, step) -> jax.Array:
    return jax.vmap(lambda k: jax.random.fold_in(k, step))(keys_b)
