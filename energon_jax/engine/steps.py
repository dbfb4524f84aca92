"""jit boundaries for GPT models: the forward (logits) and the whole of offline generation.

Shapes are bucketed (powers of two) so a handful of programs serve every request size; all
sampling settings, lengths and stop ids are traced arrays. `generate` runs prefill and the
entire decode loop (`lax.while_loop`) in one dispatch; the KV cache is allocated inside it
and lives in the loop carry, so XLA updates it in place.
"""
from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp

from energon_jax.engine.sampling import SamplingParams, row_keys, sample, step_keys

MIN_BUCKET = 16
PAD_ID = 0


def bucket(n: int, cap: int | None = None, minimum: int = MIN_BUCKET) -> int:
    """Smallest power of two >= max(n, minimum), clipped to `cap`."""
    b = max(minimum, 1 << max(0, (n - 1).bit_length()))
    return min(b, cap) if cap is not None else b


class CompileCounter(collections.Counter):
    """Counts traces per step name: a trace happens exactly when jit compiles a new shape."""


def make_forward(module, counter: CompileCounter):
    @jax.jit
    def forward(params, tokens_bt, lengths_b):
        counter["forward"] += 1
        b, t = tokens_bt.shape
        positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        logits_btv, _ = module.apply({"params": params}, tokens_bt, positions_bt, lengths_b)
        return logits_btv

    return forward


def make_generate(module, counter: CompileCounter, cache_dtype):
    """Returns generate(params, tokens_bt, lengths_b, max_new_b, sampling, seeds_b, stop_ids_k,
    cache_len=, out_len=) -> (tokens_bo, num_generated_b, stopped_b)."""

    @functools.partial(jax.jit, static_argnames=("cache_len", "out_len"))
    def generate(params, tokens_bt, lengths_b, max_new_b, sampling: SamplingParams, seeds_b, stop_ids_k,
                 *, cache_len: int, out_len: int):
        counter["generate"] += 1
        variables = {"params": params}
        b, t = tokens_bt.shape
        positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        logits_b1v, kv = module.apply(variables, tokens_bt, positions_bt, lengths_b, None, lengths_b - 1)
        l, _, n, _, d = kv["k"].shape
        cache = {name: jax.lax.dynamic_update_slice(jnp.zeros((l, b, n, cache_len, d), cache_dtype),
                                                    kv[name].astype(cache_dtype), (0, 0, 0, 0, 0))
                 for name in ("k", "v")}
        keys_b = row_keys(seeds_b)
        tok_b = sample(logits_b1v[:, 0], sampling, step_keys(keys_b, 0))
        out_bo = jnp.full((b, out_len), PAD_ID, jnp.int32).at[:, 0].set(tok_b)
        num_b = jnp.minimum(max_new_b, 1)
        stopped_b = jnp.isin(tok_b, stop_ids_k) & (max_new_b >= 1)
        done_b = stopped_b | (num_b >= max_new_b)

        def cond(state):
            i, _, _, _, done_b, _, _, _ = state
            return (i < out_len) & ~jnp.all(done_b)

        def body(state):
            i, tok_b, pos_b, num_b, done_b, stopped_b, out_bo, cache = state
            pos_b = jnp.minimum(pos_b, cache_len - 1)  # finished rows idle at the last slot
            logits_b1v, cache = module.apply(variables, tok_b[:, None], pos_b[:, None], None, cache)
            tok_b = sample(logits_b1v[:, 0], sampling, step_keys(keys_b, i))
            live_b = ~done_b
            out_bo = out_bo.at[:, i].set(jnp.where(live_b, tok_b, PAD_ID))
            num_b = num_b + live_b
            hit_b = live_b & jnp.isin(tok_b, stop_ids_k)
            stopped_b = stopped_b | hit_b
            done_b = done_b | hit_b | (num_b >= max_new_b)
            return i + 1, tok_b, pos_b + 1, num_b, done_b, stopped_b, out_bo, cache

        state = (jnp.int32(1), tok_b, lengths_b, num_b, done_b, stopped_b, out_bo, cache)
        _, _, _, num_b, _, stopped_b, out_bo, _ = jax.lax.while_loop(cond, body, state)
        return out_bo, num_b, stopped_b

    return generate
