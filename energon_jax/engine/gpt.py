"""GPT models as users see them: `generate` and `logits`."""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from energon_jax.engine.base import ShardedModel, token_matrix
from energon_jax.engine.sampling import (SamplingParams, check_stop_strings, cut_at_stop_string, resolve_seed,
                                        validate_sampling)
from energon_jax.engine.steps import (PAD_ID, CompileCounter, bucket, make_forward, make_generate, make_runner,
                                     unrolled_layers, unstack_layers)
from energon_jax.models.gpt2 import GPT2, AttentionKernels, decode_attention_xla, write_token
from energon_jax.runtime.checks import check_int
from energon_jax.runtime.distributed import check_same_call, is_multiprocess, same_seed, to_host
from energon_jax.runtime.sharding import table_multiple


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    text: str | None  # None in token-id mode (no tokenizer)
    token_ids: list[int]  # new tokens only; a stop token that ended generation is included
    finish_reason: str  # "length" | "stop"


class TokenLogprobs(NamedTuple):
    """`GPTModel.token_logprobs` of a sequence of T tokens: float32 log-probabilities of tokens 1..T-1."""

    chosen: np.ndarray  # [T - 1]: of each token given those before it
    top_ids: np.ndarray  # [T - 1, top] int32: the most likely tokens at each position, most likely first
    top_logprobs: np.ndarray  # [T - 1, top]: theirs


