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

from energon_jax.kernels import sample_filter
from energon_jax.kernels.sample_filter import filters_on
from energon_jax.runtime.checks import check_int

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
    def make(cls, batch: int, temperature=0.0, top_k=0, top_p=1.0) -> SamplingParams:
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
    """Where the first of `stop_strings` to be complete occurs in `text` (the text of token ids
    `body`): the text before it and the fewest tokens whose own text holds the whole stop string
    (as `GPTModel.generate` and the serving scheduler keep them); None if none occurs.

    First to be complete: the match that ends first (of two ending together, the one starting
    first). The scheduler stops as soon as one is, so the match that starts first, which may end
    later, was not found the same way for every grouping of tokens into updates: with stops
    "bcde" and "cd", "bcdef" cut at "b" when "d" came alone and at "" when "d" and "e" came
    together, and offline `generate` said "". A prefix that ends inside a UTF-8 character decodes
    to U+FFFD, so its length alone reaches the stop string's end a token early: the prefix's
    text must contain it."""
    hits = [(text.find(s), s) for s in stop_strings if s in text]
    if not hits:
        return None
    cut, s = min(hits, key=lambda hit: (hit[0] + len(hit[1]), hit[0]))
    upto = text[: cut + len(s)]

    def holds(k: int) -> bool:
        return detokenize(body[:k]).startswith(upto)

    # The fewest tokens that hold it, by bisection: a prefix that holds `upto` goes on holding it
    # as tokens are added (so for byte-level BPE), so log(n) decodes find it (one decode per token
    # tried, from the first, took 0.35 s of the engine loop for a stop at token 2,048). An answer
    # that fails its check (it does not hold, or one token fewer does) gets the scan from the first.
    lo, hi = 1, len(body)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if holds(mid) else (mid + 1, hi)
    if not (holds(lo) and (lo == 1 or not holds(lo - 1))):
        lo = next((k for k in range(1, len(body) + 1) if holds(k)), len(body))
    return text[:cut], body[:lo]


# The filters need the largest logits of a row in order. Sorting all of a row costs ~0.42 ms a step
# at batch 32 over GPT-2's 50,257 entries on an H200 (benchmarks/bench_sampling.py), about what the
# rest of a GPT-2 small decode step costs. So the entries are first cut into groups of
# CANDIDATE_GROUP consecutive ids, and only the CANDIDATE_GROUPS groups with the largest maxima are
# sorted (2,048 entries). Those hold every entry above the smallest of their maxima (the "floor"),
# so the sorted candidates agree with the sorted row on every position above it: at least the first
# CANDIDATE_GROUPS - 1, and the k-th largest for any k <= CANDIDATE_GROUPS. A batch in which some
# row's filter can reach past them (top_k > 64, or top_p without top_k) filters whole rows instead
# (filter_mask: a sort, or on a GPU the radix-select kernel); the tokens kept are the same either way.
CANDIDATE_GROUP = 32
CANDIDATE_GROUPS = 64


def _descending(values_bn, ids_bn):
    """Each row sorted by value, largest first; equal values keep their order (ids ascending in
    both callers, so ties come by ascending id, as the reference's stable sort gives them)."""
    negated_bn, ids_bn = jax.lax.sort_key_val(-values_bn, ids_bn, is_stable=True)
    return -negated_bn, ids_bn


