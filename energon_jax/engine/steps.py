"""jit boundaries for GPT models: the forward (logits) and the whole of offline generation.

Shapes are bucketed (powers of two) so a handful of programs serve every request size; all
sampling settings, lengths and stop ids are traced arrays. `generate` runs prefill and the
entire decode loop (`lax.while_loop`) in one dispatch; the KV cache is allocated inside it
(sharded by the rules table) and lives in the loop carry, so XLA updates it in place.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import os
from typing import Callable, Hashable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from energon_jax.engine.pipeline import choose_microbatches, pipelined_stack
from energon_jax.engine.sampling import SamplingParams, row_keys, sample, step_keys
from energon_jax.kernels._dispatch import resolve_impl
from energon_jax.models.gpt2 import GPT2, Block, stage_stack
from energon_jax.runtime.sharding import CACHE_AXES, logical_to_spec

MIN_BUCKET = 16
PAD_ID = 0


def bucket(n: int, cap: int | None = None, minimum: int = MIN_BUCKET) -> int:
    """Smallest power of two >= max(n, minimum), clipped to `cap`."""
    b = max(minimum, 1 << max(0, (n - 1).bit_length()))
    return min(b, cap) if cap is not None else b


class CompileCounter(collections.Counter):
    """Counts traces per step name: a trace happens exactly when jit compiles a new shape."""


# Threads that compile a warm-up's programs at once, at most: XLA's own compile of each program is
# multithreaded too, so more threads than this mostly share the same cores.
MAX_COMPILE_WORKERS = 8


def check_workers(workers) -> None:
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers={workers!r} must be an int >= 1 (or None: on a GPU one per program, at most "
                         f"{MAX_COMPILE_WORKERS})")


def default_compile_workers(programs: int) -> int:
    """compile_concurrently's threads for `programs` programs when none are asked for."""
    return min(programs, os.cpu_count() or 1, MAX_COMPILE_WORKERS) if jax.default_backend() == "gpu" else 1


def compile_concurrently(lowerings: dict[Hashable, Callable], workers: int | None = None
                         ) -> tuple[dict[Hashable, jax.stages.Compiled], int]:
    """{key: lower()} -> ({key: lower().compile()}, threads used), compiled on a thread pool.

    A warm-up compiles every program a server can run before it serves. XLA compiles outside
    Python's lock, so programs can compile at once: GPT-2 medium's 19 serving programs took 120.8 s
    one after another on an H200 and 45.1 s on 8 threads (benchmarks/warmup.py, BENCHMARKS.md
    Serving, session 18); bert-base's 42 took 91.1 s against 65.5 s (session 20). Each program is
    lowered (traced) in the calling thread, so the caller's thread-local jax settings (matmul
    precision, x64, ...) apply as they do to a jit call, while the programs lowered before it
    compile. workers: None = default_compile_workers: on a GPU one per program, at most the CPU
    count and MAX_COMPILE_WORKERS; elsewhere one (XLA's CPU compiler already uses the cores: on a
    2-core machine 12 programs of a 1-layer model took 34.8 s on 2 threads against 32.0 s on one).
    A program that fails, or a KeyboardInterrupt, raises here; compiles not yet begun are dropped."""
    check_workers(workers)
    if not lowerings:
        return {}, 0
    workers = workers or default_compile_workers(len(lowerings))
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="energon-compile")
    futures = {}
    try:
        for key, lower in lowerings.items():
            futures[key] = pool.submit(lower().compile)
        concurrent.futures.wait(futures.values(), return_when=concurrent.futures.FIRST_EXCEPTION)
        compiled = {key: f.result() for key, f in futures.items()}
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)  # the one compiling finishes; the rest never start
        raise
    pool.shutdown()
    return compiled, workers


