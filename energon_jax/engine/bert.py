"""Bert models as users see them: `encode` (packed, padding-free) and masked-LM `logits`.

A call tokenizes, packs the sequences into length-sorted chunks of at most
`max_tokens_per_chunk` tokens (engine/packing.py), and runs one compiled step per chunk.
Steps are compiled per (token bucket, sequence bucket, max-length bucket, head), so a few
programs serve every batch; `compile_counts["bert"]` counts them and `last_stats` says how
many real and computed (bucket-padded) tokens the last call had. A `fixed_shapes` view (what
the Server encodes through) has one program per (token bucket, head), all compiled by `warmup`.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from energon_jax.convert import bert as bert_convert
from energon_jax.convert.hf_files import TensorSource, check_floating_weights, checkpoint_dtype
from energon_jax.engine.base import ShardedModel, token_matrix
from energon_jax.engine.packing import (MIN_SEQ_BUCKET, PackedChunk, check_sequences, pack_chunk, pack_microbatches,
                                        plan_chunks, token_buckets)
from energon_jax.engine.pipeline import pipelined_microbatches
from energon_jax.engine.steps import CompileCounter, bucket, compile_concurrently
from energon_jax.loading import check_max_seq_len, pad_rows, place_params, stack_layers
from energon_jax.runtime.checks import check_bool, check_int
from energon_jax.runtime.distributed import check_same_call, is_multiprocess, to_host
from energon_jax.runtime.mesh import check_layout
from energon_jax.runtime.sharding import table_multiple
from energon_jax.models.bert import ATTENTION_IMPLS, Bert, BertConfig, BertLayerStack, PackedAttention, segment_window
from energon_jax.tokenizer import Tokenizer

POOLINGS = ("mean", "cls", "pooler", "none")
# Token budget of one packed step. With the fused varlen kernel (GPUs): bert-base on an H100,
# 1,024 sequences U[16, 512] (benchmarks/encode.py, session 5): 16k 6,091 seq/s, 32k 6,535, 64k
# 6,663; bigger steps keep the GEMMs busier and dispatch less, and 64k tokens of bert-base
# activations are ~0.5 GB at the widest. XLA's segment-masked attention materialises scores per
# window (~3.6 GB fp32 per layer for bert-base at 64k), so it keeps 16k.
DEFAULT_MAX_TOKENS = 16384
DEFAULT_MAX_TOKENS_FUSED = 65536


def _off_gpu(attention_impl: str) -> bool:
    """Whether attention runs as XLA (no Triton kernel): "xla", or "auto" away from a CUDA GPU."""
    from energon_jax.kernels._dispatch import resolve_impl

    return resolve_impl(attention_impl) == "xla"


def default_max_tokens(attention_impl: str) -> int:
    """The token budget of one packed step when not given (see DEFAULT_MAX_TOKENS_FUSED)."""
    return DEFAULT_MAX_TOKENS if _off_gpu(attention_impl) else DEFAULT_MAX_TOKENS_FUSED
_HEADS = POOLINGS + ("mlm",)


@dataclasses.dataclass(frozen=True)
class EncodeStats:
    """Work done by one `encode` / `logits` call."""

    sequences: int
    real_tokens: int  # tokens of the inputs
    computed_tokens: int  # tokens the dense layers ran on: real + each chunk's bucket padding
    chunks: int
    shapes: tuple[tuple[int, int, int], ...]  # (token bucket, sequence bucket, max-length bucket) per chunk

    @property
    def padding_tokens(self) -> int:
        return self.computed_tokens - self.real_tokens


def _apply_head(module: Bert, variables, x_te, segments_t, cu_seqlens_s, head: str):
    """Last hidden states of one packed stream [T, E] -> the result `head` asks for, float32."""
    if head == "none":
        return x_te.astype(jnp.float32)
    if head == "cls":
        return jnp.take(x_te, cu_seqlens_s[:-1], axis=0, mode="clip").astype(jnp.float32)
    if head == "pooler":
        return module.apply(variables, x_te, cu_seqlens_s, method=Bert.pool)
    if head == "mlm":
        return module.apply(variables, x_te, method=Bert.mlm_logits)
    # mean over each sequence's real tokens (padding has segment -1, in no row of the one-hot):
    # a [S, T] one-hot matmul (tensor cores, float32 accumulation) rather than a scatter-add
    num_s = cu_seqlens_s.shape[0] - 1
    onehot_st = (segments_t[None, :] == jnp.arange(num_s)[:, None]).astype(x_te.dtype)
    sum_se = jnp.einsum("ST,TE->SE", onehot_st, x_te, preferred_element_type=jnp.float32)
    count_s = jnp.maximum(jnp.diff(cu_seqlens_s), 1).astype(jnp.float32)
    return sum_se / count_s[:, None]


@dataclasses.dataclass(frozen=True)
class ReplicaAttention:
    """The varlen kernel (`attention`: impl "auto" | "triton", no mesh) on each data replica's own
    stream, inside the step's vmap over the replicas' streams (`make_bert_step`).

    jax-triton's call has no batching rule, and the kernel's own shard_map (heads over "tensor",
    the stream whole) would gather every replica's stream onto every device under vmap. So the
    vmapped call is caught (`jax.custom_batching.custom_vmap`) and runs the kernel once per device
    on its replica's stream and its heads: a shard_map over "data" (streams) and "tensor" (heads).
    """

    attention: PackedAttention
    mesh: Any

    def __call__(self, q_tnd, k_tnd, v_tnd, segments_t, cu_seqlens_s, scale: float):
        @jax.custom_batching.custom_vmap
        def attend(q, k, v, seg, cu):  # one stream, not vmapped: the kernel's own shard_map
            return dataclasses.replace(self.attention, mesh=self.mesh)(q, k, v, seg, cu, scale)

        @attend.def_vmap
        def attend_streams(num_streams, batched, *args):
            if num_streams != self.mesh.shape["data"]:
                raise ValueError(f"{num_streams} streams for {self.mesh.shape['data']} data replicas; expected one each")
            args = [x if b else jnp.broadcast_to(x, (num_streams,) + x.shape) for x, b in zip(args, batched)]
            heads = P("data", None, "tensor", None)  # [D, T, N, Dh]: each device one stream, its heads

            def one_stream(q, k, v, seg, cu):  # [1, T, N / tp, Dh], ..., [1, S + 1]
                return self.attention(q[0], k[0], v[0], seg[0], cu[0], scale)[None]

            out = jax.shard_map(one_stream, mesh=self.mesh, in_specs=(heads, heads, heads, P("data"), P("data")),
                                out_specs=heads, check_vma=False)(*args)
            return out, True

        return attend(q_tnd, k_tnd, v_tnd, segments_t, cu_seqlens_s)


def make_bert_step(config: BertConfig, param_dtype, counter: CompileCounter, mesh=None):
    """step(params, tokens_t, positions_t, types_t, segments_t, cu_seqlens_s, attention=, head=).

    head: "mean" | "cls" | "pooler" -> [S, E]; "none" -> [T, E]; "mlm" -> [T, vocab]; all float32.
    With pipeline stages (mesh "stage" > 1) every input carries a leading microbatch axis M
    (M packed streams of one shape, `pack_microbatches`), the encoder runs as a pipeline over
    "stage" (engine/pipeline.py) and each result gains the same leading M.
    With data replicas (mesh "data" = D > 1) every input carries a leading axis D before that,
    split over "data", and the step is vmapped over it: replica r encodes only its streams [r]
    (GSPMD keeps the vmapped axis on "data", as the inputs come; the varlen kernel, which cannot
    be vmapped, runs per replica through `ReplicaAttention`), and each result gains the same D.
    """
    num_stages = 1 if mesh is None else mesh.shape["stage"]
    num_replicas = 1 if mesh is None else mesh.shape["data"]
    multiple = 1 if mesh is None else table_multiple(mesh)

    def encode_stream(params, tokens_t, positions_t, types_t, segments_t, cu_seqlens_s, attention, head):
        module = Bert(config, param_dtype, attention, multiple)
        variables = {"params": params}
        x_te = module.apply(variables, tokens_t, positions_t, types_t, segments_t, cu_seqlens_s)
        return _apply_head(module, variables, x_te, segments_t, cu_seqlens_s, head)

    def encode_microbatches(params, tokens_mt, positions_mt, types_mt, segments_mt, cu_seqlens_ms, attention, head):
        module = Bert(config, param_dtype, attention, multiple)
        variables = {"params": params}
        stage = BertLayerStack(config, config.num_hidden_layers // num_stages, param_dtype, attention)

        def stage_fn(stage_params, x_te, aux):
            return stage.apply({"params": stage_params}, x_te, *aux)

        embed = lambda t, p, ty: module.apply(variables, t, p, ty, method=Bert.embed)  # noqa: E731
        x_mte = jax.vmap(embed)(tokens_mt, positions_mt, types_mt)
        x_mte = pipelined_microbatches(stage_fn, mesh)(params["encoder"], x_mte, (segments_mt, cu_seqlens_ms))
        return jax.vmap(lambda x, seg, cu: _apply_head(module, variables, x, seg, cu, head))(
            x_mte, segments_mt, cu_seqlens_ms)

    encode = encode_microbatches if num_stages > 1 else encode_stream

    @functools.partial(jax.jit, static_argnames=("attention", "head"))
    def step(params, *streams, attention: PackedAttention, head: str):
        counter["bert"] += 1
        fn = functools.partial(encode, attention=attention, head=head)
        if num_replicas > 1:
            fn = jax.vmap(fn, in_axes=(None,) + (0,) * len(streams))
        return fn(params, *streams)

    return step


@functools.lru_cache(maxsize=16)
def _compiled_step(config: BertConfig, dtype, mesh, attention_impl: str):
    """One jitted step and its CompileCounter per (config, dtype, mesh, impl), as GPT's steps
    (engine/gpt._compiled_steps): models loaded twice share their compiled programs, and so their
    `compile_counts`. The step closes over nothing else: params are its argument (the cache keeps
    no model's weights alive), and the attention (impl, max length, a `fixed_shapes` view's choice)
    and pooling are static arguments, part of each program's own jit key. The dict holds the
    programs `BertModel.warmup` compiled, shared the same way: {(input shapes, attention, head): program}."""
    counter = CompileCounter()
    return counter, make_bert_step(config, dtype, counter, mesh), {}


def _as_token_array(x) -> np.ndarray | None:
    """x as a 1-D integer array if it is a sequence of ints (list, tuple or array), else None.

    One numpy conversion per sequence rather than a Python check per token: host time matters
    when a call carries hundreds of thousands of tokens.
    """
    if not isinstance(x, (list, tuple, np.ndarray)):
        return None
    try:
        arr = np.asarray(x)
    except ValueError:  # ragged nesting
        return None
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        return None
    return arr


def _is_pair(x) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(s, str) for s in x)


def check_input_batch(inputs, name: str) -> None:
    """A TypeError naming `name` unless `inputs` is a batch (a str, or a flat token-id list, is one
    input: taken as a batch it would embed each character or id on its own)."""
    if isinstance(inputs, (str, bytes)) or (
            isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], (int, np.integer))):
        raise TypeError(f"{name} must be a list of str, (str, str) pairs or token-id lists, got "
                        f"{type(inputs).__name__} {str(inputs)[:40]!r}; wrap a single input in a list")


class BertModel(ShardedModel):
    """A loaded Bert: `encode(texts_or_ids, pooling=..., normalize=...)` and, for masked-LM
    checkpoints, `logits(token_ids)`.

    attention_impl: "xla" (segment-masked attention), "auto" or "triton" (the fused varlen
    kernel of `energon_jax.kernels`). max_tokens_per_chunk: token budget of one packed step over
    the whole mesh (default: `default_max_tokens` per data replica). A step's chunk is dealt into
    `num_streams` packed streams of one shape: one per data replica (mesh "data"), each split
    again into one microbatch per pipeline stage; each replica encodes only its own streams.
    """

    def __init__(self, config: BertConfig, params, mesh, tokenizer, *, max_seq_len: int, source: str = "",
                 attention_impl: str = "auto", max_tokens_per_chunk: int | None = None):
        super().__init__(config, params, mesh, tokenizer, max_seq_len=max_seq_len, source=source)
        check_layout(mesh, layers=config.num_hidden_layers)  # the loaders check before loading; this guards direct use
        self.num_stages = mesh.shape["stage"]
        self.num_replicas = mesh.shape["data"]
        self._budget_given = False  # until given, the budget follows the attention (its setter)
        self.attention_impl = attention_impl
        if max_tokens_per_chunk is not None:
            self.max_tokens_per_chunk = max_tokens_per_chunk
        self.last_stats: EncodeStats | None = None
        self._seq_slots: int | None = None  # None: each chunk's own bucket; see fixed_shapes

    @property
    def attention_impl(self) -> str:
        return self._attention_impl

    @attention_impl.setter
    def attention_impl(self, impl: str):
        """The attention ("auto" | "triton" | "xla"). Steps are compiled per impl, as GPT's: setting it
        takes that impl's step (and its `compile_counts`); a `fixed_shapes` view made before keeps its own."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={impl!r} is not supported; accepted: {ATTENTION_IMPLS}")
        self.compile_counts, self._step, self._programs = _compiled_step(self.config, self.dtype, self.mesh, impl)
        self._attention_impl = impl
        if not self._budget_given:
            # the default is a budget per data replica: each replica's stream keeps the size tuned for
            # one device; it follows the impl (a switch to "xla" on a GPU kept the fused kernel's 4x budget)
            self._max_tokens = self.num_replicas * max(default_max_tokens(impl), bucket(self.max_seq_len))

    @property
    def max_tokens_per_chunk(self) -> int:
        return self._max_tokens

    @max_tokens_per_chunk.setter
    def max_tokens_per_chunk(self, n: int):
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < self.max_seq_len:
            raise ValueError(f"max_tokens_per_chunk={n!r} must be an int >= max_seq_len={self.max_seq_len} "
                             "(one sequence must fit in a chunk)")
        self._max_tokens = int(n)
        self._budget_given = True

    # ----------------------------------------------------------------- shapes
    def fixed_shapes(self, max_seqs: int) -> "BertModel":
        """A view of this model (the same params and compiled steps) with a bounded set of programs:
        its chunks hold at most `max_seqs` sequences (rounded up to a power of two, `seq_slots`), in
        exactly that many slots, and attention is bounded by the stream's length (capped at
        max_seq_len) instead of the bucket of its longest sequence. That leaves one program per
        (token bucket, pooling), which `warmup` compiles. The looser bound only adds programs past
        each sequence's end (which return at once) to the varlen kernel's grid; off GPUs the view
        takes the cheaper XLA attention for it (`_attention`). The Server encodes through one
        (max_seqs: its max_batch_size), so nothing compiles once /health says 200. This model's own
        `encode` is unchanged."""
        view = copy.copy(self)
        view._seq_slots = bucket(check_int("max_seqs", max_seqs, 1), minimum=MIN_SEQ_BUCKET)
        view.last_stats = None
        return view

    @property
    def seq_slots(self) -> int | None:
        """Sequence slots of every chunk in a `fixed_shapes` view; None: each chunk's own bucket."""
        return self._seq_slots

    def token_buckets(self) -> list[int]:
        """The stream lengths a chunk of a `fixed_shapes` view can have, ascending."""
        if self.seq_slots is None:
            raise ValueError("only a fixed_shapes() view has a bounded set of chunk shapes; "
                             "use model.fixed_shapes(max_seqs)")
        most = min(self.max_tokens_per_chunk, self.seq_slots * self.max_seq_len)
        return token_buckets(most, cap=self.max_tokens_per_chunk)

    def warmup(self, poolings: Sequence[str] | None = None, workers: int | None = None) -> None:
        """Compile every program `encode` can run on this `fixed_shapes` view: one per token bucket
        and pooling (default: every pooling this checkpoint has), on streams of padding only, on
        `workers` threads (steps.compile_concurrently; None: its default, 8 on a GPU, 1 on CPU),
        then run each once. Later dispatches of those shapes, from any view or load of this model,
        go through these programs.

        bert-base's 42 programs took 91.1 s one after another on an H200 and 65.5 s on 8 threads
        (benchmarks/warmup.py, BENCHMARKS.md Serving, session 20). Session 18 had measured 121.8 s
        on 8 threads, before each program was lowered in the calling thread (063a8b0), and had made
        one thread the default."""
        poolings = poolings or [p for p in POOLINGS if p != "pooler" or self.config.has_pooler]
        pads = [[pack_chunk(np.zeros(0, np.int64), [], [], max_tokens=self.max_tokens_per_chunk, num_tokens=t,
                            num_seq_slots=self.seq_slots)] * self.num_streams for t in self.token_buckets()]
        lowerings = {}
        for parts in pads:
            arrays, attention, _ = self._step_inputs(parts)
            for pooling in poolings:
                key = self._program_key(arrays, attention, pooling)
                if key not in self._programs:
                    lowerings[key] = functools.partial(self._step.lower, self.params, *arrays, attention=attention,
                                                       head=pooling)
        self._programs.update(compile_concurrently(lowerings, workers)[0])
        for parts in pads:
            for pooling in poolings:
                jax.block_until_ready(self._dispatch(parts, pooling)[0])

    # ----------------------------------------------------------------- inputs
    def _check_ids(self, ids: np.ndarray, where: str) -> np.ndarray:
        bad = (ids < 0) | (ids >= self.config.vocab_size)
        if bad.any():
            raise ValueError(f"{where}: token id {int(ids[bad][0])} outside the vocabulary [0, {self.config.vocab_size})")
        return ids.astype(np.int32)

    def _tokenize_text(self, i: int, a: str, b: str | None, truncate: bool) -> tuple[np.ndarray, np.ndarray]:
        for part in (a, b):
            if part is not None and not part.strip():
                raise ValueError(f"texts[{i}] is empty ({part!r}); each text needs at least one non-space character")
        tok = self._require_tokenizer(f"texts[{i}]={a[:30]!r}")
        ids, types = tok.encode_with_types(a, b)
        if len(ids) > self.max_seq_len and truncate:
            # HF truncation keeps [CLS]/[SEP] and trims the longer text of a pair first
            ids, types = tok.encode_with_types(a, b, max_length=self.max_seq_len)
            if len(ids) > self.max_seq_len:  # the tokenizer cannot cut below the special tokens
                raise ValueError(f"texts_or_ids[{i}] cannot be truncated to max_seq_len={self.max_seq_len}: a "
                                 f"{'pair' if b is not None else 'text'} needs more tokens than that for its special "
                                 f"tokens ([CLS], [SEP]) alone (it kept {len(ids)}); load with a larger max_seq_len")
        return np.asarray(ids, np.int32), np.asarray(types, np.int32)

    def tokenize(self, texts_or_ids, *, truncate: bool = False) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        """Inputs -> (token ids, token types) per sequence (int arrays; types None = all 0),
        validated against the model's limits.

        Items: str (special tokens added), (a, b) str pairs (token types 0 / 1), or token-id
        lists (used as given, token type 0). Sequences longer than `max_seq_len` raise unless
        `truncate=True` (token-id lists are then cut to `max_seq_len`).
        """
        truncate = check_bool("truncate", truncate)
        check_input_batch(texts_or_ids, "texts_or_ids")
        items = list(texts_or_ids)
        if not items:
            raise ValueError("texts_or_ids is empty; pass at least one text or token-id list")
        all_ids, all_types = [], []
        for i, item in enumerate(items):
            if isinstance(item, str):
                ids, types = self._tokenize_text(i, item, None, truncate)
            elif _is_pair(item):
                ids, types = self._tokenize_text(i, item[0], item[1], truncate)
            elif (arr := _as_token_array(item)) is not None:
                if not arr.size:
                    raise ValueError(f"texts_or_ids[{i}] is an empty token list; a sequence needs at least one token")
                ids, types = (arr[: self.max_seq_len] if truncate else arr), None
            elif isinstance(item, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
                # ints past int64 (numpy made an object array of them): out of any vocabulary, not of the wrong type
                raise ValueError(f"texts_or_ids[{i}]: token id {max(item, key=abs)} outside the vocabulary "
                                 f"[0, {self.config.vocab_size})")
            else:
                raise TypeError(f"texts_or_ids[{i}] is {type(item).__name__} {str(item)[:40]!r}; expected str, "
                                "a (str, str) pair or a list of int token ids")
            if len(ids) > self.max_seq_len:
                limit = ("the model's positions" if self.max_seq_len == self.config.max_seq_len else
                         f"of the model's {self.config.max_seq_len} positions; load with a larger max_seq_len")
                raise ValueError(f"texts_or_ids[{i}] has {len(ids)} tokens, more than max_seq_len={self.max_seq_len}"
                                 f" ({limit}); pass truncate=True to cut it")
            if types is not None and types.max() >= self.config.type_vocab_size:
                raise ValueError(f"texts_or_ids[{i}] uses token type {types.max()} but this model has "
                                 f"type_vocab_size={self.config.type_vocab_size} (sentence pairs need 2)")
            all_ids.append(ids)
            all_types.append(types)
        flat = np.concatenate(all_ids)  # one vocabulary check for the whole call
        if flat.min() < 0 or flat.max() >= self.config.vocab_size:
            for i, ids in enumerate(all_ids):
                self._check_ids(ids, f"texts_or_ids[{i}]")
        return all_ids, all_types

    # ----------------------------------------------------------------- running
    def _attention(self, max_len: int, tokens: int, slots: int) -> "PackedAttention | ReplicaAttention":
        if self.num_stages == 1:
            impl = self.attention_impl
            if self._seq_slots is not None and impl == "auto" and _off_gpu(impl) and (
                    tokens * segment_window(tokens, max_len) < slots * max_len * max_len):
                # A view's max_len is loose (the stream's length): the kernel's XLA reference gathers
                # [slots, max_len] and scores slots x max_len^2 keys; the segment mask scores fewer here
                # (MiniLM on CPU, 16 short sentences: 114 ms against 990 ms).
                impl = "xla"
            if self.num_replicas > 1 and impl != "xla":
                return ReplicaAttention(PackedAttention(max_len, impl), self.mesh)
            return PackedAttention(max_len, impl, self.mesh if self.mesh.size > 1 else None)
        # Inside pipeline stages the kernels' own shard_map cannot nest: attention runs as XLA there.
        if self.attention_impl == "triton":
            raise ValueError("attention_impl='triton' does not run inside pipeline stages (pp > 1); use 'xla' or 'auto'")
        return PackedAttention(max_len, "xla")

    @property
    def num_streams(self) -> int:
        """Packed streams per step: one per (data replica, pipeline microbatch)."""
        return self.num_replicas * self.num_stages

    def _pack(self, rows, ids, types) -> list[PackedChunk]:
        """One dispatch's packed streams, replica-major: stream r * num_stages + m is replica r's microbatch m."""
        if self.num_streams == 1:
            return [pack_chunk(rows, ids, types, max_tokens=self.max_tokens_per_chunk, num_seq_slots=self.seq_slots)]
        return pack_microbatches(rows, ids, types, self.num_streams, max_tokens=self.max_tokens_per_chunk,
                                 num_seq_slots=self.seq_slots)

    def _stream_axes(self) -> tuple[int, ...]:
        """The step's leading stream axes: (D,) with data replicas, then (M,) with pipeline stages."""
        return tuple(n for n in (self.num_replicas, self.num_stages) if n > 1)

    def _step_inputs(self, parts: list[PackedChunk]) -> tuple[list, "PackedAttention | ReplicaAttention", int]:
        """One dispatch's packed streams as the step takes them: (stream arrays, attention, max-length
        bound). With data replicas the arrays are already on the devices, each replica's streams on
        its own devices only (split over "data")."""
        if self.seq_slots is None:
            max_len = bucket(max(max(c.max_len for c in parts), 1), cap=self.max_seq_len)
        else:  # the stream's length bounds every sequence in it: one program per token bucket
            max_len = min(parts[0].computed_tokens, self.max_seq_len)
        arrays = [(c.tokens, c.positions, c.token_types, c.segments, c.cu_seqlens) for c in parts]
        lead = self._stream_axes()
        arrays = [np.stack(column).reshape(lead + column[0].shape) for column in zip(*arrays)] if lead else arrays[0]
        if self.num_replicas > 1:
            arrays = [self.put_rows(a) for a in arrays]
        elif is_multiprocess():  # numpy inputs must be global arrays over several processes
            arrays = [self.put_replicated(a) for a in arrays]
        attention = self._attention(max_len, parts[0].computed_tokens, len(parts[0].cu_seqlens) - 1)
        return arrays, attention, max_len

    def _dispatch(self, parts: list[PackedChunk], head: str):
        """Start one dispatch's packed streams through the step: (its result, its shape for EncodeStats)."""
        arrays, attention, max_len = self._step_inputs(parts)
        compiled = self._programs.get(self._program_key(arrays, attention, head))
        if compiled is not None:
            out = compiled(self.params, *arrays)
        else:
            out = self._step(self.params, *arrays, attention=attention, head=head)
        return out, (parts[0].computed_tokens * len(parts), len(parts[0].cu_seqlens) - 1, max_len)

    def _program_key(self, arrays, attention, head: str) -> tuple:
        """What a step's program was compiled for: the params' shapes, dtypes and shardings (every
        load of a model shares the programs, but a model built or placed otherwise must not call
        them: a Compiled refuses other shardings), its inputs' shapes and dtypes and its static
        arguments. The params' part is computed once per params object."""
        if getattr(self, "_params_key_of", None) is not self.params:
            self._params_key = tuple((x.shape, str(x.dtype), x.sharding) for x in jax.tree.leaves(self.params))
            self._params_key_of = self.params
        return self._params_key, tuple((a.shape, str(a.dtype)) for a in arrays), attention, head

    def _run(self, ids, types, head: str) -> list[tuple[PackedChunk, np.ndarray]]:
        """Run every packed chunk through the step: (packed stream, its result) pairs.

        Chunks are packed one at a time and results fetched one chunk behind the dispatch, so
        host work overlaps the device's. With data replicas or pipeline stages a chunk is dealt
        into `num_streams` packed streams (`_pack`), which the step takes stacked.
        """
        check_sequences(ids, types)
        # SPMD: every process runs the same steps over the whole mesh, so all must pass the same
        check_same_call("logits" if head == "mlm" else "encode", ids, types, head)
        streams, results, pending, shapes = [], [], None, []

        def fetch(done):
            parts, out = done
            out = to_host(out)  # gathered over processes
            results.extend(zip(parts, out.reshape((len(parts),) + out.shape[len(self._stream_axes()):])))

        for rows in plan_chunks([len(x) for x in ids], self.max_tokens_per_chunk, self.seq_slots):
            parts = self._pack(rows, ids, types)
            streams.extend(parts)
            out, shape = self._dispatch(parts, head)
            shapes.append(shape)
            if pending is not None:  # the device works on `out` while the host copies the previous chunk
                fetch(pending)
            pending = (parts, out)
        fetch(pending)
        self.last_stats = EncodeStats(
            sequences=len(ids), real_tokens=sum(c.real_tokens for c in streams),
            computed_tokens=sum(c.computed_tokens for c in streams), chunks=len(shapes), shapes=tuple(shapes))
        return results

    def encode(self, texts_or_ids, *, pooling: str = "mean", normalize: bool = False, truncate: bool = False):
        """Embed each input: np.ndarray [B, hidden] float32, or for pooling="none" a list of
        [T_i, hidden] arrays (last hidden states).

        texts_or_ids: list of str, (str, str) sentence pairs, or token-id lists.
        pooling: "mean" (over each sequence's real tokens, as sentence-transformers does),
        "cls" (first token's hidden state), "pooler" (HF pooler_output: tanh(dense(CLS)),
        checkpoints with a pooler only) or "none".
        normalize: L2-normalise each embedding (each token vector for pooling="none").
        truncate: cut inputs longer than max_seq_len instead of raising.
        Sequences are packed without padding; the result equals encoding each alone.
        """
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not supported; accepted: {POOLINGS}")
        normalize = check_bool("normalize", normalize)
        if pooling == "pooler" and not self.config.has_pooler:
            raise ValueError("pooling='pooler' needs a checkpoint with a pooler (pooler.dense.*); this one has none")
        ids, types = self.tokenize(texts_or_ids, truncate=truncate)
        results = self._run(ids, types, pooling)
        if pooling == "none":
            out = [None] * len(ids)
            for chunk, x_te in results:
                for j, row in enumerate(chunk.rows):
                    out[row] = _l2(x_te[chunk.cu_seqlens[j]: chunk.cu_seqlens[j + 1]], normalize)
            return out
        emb = np.empty((len(ids), self.config.hidden_size), np.float32)
        for chunk, x_se in results:
            emb[chunk.rows] = x_se[: chunk.num_seqs]
        return _l2(emb, normalize)

    def logits(self, token_ids) -> np.ndarray:
        """Masked-LM logits: [B, T] int token ids -> float32 [B, T, vocab] (rows are separate sequences)."""
        if not self.config.has_mlm_head:
            raise ValueError(f"logits() needs a masked-LM head (cls.predictions.*), which {self.source or 'this model'}"
                             " does not have; use encode()")
        arr = token_matrix(token_ids)
        b, t = arr.shape
        if t > self.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds max_seq_len={self.max_seq_len}")
        ids = list(self._check_ids(arr, "token_ids"))
        out = np.empty((b, t, self.config.vocab_size), np.float32)
        for chunk, logits_tv in self._run(ids, [None] * b, "mlm"):
            for j, row in enumerate(chunk.rows):
                out[row] = logits_tv[chunk.cu_seqlens[j]: chunk.cu_seqlens[j + 1]]
        return out


def _l2(x: np.ndarray, normalize: bool) -> np.ndarray:
    if not normalize:
        return x
    # as torch.nn.functional.normalize (what sentence-transformers uses): x / max(||x||, 1e-12)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def example_args(num_tokens: int = 1):
    """Abstract-free example inputs for `Bert.init` (parameter shapes do not depend on them)."""
    z = jnp.zeros((num_tokens,), jnp.int32)
    return z, z, z, z, jnp.array([0, num_tokens], jnp.int32)


def load_bert(folder, hf_config: dict, mesh, dtype, max_seq_len):
    """HF Bert folder (BertModel or BertFor*) -> BertModel with params placed on `mesh`.

    max_seq_len None: a sentence-transformers folder's sentence_bert_config.json max_seq_length (the
    length it truncates to; capped at the positions), else max_position_embeddings.
    """
    source = TensorSource(folder)
    cfg = bert_convert.config_from_hf(hf_config, source.keys(), Path(folder) / "config.json")
    default = bert_convert.default_max_seq_len(folder, cfg)  # checks the file even when max_seq_len is given
    max_seq_len = check_max_seq_len(default if max_seq_len is None else max_seq_len, cfg.max_position_embeddings)
    check_layout(mesh, heads=cfg.num_attention_heads, mlp=cfg.intermediate_size, layers=cfg.num_hidden_layers)
    # before any tensor is read: query / key / value are fused by np.stack, which would turn one
    # int8 (quantized) matrix into float32 ahead of place_params' check
    check_floating_weights(source, bert_convert.mapped_names(source.keys(), cfg))
    host = stack_layers(bert_convert.iter_params(source, cfg), cfg.num_hidden_layers)
    multiple = table_multiple(mesh)
    for name in ("word_embeddings", "position_embeddings"):
        host[name] = pad_rows(host[name], multiple)
    if cfg.has_mlm_head:
        host["mlm"]["bias"] = pad_rows(host["mlm"]["bias"], multiple)
    dtype = dtype or jnp.dtype(checkpoint_dtype(hf_config, source, bert_convert.mapped_names(source.keys(), cfg)).name)
    params = place_params(host, Bert(cfg, dtype, table_multiple=multiple), example_args(), mesh, dtype)
    tokenizer = Tokenizer.from_folder(folder, lower_case=bert_convert.sentence_lower_case(folder))
    return BertModel(cfg, params, mesh, tokenizer, max_seq_len=max_seq_len, source=str(folder))
