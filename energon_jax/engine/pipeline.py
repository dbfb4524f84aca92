"""Pipeline parallelism over the mesh's "stage" axis (Energon's non-blocking pipeline, in XLA).

The layer stack's parameters (and KV cache) are stacked on a leading layers axis split over
"stage", so each stage holds only its own layers. The batch is cut into M microbatches and
moved stage to stage with `ppermute` inside `shard_map` (manual over "stage" only; "data" and
"tensor" stay automatic, so tensor parallelism composes with it). Microbatch m enters stage s
at tick m + s; with M >= S microbatches every stage works at once after the first S - 1 ticks,
and the whole pass takes M + S - 1 ticks.

Microbatch m is rows {m, m + M, m + 2M, ...} (a free reshape [B] -> [B/M, M]), so with the
batch split over "data" every microbatch keeps rows on every data shard.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from energon_jax.models.gpt2 import write_kv_columns


def schedule(num_microbatches: int, num_stages: int) -> list[list[int | None]]:
    """The microbatch each stage works on at each tick (None = idle): M + S - 1 ticks."""
    m, s = num_microbatches, num_stages
    return [[t - st if 0 <= t - st < m else None for st in range(s)] for t in range(m + s - 1)]


def choose_microbatches(batch: int, num_stages: int, data: int = 1) -> int:
    """S microbatches when the batch splits evenly (every stage busy), else 1."""
    local = batch // data
    return num_stages if num_stages > 1 and local % num_stages == 0 and local >= num_stages else 1


def _split(x, m: int, axis: int):
    """[..., B, ...] -> [..., B/M, M, ...] at `axis` (row i*M + j -> (i, j))."""
    shape = x.shape
    return x.reshape(shape[:axis] + (shape[axis] // m, m) + shape[axis + 1:])


def _merge(x, axis: int):
    shape = x.shape
    return x.reshape(shape[:axis] + (shape[axis] * shape[axis + 1],) + shape[axis + 2:])


def _run_ticks(x_m, num_stages: int, work, state):
    """The M + S - 1 tick schedule, inside `shard_map` manual over "stage".

    At tick t this stage works on microbatch m = t - stage: stage 0 takes it from `x_m` [M, ...],
    every other stage from its predecessor's output of the tick before (`ppermute`).
    `work(m, valid, x_in, state) -> (y, state)` runs the stage; `m` is clipped into range and
    `valid` says whether the tick is real (an idle tick's results must not take effect). The last
    stage's outputs are gathered into out [M, ...]. Returns (out, state), out the same on every
    stage (a psum over zeros elsewhere: exact)."""
    stage = jax.lax.axis_index("stage")
    m_count = x_m.shape[0]
    perm = [(i, (i + 1) % num_stages) for i in range(num_stages)]

    def tick(carry, t):
        x_prev, out, state = carry
        m = t - stage
        valid = (m >= 0) & (m < m_count)
        mc = jnp.clip(m, 0, m_count - 1)
        x_in = jnp.where(stage == 0, x_m[jnp.clip(t, 0, m_count - 1)], x_prev)
        y, state = work(mc, valid, x_in, state)
        last = valid & (stage == num_stages - 1)
        out = jax.lax.dynamic_update_index_in_dim(
            out, jnp.where(last, y, jax.lax.dynamic_index_in_dim(out, mc, 0, False)), mc, 0)
        return (jax.lax.ppermute(y, "stage", perm), out, state), None

    (_, out, state), _ = jax.lax.scan(tick, (jnp.zeros_like(x_m[0]), jnp.zeros_like(x_m), state),
                                      jnp.arange(m_count + num_stages - 1))
    if jnp.issubdtype(out.dtype, jnp.floating) and out.dtype.itemsize < 4 and jax.default_backend() == "cpu":
        # XLA's CPU backend (jaxlib 0.10.2) aborts the process promoting a 16-bit all-reduce ("Invalid
        # binary instruction opcode copy"); one stage holds each value and the others zeros, so the
        # float32 sum rounds back to the same 16-bit values. GPUs keep the 16-bit all-reduce.
        return jax.lax.psum(out.astype(jnp.float32), "stage").astype(out.dtype), state
    return jax.lax.psum(out, "stage"), state


def pipelined_stack(stack_fn, mesh, num_microbatches: int):
    """Wrap `stack_fn(stack_params, x_bte, positions_bt, lengths_b, cache) -> (x_bte, kv)` into a
    pipeline over "stage" with the same signature and results.

    cache None (prefill): kv is the fresh K/V [Ls, B, N, T, D] per stage, gathered to [L, ...].
    cache given (decode): [L, B, N, S, D], split over stage. Each tick the stage decodes its
    microbatch m over the whole stage cache, read in place (`{**cache, "group": m}`: see
    models/gpt2.BlockStack), gets back only the new token's K/V [Ls, B/M, N, 1, D], and writes
    those columns into the cache in place (`write_kv_columns`). No slice of the cache is copied:
    slicing out the microbatch's cache and storing it back kept ~1.1x the stage's cache in
    temporaries on CPU (0.09x now, tests/test_pipeline_memory.py); on an H200, one stage of six
    GPT-2-small layers (bf16, 32 slots x 1,024 positions, 2 microbatches) went from 0.52x to
    0.025x and from 1.63 to 0.98 ms a decode step.
    """
    num_stages = mesh.shape["stage"]
    m_count = num_microbatches

    def stage_body(stack_params, x_bte, positions_bt, lengths_b, cache):
        b = x_bte.shape[0]
        if b % m_count:
            raise ValueError(f"batch {b} does not split into {m_count} microbatches")
        x_mb = jnp.moveaxis(_split(x_bte, m_count, 0), 1, 0)  # [M, B/M, T, E]
        pos_mb = jnp.moveaxis(_split(positions_bt, m_count, 0), 1, 0)  # [M, B/M, T]
        len_mb = jnp.moveaxis(_split(lengths_b, m_count, 0), 1, 0)  # [M, B/M]

        if cache is not None:
            def store(cache, pending):
                """Write the K/V columns of the stage's previous tick (none for an idle tick)."""
                new, m, valid = pending
                s = jax.tree.leaves(cache)[0].shape[3]
                pos_b = jnp.where(valid, pos_mb[m][:, 0], s)  # past the end: not written
                return jax.tree.map(lambda c, n: write_kv_columns(c, n, pos_b, group=m, skip_past_end=True),
                                    cache, new)

            def work(m, valid, x_in, state):
                # A tick stores the previous tick's columns before its own reads, so every read of the
                # cache sees the latest write and XLA updates it in place; stored after the reads, the
                # writes were unordered with them and XLA copied the whole cache (twice) to keep them apart.
                cache = store(*state)
                y, new = stack_fn(stack_params, x_in, pos_mb[m], len_mb[m], {**cache, "group": m})
                return y, (cache, (new, m, valid))

            _, new_shape = jax.eval_shape(lambda: stack_fn(stack_params, x_mb[0], pos_mb[0], len_mb[0],
                                                           {**cache, "group": 0}))
            nothing = (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), new_shape), jnp.int32(0), jnp.bool_(False))
            out, (cache, last) = _run_ticks(x_mb, num_stages, work, (cache, nothing))
            return _merge(jnp.moveaxis(out, 0, 1), 0), store(cache, last)  # [B, T, E]

        def work(m, valid, x_in, buf):
            """Store microbatch m's fresh K/V in the stage's buffer (only on ticks where the stage
            really worked on it; a cond, not a where against the old slice, which kept a third
            slice-sized buffer)."""
            y, new = stack_fn(stack_params, x_in, pos_mb[m], len_mb[m], None)

            def store(buf):
                def one(c, n):
                    c5 = _split(c, m_count, 1)  # [Ls, B/M, M, N, T, D]
                    return _merge(jax.lax.dynamic_update_index_in_dim(c5, n[:, :, None].astype(c.dtype), m, 2), 1)
                return jax.tree.map(one, buf, new)
            return y, jax.lax.cond(valid, store, lambda buf: buf, buf)

        # the K/V this stage produces, for all microbatches
        ls = jax.tree.leaves(stack_params)[0].shape[0]
        _, kv_shape = jax.eval_shape(lambda: stack_fn(stack_params, x_mb[0], pos_mb[0], len_mb[0], None))
        buf = jax.tree.map(lambda s: jnp.zeros((ls, b) + s.shape[2:], s.dtype), kv_shape)
        out, buf = _run_ticks(x_mb, num_stages, work, buf)
        return _merge(jnp.moveaxis(out, 0, 1), 0), buf  # [B, T, E]

    def wrapped(stack_params, x_bte, positions_bt, lengths_b, cache):
        params_spec = jax.tree.map(lambda _: P("stage"), stack_params)
        cache_spec = None if cache is None else jax.tree.map(lambda _: P("stage"), cache)
        fn = jax.shard_map(
            stage_body, mesh=mesh, axis_names={"stage"}, check_vma=False,
            in_specs=(params_spec, P(), P(), P(), cache_spec),
            out_specs=(P(), {"k": P("stage"), "v": P("stage")}),
        )
        return fn(stack_params, x_bte, positions_bt, lengths_b, cache)

    return wrapped