@dataclasses.dataclass(frozen=True)
class Runner:
    """How the engine runs one GPT model on its mesh; every jitted step goes through this.

    model_fn(params, tokens_bt, positions_bt, lengths_b, cache, logit_index_b) -> (logits, kv)
    empty_cache(batch, length) -> a zero KV cache in the layout model_fn expects, sharded
    write_kv(cache, kv, row) -> cache with a prefill's K/V [.., b, N, T, D] stored at batch `row`
    write_kv_rows(cache, kv, rows) -> cache with row i of a prefill's K/V [.., p, N, T, D] stored at
      batch rows[i] (rows may repeat with identical K/V: padding rows)
    sample(logits_bv, sampling, keys_b) -> [B] tokens (sampling.sample, with the filter kernel
      where the attention kernels run)
    """

    model_fn: Callable
    empty_cache: Callable
    write_kv: Callable
    write_kv_rows: Callable
    sample: Callable = sample


def unrolled_layers(params: dict) -> bool:
    return "layers" in params


def make_runner(module: GPT2, mesh, cache_dtype) -> Runner:
    """One stage: the layers unrolled over per-layer weight buffers (params["layers"]); the KV
    cache is a list of per-layer arrays [1, B, N, S, D]. A scan over stacked weights would copy
    each layer's slice before its matmuls and sync with the host once per layer: measured 5.2 ms
    per GPT-2 XL decode step on an H100 against 1.04 ms for reading the weights once.
    Several stages: the stacked stack as a microbatched pipeline over "stage" (engine/pipeline.py),
    cache [L, B, N, S, D] split over "stage"."""
    cfg = module.config
    num_stages = mesh.shape["stage"]
    cache_sharding = NamedSharding(mesh, logical_to_spec(CACHE_AXES))

    def head(variables, x_bte, logit_index_b):
        if logit_index_b is not None:
            x_bte = jnp.take_along_axis(x_bte, logit_index_b[:, None, None], axis=1)  # [B, 1, E]
        return module.apply(variables, x_bte, method=GPT2.head)

    def constrain(leaf):
        return jax.lax.with_sharding_constraint(leaf, cache_sharding)

    if num_stages == 1:
        block = Block(cfg, module.param_dtype, module.kernels, parent=None)

        def model_fn(params, tokens_bt, positions_bt, lengths_b, cache, logit_index_b):
            variables = {"params": params}
            if lengths_b is None:
                lengths_b = jnp.full((tokens_bt.shape[0],), tokens_bt.shape[1], jnp.int32)
            x_bte = module.apply(variables, tokens_bt, positions_bt, method=GPT2.embed)
            ks, vs = [], []
            for layer, layer_params in enumerate(params["layers"]):
                k_l = None if cache is None else cache["k"][layer]
                v_l = None if cache is None else cache["v"][layer]
                (x_bte, k_l, v_l, _), ys = block.apply({"params": layer_params}, (x_bte, k_l, v_l, jnp.int32(0)),
                                                       positions_bt, lengths_b)
                if cache is None:
                    k_l, v_l = ys[0][None], ys[1][None]  # fresh K/V [1, B, N, T, D]
                ks.append(k_l)
                vs.append(v_l)
            return head(variables, x_bte, logit_index_b), {"k": ks, "v": vs}

        def empty_cache(batch, length):
            shape = (1, batch, cfg.n_head, length, cfg.head_dim)
            return {name: [constrain(jnp.zeros(shape, cache_dtype)) for _ in range(cfg.n_layer)] for name in "kv"}
    else:
        stack = stage_stack(module, cfg.n_layer // num_stages)

        def stack_fn(stack_params, x_bte, positions_bt, lengths_b, cache):
            return stack.apply({"params": stack_params}, x_bte, positions_bt, lengths_b, cache)

        def model_fn(params, tokens_bt, positions_bt, lengths_b, cache, logit_index_b):
            variables = {"params": params}
            x_bte = module.apply(variables, tokens_bt, positions_bt, method=GPT2.embed)
            m = choose_microbatches(tokens_bt.shape[0], num_stages, mesh.shape["data"])
            x_bte, kv = pipelined_stack(stack_fn, mesh, m)(params["h"], x_bte, positions_bt, lengths_b, cache)
            return head(variables, x_bte, logit_index_b), kv

        def empty_cache(batch, length):
            shape = (cfg.n_layer, batch, cfg.n_head, length, cfg.head_dim)
            return {name: constrain(jnp.zeros(shape, cache_dtype)) for name in "kv"}

    def write_kv(cache, kv, row):
        return jax.tree.map(lambda c, new: jax.lax.dynamic_update_slice(c, new.astype(c.dtype), (0, row, 0, 0, 0)),
                            cache, kv)

    def write_kv_rows(cache, kv, rows):
        # one scatter per cache array, not one dynamic_update_slice per row: a batched prefill of 8
        # rows on GPT-2 medium launched 384 such kernels (benchmarks/profile_decode.py --prefill)
        def put(c, new):
            return c.at[:, rows, :, : new.shape[3], :].set(new.astype(c.dtype), mode="promise_in_bounds")
        return jax.tree.map(put, cache, kv)

    sampler = sample
    if module.kernels is not None and resolve_impl("auto") == "triton":  # the GPU's attention kernels run
        sampler = functools.partial(sample, impl="auto", mesh=mesh if mesh.devices.size > 1 else None)
    return Runner(model_fn, empty_cache, write_kv, write_kv_rows, sampler)


def unstack_layers(params: dict, mesh) -> dict:
    """params["h"]["blocks"] (stacked [L, ...]) -> params["layers"] (a list of per-layer trees),
    one leaf at a time so peak memory grows by one stacked leaf, not by the model."""
    blocks = params["h"]["blocks"]
    flat, treedef = jax.tree_util.tree_flatten(blocks)
    per_layer = []
    for leaf in flat:
        spec = leaf.sharding.spec if isinstance(leaf.sharding, NamedSharding) else ()
        out_sharding = NamedSharding(mesh, PartitionSpec(*tuple(spec)[1:]))
        n = leaf.shape[0]
        per_layer.append(jax.jit(lambda x: [x[i] for i in range(n)], out_shardings=[out_sharding] * n)(leaf))
        leaf.delete()
    layers = [jax.tree_util.tree_unflatten(treedef, [leaves[i] for leaves in per_layer]) for i in range(len(per_layer[0]))]
    return {**{k: v for k, v in params.items() if k != "h"}, "layers": layers}


def make_forward(runner: Runner, counter: CompileCounter):
    @jax.jit
    def forward(params, tokens_bt, lengths_b):
        counter["forward"] += 1
        b, t = tokens_bt.shape
        positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        logits_btv, _ = runner.model_fn(params, tokens_bt, positions_bt, lengths_b, None, None)
        return logits_btv

    return forward


def make_generate(runner: Runner, counter: CompileCounter):
    """Returns generate(params, tokens_bt, lengths_b, max_new_b, sampling, seeds_b, stop_ids_k,
    cache_len=, out_len=) -> (tokens_bo, num_generated_b, stopped_b)."""
    model_fn = runner.model_fn

    @functools.partial(jax.jit, static_argnames=("cache_len", "out_len"))
    def generate(params, tokens_bt, lengths_b, max_new_b, sampling: SamplingParams, seeds_b, stop_ids_k,
                 *, cache_len: int, out_len: int):
        counter["generate"] += 1
        b, t = tokens_bt.shape
        positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        logits_b1v, kv = model_fn(params, tokens_bt, positions_bt, lengths_b, None, lengths_b - 1)
        cache = runner.write_kv(runner.empty_cache(b, cache_len), kv, 0)
        keys_b = row_keys(seeds_b)
        tok_b = runner.sample(logits_b1v[:, 0], sampling, step_keys(keys_b, 0))
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
            tok_b = runner.sample(logits_b1v[:, 0], sampling, step_keys(keys_b, i))
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
