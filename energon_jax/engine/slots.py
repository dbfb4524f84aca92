"""Slot-based decode engine for serving: `prefill` requests into free slots, `decode` all slots.

The decode state lives on the device and is donated to every step, so XLA updates the KV
cache in place:

    cache             the runner's KV cache for S slots of C positions (runner.empty_cache(S, C))
    tokens_s [S]      the token each slot feeds to its next decode step
    positions_s [S]   where that token is written in the cache
    steps_s [S]       tokens generated so far (the PRNG fold-in index, as offline generate)
    seeds_s [S]       per-slot seed; keys are derived on device
    active_s [S]      slots whose position advances
    sampling          SamplingParams [S]

Programs: one prefill per (rows, prompt-length bucket) shape, a batch of prompts run together
and their K/V inserted into their slots' rows with one scatter per cache array
(`Runner.write_kv_rows`), and one decode per
step count `k` (a `fori_loop` of k steps in one dispatch). Sampling settings, seeds, positions
and active flags are traced arrays, so new requests never recompile. With the same seed, a slot samples exactly what `GPTModel.generate`
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

from energon_jax.engine.sampling import SamplingParams, row_keys, step_keys
from energon_jax.engine.steps import PAD_ID, CompileCounter, bucket, compile_concurrently
from energon_jax.runtime.checks import check_int
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


def default_prefill_batch() -> int:
    """Prompts per prefill dispatch when not given: 16 on accelerators, where a small prefill is
    bound by reading the weights and launching kernels, so rows come almost free (GPT-2 medium on
    an H100, 64 prompts of 32-512 tokens, with prefill_batch_tokens 8192: served 0.82 of offline
    throughput against 0.72 with 8 rows x 2048 tokens and 0.73 with 32 x 16384); 1 on CPU, where
    compute scales with rows and a batch's padding rows cost real time (benchmarks/serve.py on
    2 CPU cores: 919 tokens/s one prompt at a time, 761 batched)."""
    return 1 if jax.default_backend() == "cpu" else 16


def check_power_of_two(name: str, value) -> int:
    """decode_steps and max_prefill_batch: each is a power of two (the compiled step counts and
    prefill rows are its powers of two); numpy integers too, as `check_int` takes them."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1 or value & (value - 1):
        raise ValueError(f"{name}={value!r} must be a power of two >= 1")
    return int(value)


