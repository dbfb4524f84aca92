"""jit boundaries for GPT models: the forward (logits) and the whole of offline generation.

Shapes are bucketed (powers of two) so a handful of programs serve every request size; all
sampling settings, lengths and stop ids are traced arrays. `generate` runs prefill and the
entire decode loop (`lax.while_loop`) in one dispatch; the KV cache is allocated inside it
(sharded by the rules table) and lives in the loop carry, so XLA updates it in place.
"""
from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from energon_jax.engine.pipeline import choose_microbatches, pipelined_stack
from energon_jax.engine.sampling import SamplingParams, row_keys, sample, step_keys
from energon_jax.models.gpt2 import GPT2, stage_stack
from energon_jax.runtime.sharding import CACHE_AXES, logical_to_spec

MIN_BUCKET = 16
PAD_ID = 0


def bucket(n: int, cap: int | None = None, minimum: int = MIN_BUCKET) -> int:
    """Smallest power of two >= max(n, minimum), clipped to `cap`."""
    b = max(minimum, 1 << max(0, (n - 1).bit_length()))
    return min(b, cap) if cap is not None else b


class CompileCounter(collections.Counter):
    """Counts traces per step name: a trace happens exactly when jit compiles a new shape."""


def make_model_fn(module: GPT2, mesh):
    """model_fn(params, tokens_bt, positions_bt, lengths_b, cache, logit_index_b) -> (logits, kv).

    One stage: the module as is. Several: embedding and head under GSPMD, the layer stack as
    a microbatched pipeline over "stage" (see engine/pipeline.py)."""
    num_stages = mesh.shape["stage"]
    if num_stages == 1:
        return lambda params, *args: module.apply({"params": params}, *args)
    stack = stage_stack(module, module.config.n_layer // num_stages)

    def stack_fn(stack_params, x_bte, positions_bt, lengths_b, cache):
        return stack.apply({"params": stack_params}, x_bte, positions_bt, lengths_b, cache)

    def model_fn(params, tokens_bt, positions_bt, lengths_b, cache, logit_index_b):
        variables = {"params": params}
        x_bte = module.apply(variables, tokens_bt, positions_bt, method=GPT2.embed)
        m = choose_microbatches(tokens_bt.shape[0], num_stages, mesh.shape["data"])
        x_bte, kv = pipelined_stack(stack_fn, mesh, m)(params["h"], x_bte, positions_bt, lengths_b, cache)
        if logit_index_b is not None:
            x_bte = jnp.take_along_axis(x_bte, logit_index_b[:, None, None], axis=1)
        return module.apply(variables, x_bte, method=GPT2.head), kv

    return model_fn


def make_forward(model_fn, counter: CompileCounter):
    @jax.jit
    def forward(params, tokens_bt, lengths_b):
        counter["forward"] += 1
        b, t = tokens_bt.shape
        positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        logits_btv, _ = model_fn(params, tokens_bt, positions_bt, lengths_b, None, None)
        return logits_btv

    return forward


def make_generate(model_fn, counter: CompileCounter, cache_dtype, mesh):
    """Returns generate(params, tokens_bt, lengths_b, max_new_b, sampling, seeds_b, stop_ids_k,
    cache_len=, out_len=) -> (tokens_bo, num_generated_b, stopped_b)."""
    cache_sharding = NamedSharding(mesh, logical_to_spec(CACHE_AXES))

    @functools.partial(jax.jit, static_argnames=("cache_len", "out_len"))
    def generate(params, tokens_bt, lengths_b, max_new_b, sampling: SamplingParams, seeds_b, stop_ids_k,
                 *, cache_len: int, out_len: int):
        counter["generate"] += 1
        b, t = tokens_bt.shape
        positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        logits_b1v, kv = model_fn(params, tokens_bt, positions_bt, lengths_b, None, lengths_b - 1)
        l, _, n, _, d = kv["k"].shape

        def new_cache(fresh):
            zeros = jax.lax.with_sharding_constraint(jnp.zeros((l, b, n, cache_len, d), cache_dtype), cache_sharding)
            return jax.lax.dynamic_update_slice(zeros, fresh.astype(cache_dtype), (0, 0, 0, 0, 0))

        cache = {name: new_cache(kv[name]) for name in ("k", "v")}
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
            logits_b1v, cache = model_fn(params, tok_b[:, None], pos_b[:, None], pos_b + 1, cache, None)
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