@functools.partial(jax.jit, static_argnames=("vocab", "top"))
def _score_tokens(logits_btv, following_bt, *, vocab: int, top: int):
    """The log-softmax over the real vocabulary (the table's padding columns cut) of the logits at
    each position, taken at the token that follows it, and its `top` largest entries."""
    lp = jax.nn.log_softmax(logits_btv[:, :, :vocab].astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(lp, following_bt[:, :, None], axis=-1)[..., 0]
    top_lp, top_ids = jax.lax.top_k(lp, top)
    return chosen, top_ids.astype(jnp.int32), top_lp


def attention_kernels(config, mesh, impl: str) -> AttentionKernels | None:
    """The fused attention to run: None means the XLA reference path inside the module.

    "auto" picks the Triton kernels on a CUDA GPU when they apply (head dim a power of two
    >= 16, no pipeline stages) and XLA otherwise; "triton" insists and says why it can't."""
    from energon_jax.kernels._dispatch import check_head_dim, resolve_impl

    if resolve_impl(impl) == "xla":
        return None
    try:
        check_head_dim(config.head_dim)
        if mesh.shape["stage"] > 1:
            raise ValueError("the Triton attention kernels do not run inside pipeline stages (pp > 1)")
    except ValueError as e:
        if impl == "triton":
            raise ValueError(f"attention_impl='triton': {e}; use 'xla' or 'auto'") from None
        return None
    from energon_jax.kernels.decode_append import decode_append_attention
    from energon_jax.kernels.decode_attention import decode_attention
    from energon_jax.kernels.prefill_attention import prefill_attention

    kernel_mesh = mesh if mesh.devices.size > 1 else None  # shard_map per device's heads / rows
    shards = mesh.shape["data"] * mesh.shape["tensor"]  # the kernels run per device: count one device's rows
    decode = functools.partial(decode_attention, impl="triton", mesh=kernel_mesh)
    if impl == "auto":
        decode = functools.partial(_decode_by_size, decode, shards=shards)
    step = functools.partial(decode_append_attention, impl="triton", mesh=kernel_mesh)
    return AttentionKernels(prefill=functools.partial(prefill_attention, impl="triton", mesh=kernel_mesh),
                            decode=decode, decode_step=functools.partial(_decode_step, step, decode, shards=shards))


# "auto" runs decode attention through Triton only from this many (slot, head) rows. Below it the
# kernel's grid is a few dozen programs plus a merge kernel, and XLA's fused attention is faster:
# GPT-2 small at batch 1 decodes at 0.681 ms/step with XLA attention against 0.862 with Triton, and
# GPT-2 medium at 1.422 against 1.826; at batch 32 (384 and 512 rows) Triton is level or ahead
# (H100, BENCHMARKS.md). The tl.dot kernel of session 10 keeps the threshold on an H200: at batch 8, GPT-2
# medium (128 rows) decodes at 1.098 ms/step through it against 0.918 with XLA's attention, GPT-2 XL (200
# rows) at 3.083 against 2.851. From 256 rows it is ahead at ~256 tokens of context (1.02-1.17x) and
# 0.95-0.99x at ~1,000 (GPT-2 medium, batch 32). The rows are one device's under data / tensor parallel.
MIN_TRITON_DECODE_ROWS = 256

# The decode step is the fused write + attention kernel (kernels/decode_append.py) from this many
# (slot, head) rows per device. At 256 rows and more it is ahead everywhere measured (session 11,
# H200): GPT-2 medium at batch 32 1.564 ms/step against XLA's 1.728 at ~1,000 tokens of context, 0.986
# against 1.387 at ~256, batch 16 (256 rows) 0.844 against 1.066. Below that (session 12, H200,
# benchmarks/decode.py --triton-rows 1 against --impls xla): at batch 8 and ~256 tokens it is ahead at
# 96 rows (GPT-2 small, 0.422 against 0.470 ms/step), 128 (medium, 0.800 against 0.908) and 200 (XL,
# 2.429 against 2.814), and level at ~1,000 tokens (medium, 1.162 against 1.184); at batch 1 (12-25
# rows) it is behind or mixed (GPT-2 small 0.413 against 0.369 at ~256 tokens, medium 1.063 against
# 0.943 at ~1,000; medium 0.758 against 0.868 and XL 1.906 against 1.942 at ~256): a few dozen
# programs, each walking its whole context alone. Session 13 cut each row's context into runs below
# 256 rows (kernels/decode_append.default_splits): at ~1,000 tokens that put the fused step ahead at
# GPT-2 small batches 2-4 (0.430 / 0.441 against 0.443 / 0.487) and medium batch 8 (1.087 against
# 1.173), but XLA stays ahead at batch 1 (small 0.391 against 0.443, medium 0.809 against 0.840; at
# ~256 tokens XL 1.934 against 2.045) and medium batches 2-4 (0.874 / 0.928 against 0.896 / 1.062),
# so the threshold stays; from it the fused step runs 2-3 runs a row up to 255 rows.
MIN_FUSED_STEP_ROWS = 96


def _enough_rows(batch: int, heads: int, shards: int, minimum: int) -> bool:
    """Whether one device's (slot, head) rows reach `minimum`; shards: devices the batch and heads
    split over (data x tensor). Shapes are static: the choice is made at trace time."""
    return batch * heads // shards >= minimum


def _decode_by_size(triton_decode, q_bnd, k_bnsd, v_bnsd, lengths_b, *, scale, shards: int = 1):
    if not _enough_rows(q_bnd.shape[0], q_bnd.shape[1], shards, MIN_TRITON_DECODE_ROWS):
        return decode_attention_xla(q_bnd, k_bnsd, v_bnsd, lengths_b, scale=scale)
    return triton_decode(q_bnd, k_bnsd, v_bnsd, lengths_b, scale=scale)


def _decode_step(fused_step, decode, qkv_b3nd, k_bnsd, v_bnsd, pos_b, *, scale, shards: int = 1):
    """A decode step's cache write and attention: the fused kernel (kernels/decode_append.py) from
    MIN_FUSED_STEP_ROWS rows per device where its blocks tile the cache; otherwise the two cache
    scatters, then `decode` (under "auto", XLA's attention below MIN_TRITON_DECODE_ROWS rows)."""
    from energon_jax.kernels.decode_append import fits

    b, n, s, d = k_bnsd.shape
    if _enough_rows(b, n, shards, MIN_FUSED_STEP_ROWS) and fits(s, d):
        return fused_step(qkv_b3nd, k_bnsd, v_bnsd, pos_b, scale=scale)
    k_bnsd = write_token(k_bnsd[None], qkv_b3nd[:, 1], 0, pos_b)[0]
    v_bnsd = write_token(v_bnsd[None], qkv_b3nd[:, 2], 0, pos_b)[0]
    return decode(qkv_b3nd[:, 0], k_bnsd, v_bnsd, pos_b + 1, scale=scale), k_bnsd, v_bnsd


def min_decode_rows() -> int:
    """Rows a generate call decodes at least: 1 (a lone prompt decodes alone).

    Until GPT-2's projection weights were stored [out, in], a lone prompt decoded as 2 rows on a
    GPU: one row made XLA's dots multiply + reduce fusions over the strided [in, out] weights,
    which read them at 0.4-0.8 TB/s, and 2 rows made them GEMMs. With [out, in] weights a single
    row is a reduction along contiguous memory (models/layers.project), faster than the 2-row
    GEMM: on an H200, GPT-2 XL batch 1 decodes at 2.06 ms/step with 1 row against 2.51 with 2,
    GPT-2 small at 0.41 against 0.40 (benchmarks/decode.py --min-rows, BENCHMARKS.md). Padding
    rows, when a mesh or this knob asks for them, generate nothing (tests/test_gpt2.py)."""
    return 1


@functools.lru_cache(maxsize=16)
def _compiled_steps(config, dtype, mesh, attention_impl):
    """One set of jitted steps per (config, dtype, mesh, impl): models loaded twice share their
    compiled programs, and so their `compile_counts`."""
    module = GPT2(config, param_dtype=dtype, table_multiple=table_multiple(mesh),
                  kernels=attention_kernels(config, mesh, attention_impl))
    runner = make_runner(module, mesh, dtype)
    counter = CompileCounter()
    return module, runner, counter, make_forward(runner, counter), make_generate(runner, counter)


def _is_token_list(p) -> bool:
    if isinstance(p, (list, tuple)) and set(map(type, p)) <= {int}:  # a JSON body's ids: C loops only
        return True
    # bools are ints to Python, not token ids ([True, False] was the prompt [1, 0])
    return isinstance(p, (list, tuple, np.ndarray)) and all(
        isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in p)


class GPTModel(ShardedModel):
    def __init__(self, config, params, mesh, tokenizer, *, max_seq_len, source="", attention_impl="auto"):
        if mesh.shape["stage"] == 1 and not unrolled_layers(params):
            params = unstack_layers(params, mesh)  # see engine/steps.make_runner for why
        super().__init__(config, params, mesh, tokenizer, max_seq_len=max_seq_len, source=source)
        self.attention_impl = attention_impl

    @property
    def attention_impl(self) -> str:
        return self._attention_impl

    @attention_impl.setter
    def attention_impl(self, impl: str):
        """The attention ("auto" | "triton" | "xla"). Steps are compiled per impl: setting it takes that
        impl's steps (and their `compile_counts`); a Server built before keeps the steps it had."""
        from energon_jax.kernels._dispatch import IMPLS

        if impl not in IMPLS:
            raise ValueError(f"attention_impl={impl!r} is not supported; accepted: {IMPLS}")
        self.module, self.runner, self.compile_counts, self._forward, self._generate = _compiled_steps(
            self.config, self.dtype, self.mesh, impl)
        self._attention_impl = impl

    def kv_cache_bytes_per_device(self, batch: int, length: int) -> int:
        c, shape = self.config, self.mesh.shape
        local = (-(-c.n_layer // shape["stage"]) * -(-batch // shape["data"]) * (c.n_head // shape["tensor"])
                 * length * c.head_dim)
        return 2 * local * np.dtype(self.dtype).itemsize  # K and V

    # ----------------------------------------------------------------- inputs
    def dp_rows(self, n: int) -> int:
        """`n` rows rounded up to a multiple of dp: a dispatch's batch splits evenly over the
        data-parallel replicas, and `logits` and `generate` pad their rows up to it."""
        return -(-n // self.dp) * self.dp

    def _check_ids(self, ids: Sequence[int], where: str) -> list[int]:
        # converted and range-checked by C loops (map, min, max): a per-id Python loop cost the
        # HTTP server's one event loop ~50 us a prompt
        ids = ids.tolist() if isinstance(ids, np.ndarray) else list(map(int, ids))
        if ids and not (0 <= min(ids) and max(ids) < self.config.vocab_size):
            bad = next(t for t in ids if not 0 <= t < self.config.vocab_size)
            raise ValueError(f"{where}: token id {bad} outside the vocabulary [0, {self.config.vocab_size})")
        return ids

    def encode_prompts(self, prompts) -> list[list[int]]:
        if isinstance(prompts, (str, bytes)) or _is_token_list(prompts) and len(prompts) and not isinstance(prompts[0], (list, tuple)):
            raise TypeError(f"prompts must be a list of str or a list of token-id lists, got {type(prompts).__name__}"
                            f" {str(prompts)[:40]!r}; wrap a single prompt in a list")
        try:
            prompts = list(prompts)
        except TypeError:  # None, 5: Python's "'NoneType' object is not iterable" named nothing
            raise TypeError(f"prompts must be a list of str or a list of token-id lists, got {type(prompts).__name__}"
                            f" {str(prompts)[:40]!r}") from None
        if not prompts:
            raise ValueError("prompts is empty; pass at least one prompt")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                # a tokenizer's added tokens may lie past the model's vocabulary: checked as ids are
                ids = self._check_ids(self._require_tokenizer(f"prompts[{i}]={p[:30]!r}").encode(p), f"prompts[{i}]")
            elif _is_token_list(p):
                ids = self._check_ids(p, f"prompts[{i}]")
            else:
                raise TypeError(f"prompts[{i}] is {type(p).__name__}; expected str or list[int]")
            if not ids:
                raise ValueError(f"prompts[{i}] is empty ({p!r}); a prompt needs at least one token")
            out.append(ids)
        return out

    # ----------------------------------------------------------------- logits
    def logits(self, token_ids) -> np.ndarray:
        """[B, T] int token ids -> float32 logits [B, T, vocab]."""
        arr = token_matrix(token_ids)
        b, t = arr.shape
        if t > self.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds the context of {self.max_seq_len} tokens")
        self._check_ids(arr.ravel(), "token_ids")
        tb = bucket(t, self.max_seq_len)
        # any batch: rows past b (token PAD_ID, a valid id, over all t positions) fill the last
        # data-parallel replica and are cut from the result
        padded = np.full((self.dp_rows(b), tb), PAD_ID, np.int32)
        padded[:b, :t] = arr
        check_same_call("logits", padded)
        out = self._forward(self.params, self.put_rows(padded), self.put_rows(np.full((len(padded),), t, np.int32)))
        if not out.is_fully_addressable:  # several processes: gather the whole batch on each
            return to_host(out)[:b, :t, : self.config.vocab_size].astype(np.float32)
        return np.asarray(out[:b, :t, : self.config.vocab_size], dtype=np.float32)

    def token_logprobs(self, token_ids: Sequence[int], *, top: int = 0) -> TokenLogprobs:
        """How likely the model finds each token of one sequence after those before it: the float32
        log-softmax of its logits (no temperature, top_k or top_p), for token_ids[1:] (the first
        has no context). With top > 0, also the `top` most likely tokens at each of those positions,
        most likely first. This is what a completions server's `logprobs` and `echo` report. The
        logits stay on the devices; only these [T - 1] and [T - 1, top] arrays come back. The last
        token is never fed in, so T may be max_seq_len + 1 (as a generation's last token is not)."""
        if isinstance(token_ids, (str, bytes)) or not _is_token_list(token_ids):  # "567" was [5, 6, 7], 5.9 was 5
            raise TypeError(f"token_ids must be a list of int token ids, got {type(token_ids).__name__} "
                            f"{str(token_ids)[:40]!r}")
        ids = self._check_ids(token_ids, "token_ids")
        t = len(ids)
        if not ids:
            raise ValueError("token_ids is empty; it needs at least one token")
        if t - 1 > self.max_seq_len:
            raise ValueError(f"token_ids has {t} tokens; scoring them feeds {t - 1} (the last is not fed in) "
                             f"> the context of {self.max_seq_len} tokens")
        top = check_int("top", top, 0, self.config.vocab_size)
        if t == 1:  # nothing to score
            return TokenLogprobs(np.zeros((0,), np.float32), np.zeros((0, top), np.int32), np.zeros((0, top), np.float32))
        # positions 0..t-2 fed in; position j's logits score token j + 1 (`following`)
        padded = np.full((2, self.dp_rows(1), bucket(t - 1, self.max_seq_len)), PAD_ID, np.int32)
        padded[0, 0, : t - 1], padded[1, 0, : t - 1] = ids[:-1], ids[1:]
        check_same_call("token_logprobs", padded, top)
        fed, following = self.put_rows(padded[0]), self.put_rows(padded[1])
        logits = self._forward(self.params, fed, self.put_rows(np.full((padded.shape[1],), t - 1, np.int32)))
        out = _score_tokens(logits, following, vocab=self.config.vocab_size, top=top)
        chosen, top_ids, top_lp = (to_host(x) if not x.is_fully_addressable else np.asarray(x) for x in out)
        return TokenLogprobs(chosen[0, : t - 1], top_ids[0, : t - 1], top_lp[0, : t - 1])

    # --------------------------------------------------------------- generate
    def stop_token_ids(self, stop) -> tuple[list[int], list[str]]:
        """`stop` (a str, a token id, or a list of both) -> (stop token ids with EOS, stop strings)."""
        # EOS: every id the config (and generation_config.json) names, as HF generate stops on
        # them, and the tokenizer's
        ids, strings = list(self.config.eos_token_ids), []
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        if eos is not None and int(eos) not in ids:
            ids.append(int(eos))
        if stop is None:
            entries = []
        elif isinstance(stop, (str, int, np.integer)):
            entries = [stop]
        elif isinstance(stop, (list, tuple)) or isinstance(stop, np.ndarray) and stop.ndim == 1:
            entries = list(stop)
        else:  # bytes were iterated into token ids, a dict into its keys
            raise TypeError(f"stop={stop!r} must be a str, an int token id, or a list of them; got {type(stop).__name__}")
        for s in entries:
            if isinstance(s, str):
                if not s:
                    raise ValueError("stop contains an empty string")
                strings.append(s)
            elif isinstance(s, (int, np.integer)) and not isinstance(s, bool):  # True is no token id
                ids.extend(self._check_ids([s], "stop"))
            else:
                raise TypeError(f"stop entries must be str or int token ids, got {type(s).__name__} {s!r}")
        check_stop_strings(strings, self.tokenizer is not None)  # generate and Server.submit alike
        return ids, strings

    def generate(self, prompts, *, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop=None) -> list[GenerationOutput]:
        """Generate up to `max_new_tokens` for each prompt (list[str] or list[list[int]]) in one dispatch."""
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, 0)
        validate_sampling(temperature, top_k, top_p)
        drawn = seed is None
        seed = resolve_seed(seed)
        if drawn:
            seed = same_seed(seed)  # over several processes, process 0's draw
        ids = self.encode_prompts(prompts)
        for i, p in enumerate(ids):
            # the last new token is never fed back: it needs no position of its own
            if len(p) > self.max_seq_len:  # max_new_tokens=0 let one token past the context through
                raise ValueError(f"prompts[{i}] has {len(p)} tokens, more than the context of {self.max_seq_len}")
            if len(p) + max_new_tokens - 1 > self.max_seq_len:
                raise ValueError(f"prompts[{i}] has {len(p)} tokens; with max_new_tokens={max_new_tokens} it needs "
                                 f"{len(p) + max_new_tokens - 1} positions (the last new token is not fed back) > "
                                 f"the context of {self.max_seq_len} tokens")
        stop_ids, stop_strings = self.stop_token_ids(stop)
        # SPMD: every process runs this one program over the whole mesh, so all must pass the same
        check_same_call("generate", ids, max_new_tokens, float(temperature), int(top_k), float(top_p), seed,
                        stop_ids, stop_strings)
        if max_new_tokens == 0:
            return [GenerationOutput("" if self.tokenizer else None, [], "length") for _ in ids]

        n = len(ids)
        # padded rows generate nothing (max_new 0); at least min_decode_rows() of them
        b = self.dp_rows(bucket(n, minimum=min_decode_rows() * self.dp))
        t = bucket(max(len(p) for p in ids), self.max_seq_len)
        out_len = bucket(max_new_tokens, minimum=8)
        cache_len = bucket(t + out_len, self.max_seq_len)
        tokens = np.zeros((b, t), np.int32)
        lengths = np.ones((b,), np.int32)
        for i, p in enumerate(ids):
            tokens[i, : len(p)] = p
            lengths[i] = len(p)
        max_new = np.zeros((b,), np.int32)
        max_new[:n] = max_new_tokens
        # the stop ids, padded with -1 (no token) to a bucket: a new count of stop ids compiled anew
        unique = list(dict.fromkeys(stop_ids))
        stop_k = np.full((bucket(len(unique), minimum=8),), -1, np.int32)
        stop_k[: len(unique)] = unique
        seeds = (np.uint32(seed) + np.arange(b, dtype=np.uint32)).astype(np.uint32)
        out, num, stopped = self._generate(
            self.params, self.put_rows(tokens), self.put_rows(lengths), self.put_rows(max_new),
            self._sampling(b, temperature, top_k, top_p), self.put_rows(seeds), self._replicated(stop_k),
            cache_len=cache_len, out_len=out_len)
        out, num, stopped = to_host(out), to_host(num), to_host(stopped)  # gathered over processes
        return [self._finish(out[i, : num[i]].tolist(), bool(stopped[i]), stop_ids, stop_strings) for i in range(n)]

    # Small inputs the step takes whole. One process passes them as they are (uncommitted, as
    # before); over several processes a jnp array would sit on this process's first device only,
    # so they become global arrays replicated over the mesh.
    def _replicated(self, value):
        return self.put_replicated(np.asarray(value)) if is_multiprocess() else jnp.asarray(value)

    def _sampling(self, b: int, temperature, top_k, top_p) -> SamplingParams:
        return jax.tree.map(self._replicated, SamplingParams.make(b, temperature, top_k, top_p))

    def _finish(self, new_ids: list[int], stopped: bool, stop_ids, stop_strings) -> GenerationOutput:
        if self.tokenizer is None:
            return GenerationOutput(None, new_ids, "stop" if stopped else "length")
        body = new_ids[:-1] if stopped and new_ids and new_ids[-1] in stop_ids else new_ids
        text = self.tokenizer.decode(body)
        cut = cut_at_stop_string(body, text, stop_strings, self.tokenizer.decode)
        if cut is not None:
            return GenerationOutput(cut[0], cut[1], "stop")
        return GenerationOutput(text, new_ids, "stop" if stopped else "length")