def pipelined_microbatches(stage_fn, mesh):
    """Wrap `stage_fn(stage_params, x, aux) -> y` (x and y of one shape, no state kept between
    microbatches, as an encoder's layers) into a pipeline over "stage":
    `wrapped(stack_params, x_m, aux_m) -> y_m`.

    x_m [M, ...] holds the microbatches already cut (an encoder's packed streams cannot be cut
    by rows); aux_m is a pytree of per-microbatch inputs with the same leading M, given to
    every stage. stack_params are split over "stage" on their leading (layers) axis, so
    stage_fn sees only its own layers. The tick schedule (`_run_ticks`) is `pipelined_stack`'s.
    """
    num_stages = mesh.shape["stage"]

    def stage_body(stack_params, x_m, aux_m):
        def work(m, valid, x_in, none):
            return stage_fn(stack_params, x_in, jax.tree.map(lambda a: a[m], aux_m)), none

        return _run_ticks(x_m, num_stages, work, None)[0]

    def wrapped(stack_params, x_m, aux_m):
        fn = jax.shard_map(
            stage_body, mesh=mesh, axis_names={"stage"}, check_vma=False,
            in_specs=(jax.tree.map(lambda _: P("stage"), stack_params), P(), jax.tree.map(lambda _: P(), aux_m)),
            out_specs=P(),
        )
        return fn(stack_params, x_m, aux_m)

    return wrapped
