"""Slot-based decode engine for serving: `prefill` one request into a slot, `decode` all slots.

The decode state lives on the device and is donated to every step, so XLA updates the KV
cache in place:

    cache             the runner's KV cache for S slots of C positions (runner.empty_cache(S, C))
    tokens_s [S]      the token each slot feeds to its next decode step
    positions_s [S]   where that token is written in the cache
    steps_s [S]       tokens generated so far (the PRNG fold-in index, as offline generate)
    seeds_s [S]       per-slot seed; keys are derived on device
    active_s [S]      slots whose position advances
    sampling          SamplingParams [S]

Programs: one prefill per prompt-length bucket (batch 1, KV inserted into the slot's row with
`dynamic_update_slice`) and one decode per step count `k` (a `fori_loop` of k steps in one
dispatch). Sampling settings, seeds, positions and active flags are traced arrays, so new
requests never recompile. With the same seed, a slot samples exactly what `GPTModel.generate`
samples for that prompt alone.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from energon_jax.engine.sampling import SamplingParams, row_keys, sample, step_keys
from energon_jax.engine.steps import PAD_ID, CompileCounter, bucket
from energon_jax.runtime.sharding import CACHE_AXES, logical_to_sharding

log = logging.getLogger(__name__)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    cache: dict
    tokens_s: jax.Array
    positions_s: jax.Array
    steps_s: jax.Array
    seeds_s: jax.Array
    active_s: jax.Array
    sampling: SamplingParams


def _set_row(arr, slot, value):
    return jax.lax.dynamic_update_index_in_dim(arr, jnp.asarray(value, arr.dtype), slot, 0)


class SlotEngine:
    """`num_slots` decode slots over a loaded `GPTModel`, run through the model's own `runner` (so
    any mesh and layer layout it supports: the cache follows the rules table).

    decode_steps: the largest step count per decode dispatch; programs are compiled for every
      power of two up to it (`step_options`), so a scheduler can stop exactly when a slot frees.
    cache_len: cache positions per slot (default: the model's max_seq_len).
    """

    def __init__(self, model, num_slots: int, *, decode_steps: int = 8, cache_len: int | None = None):
        if not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots={num_slots!r} must be an int >= 1")
        if not isinstance(decode_steps, int) or decode_steps < 1 or decode_steps & (decode_steps - 1):
            raise ValueError(f"decode_steps={decode_steps!r} must be a power of two >= 1")
        dp = model.mesh.shape["data"]
        if num_slots % dp:
            raise ValueError(f"num_slots={num_slots} must be a multiple of the data-parallel size {dp}")
        self.model = model
        self.runner = model.runner
        self.num_slots = num_slots
        self.cache_len = model.max_seq_len if cache_len is None else int(cache_len)
        if not 1 <= self.cache_len <= model.max_seq_len:
            raise ValueError(f"cache_len={cache_len!r} must be in [1, {model.max_seq_len}] (the model's max_seq_len)")
        self.step_options = tuple(1 << i for i in range(decode_steps.bit_length()))
        self.prefill_buckets = tuple(sorted({bucket(n, self.cache_len) for n in
                                             [1] + [1 << i for i in range(self.cache_len.bit_length() + 1)]
                                             if n <= self.cache_len}))
        self.compile_counts = CompileCounter()
        mesh = model.mesh
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        cache_sharding = logical_to_sharding(CACHE_AXES, mesh)
        self._cache_shapes = jax.eval_shape(lambda: self.runner.empty_cache(num_slots, self.cache_len))
        self._state_sharding = DecodeState(
            jax.tree.map(lambda _: cache_sharding, self._cache_shapes), replicated, replicated, replicated,
            replicated, replicated, SamplingParams(replicated, replicated, replicated))
        self._replicated = replicated
        self._prefill = self._make_prefill()
        self._decode = self._make_decode()
        self.state = self.fresh_state()

    # ------------------------------------------------------------------ state
    def fresh_state(self) -> DecodeState:
        s = self.num_slots

        @functools.partial(jax.jit, out_shardings=self._state_sharding)
        def make():
            return DecodeState(self.runner.empty_cache(s, self.cache_len), jnp.full((s,), PAD_ID, jnp.int32), jnp.zeros((s,), jnp.int32),
                               jnp.zeros((s,), jnp.int32), jnp.zeros((s,), jnp.uint32), jnp.zeros((s,), bool),
                               SamplingParams.make(s))

        return make()

    def cache_bytes(self) -> int:
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(self._cache_shapes))

    # ------------------------------------------------------------- programs
    def _make_prefill(self):
        runner, counter = self.runner, self.compile_counts

        @functools.partial(jax.jit, donate_argnums=(1,), out_shardings=(self._state_sharding, self._replicated))
        def prefill(params, state: DecodeState, tokens_1t, length, slot, temperature, top_k, top_p, seed):
            counter[f"prefill_{tokens_1t.shape[1]}"] += 1
            t = tokens_1t.shape[1]
            positions_1t = jnp.arange(t, dtype=jnp.int32)[None]
            lengths_1 = length[None]
            logits_11v, kv = runner.model_fn(params, tokens_1t, positions_1t, lengths_1, None, lengths_1 - 1)
            sampling_1 = SamplingParams(temperature[None], top_k[None], top_p[None])
            tok = sample(logits_11v[:, 0], sampling_1, step_keys(row_keys(seed[None]), 0))[0]
            cache = runner.write_kv(state.cache, kv, slot)  # the prompt's K/V [.., 1, N, T, D] into row `slot`
            sp = state.sampling
            state = DecodeState(
                cache, _set_row(state.tokens_s, slot, tok), _set_row(state.positions_s, slot, length),
                _set_row(state.steps_s, slot, 1), _set_row(state.seeds_s, slot, seed),
                _set_row(state.active_s, slot, True),
                SamplingParams(_set_row(sp.temperature, slot, temperature), _set_row(sp.top_k, slot, top_k),
                               _set_row(sp.top_p, slot, top_p)))
            return state, tok

        return prefill

    def _make_decode(self):
        runner, counter, last = self.runner, self.compile_counts, self.cache_len - 1

        @functools.partial(jax.jit, donate_argnums=(1,), static_argnames=("steps",),
                           out_shardings=(self._state_sharding, self._replicated))
        def decode(params, state: DecodeState, active_s, *, steps: int):
            counter[f"decode_{steps}"] += 1
            keys_s = row_keys(state.seeds_s)
            s = active_s.shape[0]

            def body(i, carry):
                state, out_ks = carry
                pos_s = jnp.minimum(state.positions_s, last)  # overshooting slots idle at the last position
                logits_s1v, cache = runner.model_fn(params, state.tokens_s[:, None], pos_s[:, None], None,
                                                    state.cache, None)
                keys = jax.vmap(jax.random.fold_in)(keys_s, state.steps_s)
                tok_s = jnp.where(active_s, sample(logits_s1v[:, 0], state.sampling, keys), state.tokens_s)
                out_ks = out_ks.at[i].set(tok_s)
                step = active_s.astype(jnp.int32)
                state = dataclasses.replace(state, cache=cache, tokens_s=tok_s, positions_s=pos_s + step,
                                            steps_s=state.steps_s + step)
                return state, out_ks

            state = dataclasses.replace(state, active_s=active_s)
            out_ks = jnp.zeros((steps, s), jnp.int32)
            return jax.lax.fori_loop(0, steps, body, (state, out_ks))

        return decode

    # ------------------------------------------------------------------- API
    def prefill(self, slot: int, token_ids, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                seed: int = 0) -> jax.Array:
        """Prefill a prompt into `slot` and return its first token (a device scalar; read it lazily)."""
        n = len(token_ids)
        if not 1 <= n <= self.cache_len:
            raise ValueError(f"a prompt of {n} tokens does not fit a slot of {self.cache_len} positions")
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot={slot} outside [0, {self.num_slots})")
        t = bucket(n, self.cache_len)
        tokens = np.full((1, t), PAD_ID, np.int32)
        tokens[0, :n] = token_ids
        self.state, tok = self._prefill(self.model.params, self.state, tokens, np.int32(n), np.int32(slot),
                                        np.float32(temperature), np.int32(top_k), np.float32(top_p),
                                        np.uint32(seed & 0xFFFFFFFF))
        return tok

    def decode(self, steps: int, active) -> jax.Array:
        """Run `steps` decode steps over every slot; returns tokens [steps, num_slots] (device array).

        active: bool [num_slots]; inactive slots neither advance nor change their token."""
        if steps not in self.step_options:
            raise ValueError(f"steps={steps} is not compiled; step options: {self.step_options}")
        active = np.asarray(active, bool)
        if active.shape != (self.num_slots,):
            raise ValueError(f"active has shape {active.shape}; expected ({self.num_slots},)")
        self.state, out = self._decode(self.model.params, self.state, active, steps=steps)
        return out

    def warmup(self) -> float:
        """Compile (and run once) every prefill bucket and decode step count; returns seconds taken."""
        t0 = time.perf_counter()
        for t in self.prefill_buckets:
            self.prefill(0, [PAD_ID] * t)
        for k in self.step_options:
            self.decode(k, np.zeros(self.num_slots, bool))
        jax.block_until_ready(self.state)
        self.state = self.fresh_state()
        jax.block_until_ready(self.state)
        took = time.perf_counter() - t0
        log.info("compiled %d prefill buckets %s and decode steps %s for %d slots in %.1f s",
                 len(self.prefill_buckets), list(self.prefill_buckets), list(self.step_options), self.num_slots, took)
        return took