class SlotEngine:
    """`num_slots` decode slots over a loaded `GPTModel`, run through the model's own `runner` (so
    any mesh and layer layout it supports: the cache follows the rules table).

    decode_steps: the largest step count per decode dispatch; programs are compiled for every
      power of two up to it (`step_options`), so a scheduler can stop exactly when a slot frees.
    cache_len: cache positions per slot (default: the model's max_seq_len).
    max_prefill_batch / prefill_batch_tokens: prompts prefilled in one dispatch, at most this many
      rows (a power of two; None: `default_prefill_batch()`) and rows x bucket tokens.
    """

    def __init__(self, model, num_slots: int, *, decode_steps: int = 8, cache_len: int | None = None,
                 max_prefill_batch: int | None = None, prefill_batch_tokens: int = 8192):
        num_slots = check_int("num_slots", num_slots, 1)
        decode_steps = check_power_of_two("decode_steps", decode_steps)
        dp = model.mesh.shape["data"]
        if num_slots % dp:
            raise ValueError(f"num_slots={num_slots} (a Server's max_batch_size) must be a multiple of the "
                             f"data-parallel size dp={dp}")
        self.dp = dp
        self.model = model
        self.runner = model.runner
        self.num_slots = num_slots
        # int() took 40.7, True and "48"
        self.cache_len = (model.max_seq_len if cache_len is None else
                          check_int("cache_len", cache_len, 1, model.max_seq_len, " (the model's max_seq_len)"))
        if max_prefill_batch is None:
            max_prefill_batch = default_prefill_batch()
        max_prefill_batch = check_power_of_two("max_prefill_batch", max_prefill_batch)
        prefill_batch_tokens = check_int("prefill_batch_tokens", prefill_batch_tokens, 1)  # True was 1
        self.step_options = tuple(1 << i for i in range(decode_steps.bit_length()))
        self.max_prefill_batch = min(max_prefill_batch, num_slots)
        self.prefill_batch_tokens = prefill_batch_tokens
        # every bucket a prompt can get: the powers of two below cache_len, and cache_len itself
        # (the cap, not a power of two in general, where the longest prompts go)
        self.prefill_buckets = tuple(sorted({bucket(n, self.cache_len) for n in
                                             [1 << i for i in range(self.cache_len.bit_length())] + [self.cache_len]}))
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
        # ("prefill", (rows, tokens)) / ("decode", steps) -> the program `warmup` compiled for it;
        # a shape not in here dispatches through the jitted function (compiled on first call)
        self._programs: dict[tuple, jax.stages.Compiled] = {}
        self._empty_state = self._make_empty_state()
        self.state = self.fresh_state()

    @property
    def prefill_shapes(self) -> list[tuple[int, int]]:
        """Every (rows, tokens) prefill program: each prompt bucket alone, and per bucket one
        batched program of `rows_for(bucket)` rows (<= max_prefill_batch, rows x bucket <=
        prefill_batch_tokens). Two per bucket keeps start-up compiles few (each program of a
        24-layer model takes seconds to compile); a small batch pads to the bucket's rows."""
        return [(self.dp, t) for t in self.prefill_buckets] + [
            (self.rows_for(t), t) for t in self.prefill_buckets if self.rows_for(t) > self.dp]

    # ------------------------------------------------------------------ state
    def _make_empty_state(self):
        s = self.num_slots

        @functools.partial(jax.jit, out_shardings=self._state_sharding)
        def empty():
            return DecodeState(self.runner.empty_cache(s, self.cache_len), jnp.full((s,), PAD_ID, jnp.int32),
                               jnp.zeros((s,), jnp.int32), jnp.zeros((s,), jnp.int32), jnp.zeros((s,), jnp.uint32),
                               jnp.zeros((s,), bool), SamplingParams.make(s))

        return empty

    def fresh_state(self) -> DecodeState:
        """Every slot empty (one program, compiled once: it runs at start, after warm-up and on each reset)."""
        return self._empty_state()

    def cache_bytes(self) -> int:
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(self._cache_shapes))

    # ------------------------------------------------------------- programs
    def _make_prefill(self):
        runner, counter = self.runner, self.compile_counts

        @functools.partial(jax.jit, donate_argnums=(1,), out_shardings=(self._state_sharding, self._replicated))
        def prefill(params, state: DecodeState, tokens_pt, lengths_p, slots_p, temperature_p, top_k_p, top_p_p,
                    seeds_p):
            p, t = tokens_pt.shape
            counter[f"prefill_{p}x{t}"] += 1
            positions_pt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (p, t))
            logits_p1v, kv = runner.model_fn(params, tokens_pt, positions_pt, lengths_p, None, lengths_p - 1)
            sampling_p = SamplingParams(temperature_p, top_k_p, top_p_p)
            tok_p = runner.sample(logits_p1v[:, 0], sampling_p, step_keys(row_keys(seeds_p), 0))
            cache = runner.write_kv_rows(state.cache, kv, slots_p)  # each prompt's K/V into its slot's row
            sp = state.sampling

            def put(arr, values):  # padding rows repeat row 0 (same slot, same values): harmless
                return arr.at[slots_p].set(jnp.asarray(values, arr.dtype))

            state = DecodeState(
                cache, put(state.tokens_s, tok_p), put(state.positions_s, lengths_p), put(state.steps_s, 1),
                put(state.seeds_s, seeds_p), put(state.active_s, True),
                SamplingParams(put(sp.temperature, temperature_p), put(sp.top_k, top_k_p), put(sp.top_p, top_p_p)))
            return state, tok_p

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
                logits_s1v, cache = runner.model_fn(params, state.tokens_s[:, None], pos_s[:, None], pos_s + 1,
                                                    state.cache, None)
                keys = jax.vmap(jax.random.fold_in)(keys_s, state.steps_s)
                tok_s = jnp.where(active_s, runner.sample(logits_s1v[:, 0], state.sampling, keys), state.tokens_s)
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
        return self.prefill_batch([slot], [token_ids], temperature=[temperature], top_k=[top_k], top_p=[top_p],
                                  seed=[seed])[0]

    def rows_for(self, t: int) -> int:
        """Rows of the batched prefill program for prompt bucket t: as many as fit the token budget,
        rounded up to a multiple of dp (the kernels' shard_map splits rows over "data")."""
        return self.model.dp_rows(max(1, min(self.max_prefill_batch, self.prefill_batch_tokens // t)))

    def prefill_shape(self, lengths) -> tuple[int, int]:
        """The compiled (rows, tokens) program that prompts of these lengths run as one batch:
        one row alone (dp rows under data parallelism), else the bucket's batched program (its
        spare rows are padding)."""
        t = bucket(max(lengths), self.cache_len)
        return (self.dp if len(lengths) <= self.dp else self.rows_for(t)), t

    def fits_one_prefill(self, lengths) -> bool:
        """Whether prompts of these lengths can share one prefill dispatch (a compiled shape)."""
        return len(lengths) <= self.prefill_shape(lengths)[0]

    def group_prefills(self, lengths) -> list[list[int]]:
        """Indices of prompts grouped into prefill batches: similar lengths together (sorted), each
        group a compiled shape. Batching prompts turns several batch-1 passes, each reading every
        weight, into one pass."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        groups: list[list[int]] = []
        for i in order:
            if groups and self.fits_one_prefill([lengths[j] for j in groups[-1]] + [lengths[i]]):
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    def prefill_batch(self, slots, prompts, *, temperature, top_k, top_p, seed) -> jax.Array:
        """Prefill prompts[i] into slots[i] (distinct slots) in one dispatch; returns the first
        tokens as a device array whose first len(slots) entries belong to the prompts (the rest
        are padding rows; slice after reading it back: indexing a device array with each
        Python int would compile a small program per index). Settings are per-prompt sequences."""
        inputs = self._prefill_inputs(slots, prompts, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        run = self._programs.get(("prefill", inputs[0].shape), self._prefill)
        self.state, tok = run(self.model.params, self.state, *inputs)
        return tok

    def _prefill_inputs(self, slots, prompts, *, temperature, top_k, top_p, seed) -> tuple[np.ndarray, ...]:
        """prefill_batch's checked arguments as the prefill program takes them: tokens [rows, bucket]
        (rows and bucket from `prefill_shape`), then lengths, slots, temperature, top_k, top_p and
        seeds, one entry per row."""
        n = len(slots)
        if not n or len(prompts) != n or any(len(x) != n for x in (temperature, top_k, top_p, seed)):
            raise ValueError(f"prefill_batch needs one prompt and one of each setting per slot; got {n} slots, "
                             f"{len(prompts)} prompts")
        if len(set(slots)) != n:
            raise ValueError(f"slots {list(slots)} repeat a slot; each prompt needs its own")
        for slot, ids in zip(slots, prompts):
            if not 1 <= len(ids) <= self.cache_len:
                raise ValueError(f"a prompt of {len(ids)} tokens does not fit a slot of {self.cache_len} positions")
            if not 0 <= slot < self.num_slots:
                raise ValueError(f"slot={slot} outside [0, {self.num_slots})")
        lengths = [len(x) for x in prompts]
        p, t = self.prefill_shape(lengths)
        if n > p:
            raise ValueError(f"{n} prompts of up to {max(lengths)} tokens exceed one prefill batch "
                             f"({p} rows at that length, {self.prefill_batch_tokens} tokens); "
                             "split them with group_prefills")
        order = list(range(n)) + [0] * (p - n)  # padding rows repeat row 0
        tokens = np.full((p, t), PAD_ID, np.int32)
        for row, i in enumerate(order):
            tokens[row, : lengths[i]] = prompts[i]

        def col(values, dtype):
            return np.asarray([values[i] for i in order], dtype)

        seeds = [int(x) & 0xFFFFFFFF for x in seed]
        return (tokens, col(lengths, np.int32), col(list(slots), np.int32), col(temperature, np.float32),
                col(top_k, np.int32), col(top_p, np.float32), col(seeds, np.uint32))

    def decode(self, steps: int, active) -> jax.Array:
        """Run `steps` decode steps over every slot; returns tokens [steps, num_slots] (device array).

        active: bool [num_slots]; inactive slots neither advance nor change their token."""
        if steps not in self.step_options:
            raise ValueError(f"steps={steps} is not compiled; step options: {self.step_options}")
        active = np.asarray(active, bool)
        if active.shape != (self.num_slots,):
            raise ValueError(f"active has shape {active.shape}; expected ({self.num_slots},)")
        compiled = self._programs.get(("decode", steps))
        if compiled is not None:
            self.state, out = compiled(self.model.params, self.state, active)
        else:
            self.state, out = self._decode(self.model.params, self.state, active, steps=steps)
        return out

    def warmup(self, workers: int | None = None) -> float:
        """Compile every prefill bucket and decode step count, then run each once; returns seconds taken.

        The programs compile at once on `workers` threads (steps.compile_concurrently), and later
        calls dispatch through them, so nothing compiles twice."""
        t0 = time.perf_counter()
        params = self.model.params
        pads = {(p, t): dict(slots=list(range(p)), prompts=[[PAD_ID] * t] * p, temperature=[0.0] * p, top_k=[0] * p,
                             top_p=[1.0] * p, seed=[0] * p) for p, t in self.prefill_shapes}  # prompts of padding
        lowerings = {("prefill", shape): functools.partial(self._prefill.lower, params, self.state,
                                                           *self._prefill_inputs(**pad)) for shape, pad in pads.items()}
        for k in self.step_options:
            lowerings["decode", k] = functools.partial(self._decode.lower, params, self.state,
                                                       np.zeros(self.num_slots, bool), steps=k)
        programs, workers = compile_concurrently(
            {key: lower for key, lower in lowerings.items() if key not in self._programs}, workers)
        self._programs.update(programs)
        compiled_s = time.perf_counter() - t0
        for pad in pads.values():  # each program once: the device side of a first run (module loads)
            self.prefill_batch(**pad)
        for k in self.step_options:
            self.decode(k, np.zeros(self.num_slots, bool))
        jax.block_until_ready(self.state)
        self.state = self.fresh_state()
        jax.block_until_ready(self.state)
        took = time.perf_counter() - t0
        compiling = (f"{compiled_s:.1f} s compiling {len(programs)} on {workers} thread{'s' * (workers != 1)}"
                     if programs else "all compiled before")
        log.info("warmed up %d prefill shapes (rows x tokens) %s and decode steps %s for %d slots in %.1f s "
                 "(%s), ran each once in %.1f s",
                 len(self.prefill_shapes), [f"{p}x{t}" for p, t in self.prefill_shapes], list(self.step_options),
                 self.num_slots, took, compiling, took - compiled_s)
        return took