def _candidates(scaled_bv):
    """(values [B, N] descending, their ids [B, N], floor [B], ranks) for the groups with the
    largest maxima. Their first `ranks` values, and all above floor, are the row's; floor is -inf
    when every group is taken (a vocabulary of <= 2,048 entries)."""
    b, v = scaled_bv.shape
    groups = -(-v // CANDIDATE_GROUP)
    take = min(CANDIDATE_GROUPS, groups)
    grouped_bgc = jnp.pad(scaled_bv, ((0, 0), (0, groups * CANDIDATE_GROUP - v)),
                          constant_values=-jnp.inf).reshape(b, groups, CANDIDATE_GROUP)
    maxima_bt, best_bt = jax.lax.top_k(grouped_bgc.max(-1), take)
    best_bt = jnp.sort(best_bt, axis=-1)  # ascending group ids: the candidates' ids ascend, for a stable sort
    values_bn = jnp.take_along_axis(grouped_bgc, best_bt[:, :, None], axis=1).reshape(b, take * CANDIDATE_GROUP)
    ids_bn = (best_bt[:, :, None] * CANDIDATE_GROUP + jnp.arange(CANDIDATE_GROUP)).reshape(b, take * CANDIDATE_GROUP)
    floor_b = maxima_bt[:, -1] if take < groups else jnp.full((b,), -jnp.inf, scaled_bv.dtype)
    return (*_descending(values_bn, ids_bn), floor_b, take)


def _keep_mask(sorted_bn, ids_bn, floor_b, ranks: int, scaled_bv, params: SamplingParams):
    """The tokens top_k and top_p keep ([B, V] bool, vocabulary order) from a row's largest entries
    sorted (`sorted_bn`, `ids_bn`: the candidates or the whole row; their first `ranks` values, and
    every value above `floor_b`, are the row's), and whether those reached far enough for each row
    ([B] bool; always true for a whole sorted row).

    top_k keeps every token >= the k-th largest (ties with it stay, as in HF's TopKLogitsWarper);
    top_p then keeps the shortest prefix of the survivors, in sorted order, whose probability
    reaches top_p (renormalised over the survivors, as HF's warpers run one after the other)."""
    n, v = sorted_bn.shape[-1], scaled_bv.shape[-1]
    use_k, use_p = filters_on(params.top_k, params.top_p, v)
    kth_b = jnp.take_along_axis(sorted_bn, jnp.clip(params.top_k - 1, 0, n - 1)[:, None], axis=-1)[:, 0]
    kth_b = jnp.where(use_k, kth_b, -jnp.inf)
    keep_k_bv = scaled_bv >= kth_b[:, None]
    top_b = jnp.max(scaled_bv, axis=-1)
    top_b = jnp.where(jnp.isfinite(top_b), top_b, 0.0)
    mass_b = jnp.sum(jnp.where(keep_k_bv, jnp.exp(scaled_bv - top_b[:, None]), 0.0), axis=-1)
    in_k_bn = sorted_bn >= kth_b[:, None]
    probs_bn = jnp.where(in_k_bn, jnp.exp(sorted_bn - top_b[:, None]), 0.0) / mass_b[:, None]
    before_bn = jnp.cumsum(probs_bn, axis=-1) - probs_bn
    last_b = jnp.sum(in_k_bn & (before_bn < params.top_p[:, None]), axis=-1) - 1  # the top token always stays
    last_b = jnp.maximum(last_b, 0)
    cut_b = jnp.take_along_axis(sorted_bn, last_b[:, None], axis=-1)[:, 0]
    cut_id_b = jnp.take_along_axis(ids_bn, last_b[:, None], axis=-1)[:, 0]
    vocab_ids = jnp.arange(v)
    keep_p_bv = ((scaled_bv > cut_b[:, None]) | ((scaled_bv == cut_b[:, None]) & (vocab_ids <= cut_id_b[:, None]))
                 | ~use_p[:, None])
    whole_b = jnp.isneginf(floor_b)
    reached_b = ((~use_k | (params.top_k <= ranks) | (kth_b > floor_b) | whole_b)
                 & (~use_p | (cut_b > floor_b) | whole_b))
    return keep_k_bv & keep_p_bv, reached_b


def filter_mask(scaled_bv, params: SamplingParams, rows_b=None, *, impl: str = "xla", mesh=None):
    """[B, V] bool: the tokens each row may sample after top_k and top_p (temperature already
    applied to `scaled_bv`). Sorts only the candidates when every row of `rows_b` (default all)
    has a top_k of at most CANDIDATE_GROUPS. Otherwise (top_p alone, a larger top_k), or when ties
    at the floor leave a row's filter undecided, every row is filtered whole: impl "xla" sorts the
    rows, "triton" finds the thresholds by radix select in one kernel (kernels/sample_filter.py;
    with a mesh its rows split over "data"), "auto" takes the kernel on a GPU from
    sample_filter.MIN_KERNEL_ROWS rows a device (fewer sort faster).

    top_p alone filters whole rows: its nucleus can hold thousands of tokens (a flat row), and
    trying the candidates first made a GPT-2 batch-32 decode step ~14% slower than the sort alone
    (H200)."""
    v = scaled_bv.shape[-1]
    rows_b = jnp.ones(scaled_bv.shape[:1], bool) if rows_b is None else rows_b
    use_k, use_p = filters_on(params.top_k, params.top_p, v)
    short_k_b = (params.top_k > 0) & (params.top_k <= CANDIDATE_GROUPS)
    candidates_serve_b = short_k_b | ~use_k & ~use_p

    def whole_rows():
        shards = mesh.shape["data"] if mesh is not None else 1
        if sample_filter.runs_kernel(impl, scaled_bv.shape[0] // shards):
            thresholds = sample_filter.filter_thresholds(scaled_bv, params.top_k, params.top_p, impl="triton",
                                                         mesh=mesh)
            return sample_filter.keep_mask(scaled_bv, *thresholds, params.top_p)
        ids_bv = jnp.broadcast_to(jnp.arange(v), scaled_bv.shape)
        sorted_bv, order_bv = _descending(scaled_bv, ids_bv)
        whole_b = jnp.full(scaled_bv.shape[:1], -jnp.inf, scaled_bv.dtype)
        return _keep_mask(sorted_bv, order_bv, whole_b, v, scaled_bv, params)[0]

    def from_candidates():
        keep_bv, reached_b = _keep_mask(*_candidates(scaled_bv), scaled_bv, params)
        return jax.lax.cond(jnp.any(rows_b & ~reached_b), whole_rows, lambda: keep_bv)

    return jax.lax.cond(jnp.all(candidates_serve_b | ~rows_b), from_candidates, whole_rows)


def reference_filtered_logits(logits_bv, params: SamplingParams):
    """The reference filters (tests check filter_mask against it): each whole row sorted, then
    temperature, top_k and top_p applied in sorted order. Returns ([B, V] filtered logits sorted
    descending, -inf where dropped; [B, V] the vocabulary ids in that order)."""
    v = logits_bv.shape[-1]
    scaled_bv = _scaled(logits_bv, params)
    sorted_bv, order_bv = jax.lax.sort_key_val(-scaled_bv, jnp.broadcast_to(jnp.arange(v), scaled_bv.shape))
    sorted_bv = -sorted_bv  # descending
    kth_b1 = jnp.take_along_axis(sorted_bv, jnp.clip(params.top_k - 1, 0, v - 1)[:, None], axis=-1)
    keep_k = (params.top_k[:, None] <= 0) | (sorted_bv >= kth_b1)
    probs_bv = jax.nn.softmax(jnp.where(keep_k, sorted_bv, -jnp.inf), axis=-1)
    mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    # the top token is always kept; top_p 1 keeps all (the sum can reach 1.0 before the last tokens)
    keep_p = (mass_before_bv < params.top_p[:, None]) | (params.top_p[:, None] >= 1.0)
    return jnp.where(keep_k & keep_p, sorted_bv, -jnp.inf), order_bv


def _scaled(logits_bv, params: SamplingParams):
    # -inf (padded vocabulary entries) stays -inf whatever the temperature: -inf / inf would be nan
    return jnp.where(logits_bv == -jnp.inf, -jnp.inf, logits_bv / jnp.maximum(params.temperature, 1e-6)[:, None])


def sample(logits_bv, params: SamplingParams, keys_b, *, impl: str = "xla", mesh=None) -> jax.Array:
    """[B, V] float32 logits -> [B] int32 tokens. impl and mesh: filter_mask's (the engine passes
    "auto" where its attention kernels run on a GPU).

    A sampled row draws by Gumbel-max over its kept tokens in vocabulary order, so its token
    depends on its key, its logits and its settings only: not on the other rows, nor on whether
    the batch sorted candidates or whole rows."""
    greedy_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    stochastic_b = params.temperature > 0

    def sampled():
        scaled_bv = _scaled(logits_bv, params)
        v = scaled_bv.shape[-1]
        use_k, use_p = filters_on(params.top_k, params.top_p, v)
        filtering_b = stochastic_b & (use_k | use_p)
        # temperature alone needs no order at all: the filters run only when a sampled row uses one
        keep_bv = jax.lax.cond(jnp.any(filtering_b),
                               lambda: filter_mask(scaled_bv, params, filtering_b, impl=impl, mesh=mesh),
                               lambda: jnp.ones(scaled_bv.shape, bool))
        picked_b = jax.vmap(jax.random.categorical)(keys_b, jnp.where(keep_bv, scaled_bv, -jnp.inf))
        return picked_b.astype(jnp.int32)

    sampled_b = jax.lax.cond(jnp.any(stochastic_b), sampled, lambda: greedy_b)  # all greedy: no filters
    return jnp.where(stochastic_b, sampled_b, greedy_b)


def row_keys(seeds_b) -> jax.Array:
    """One PRNG key per row from int seeds [B]."""
    return jax.vmap(jax.random.key)(seeds_b)


def step_keys(keys_b, step) -> jax.Array:
    return jax.vmap(lambda k: jax.random.fold_in(k, step))(keys_b)
