"""Padding-free batches for encoders: sequences packed back to back into one token stream.

Energon's "redundant computation elimination": rather than padding B sequences to the
longest, their tokens are concatenated into a [T] stream that is padded only up to a bucket
of total tokens (few compiled shapes, `token_bucket`). Sequence i holds tokens [cu_seqlens[i], cu_seqlens[i+1]);
per-token `segments` (sequence index, -1 on the bucket's padding) and `positions` (restarting
at 0 for each sequence) let the model keep attention inside each sequence.

Large batches are split into chunks of at most `max_tokens` tokens, after sorting by length
so that each chunk holds sequences of similar length (a tight static `max_len` bound for
attention, and similar shapes from call to call).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from energon_jax.engine.steps import bucket

MIN_SEQ_BUCKET = 8
FINE_TOKEN_BUCKETS_FROM = 4096  # streams longer than this round up to an eighth of their power of two


def token_bucket(n: int, cap: int | None = None, minimum: int = 16) -> int:
    """The stream length for n tokens: a power of two up to FINE_TOKEN_BUCKETS_FROM, above it the
    next multiple of an eighth of n's power of two (4 lengths per octave), clipped to `cap`.

    Powers of two alone waste up to half of a large stream: a 1,024-sequence Bert batch in 32k
    chunks ends with a chunk of ~18k tokens, which a power of two pads to 32k (6% of all the
    tokens computed); an eighth step pads it to 20k (1.7%). Each length is compiled once.
    """
    b = bucket(n, minimum=minimum)
    if b > FINE_TOKEN_BUCKETS_FROM:
        step = b // 8
        b = max(minimum, -(-n // step) * step)
    return min(b, cap) if cap is not None else b


def token_buckets(most: int, cap: int | None = None, minimum: int = 16) -> list[int]:
    """Every stream length `token_bucket` gives for 1 to `most` tokens, ascending: the token
    buckets a warm-up compiles."""
    out, n = [], 1
    while n <= most:
        out.append(token_bucket(n, cap, minimum))
        n = out[-1] + 1
    return out


@dataclasses.dataclass(frozen=True)
class PackedChunk:
    """One packed stream; arrays are host numpy, int32."""

    rows: np.ndarray  # [S] index of each packed sequence in the caller's list
    tokens: np.ndarray  # [T] token ids (0 on padding)
    positions: np.ndarray  # [T] position within its sequence
    token_types: np.ndarray  # [T]
    segments: np.ndarray  # [T] sequence index within the chunk, -1 on padding
    cu_seqlens: np.ndarray  # [S_bucket + 1]; slots past S repeat the real token count (empty sequences)
    max_len: int  # longest sequence in the chunk

    @property
    def num_seqs(self) -> int:
        return len(self.rows)

    @property
    def real_tokens(self) -> int:
        return int(self.cu_seqlens[self.num_seqs])

    @property
    def computed_tokens(self) -> int:
        return len(self.tokens)

    def lengths(self) -> np.ndarray:
        return np.diff(self.cu_seqlens[: self.num_seqs + 1])


def plan_chunks(lengths: Sequence[int], max_tokens: int, max_seqs: int | None = None) -> list[np.ndarray]:
    """Group sequence indices into chunks of <= max_tokens tokens (and <= max_seqs sequences),
    shortest sequences first."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > max_tokens:
        raise ValueError(f"a sequence of {int(lengths.max())} tokens exceeds the chunk budget max_tokens={max_tokens}")
    order = np.argsort(lengths, kind="stable")
    chunks, start, used = [], 0, 0
    for k, i in enumerate(order):
        if used + lengths[i] > max_tokens or k - start == max_seqs:
            chunks.append(order[start:k])
            start, used = k, 0
        used += lengths[i]
    if start < len(order):
        chunks.append(order[start:])
    return chunks


def pack_chunk(rows: np.ndarray, ids: Sequence[Sequence[int]], types: Sequence[Sequence[int] | None],
               *, max_tokens: int, min_bucket: int = 16, num_tokens: int | None = None,
               num_seq_slots: int | None = None) -> PackedChunk:
    """Pack sequences ids[r] (with token types types[r], None = all 0) for r in rows into one
    bucketed stream. num_tokens / num_seq_slots force the stream length and the number of
    sequence slots (rather than their buckets), so that several streams can share one shape;
    `rows` may then be empty (a stream of padding only)."""
    lens = np.array([len(ids[r]) for r in rows], dtype=np.int64)
    total = int(lens.sum())
    t = num_tokens if num_tokens is not None else token_bucket(total, cap=max_tokens, minimum=min_bucket)
    s = len(rows)
    slots = num_seq_slots if num_seq_slots is not None else bucket(s, minimum=MIN_SEQ_BUCKET)
    if total > t or s > slots:
        raise ValueError(f"{s} sequences of {total} tokens do not fit a stream of {t} tokens and {slots} sequence slots")
    cu = np.full(slots + 1, total, dtype=np.int32)
    cu[: s + 1] = np.concatenate([[0], np.cumsum(lens)])
    tokens = np.zeros(t, np.int32)
    token_types = np.zeros(t, np.int32)
    positions = np.zeros(t, np.int32)
    segments = np.full(t, -1, np.int32)
    if not s:
        return PackedChunk(np.asarray(rows, np.int64), tokens, positions, token_types, segments, cu, 0)
    tokens[:total] = np.concatenate([np.asarray(ids[r]) for r in rows])
    if any(types[r] is not None for r in rows):
        token_types[:total] = np.concatenate([np.zeros(n, np.int32) if types[r] is None else np.asarray(types[r])
                                              for r, n in zip(rows, lens)])
    segments[:total] = np.repeat(np.arange(s, dtype=np.int32), lens)
    positions[:total] = np.arange(total, dtype=np.int32) - np.repeat(cu[:s], lens)
    return PackedChunk(np.asarray(rows), tokens, positions, token_types, segments, cu, int(lens.max()))


def pack_microbatches(rows: np.ndarray, ids: Sequence[Sequence[int]], types: Sequence[Sequence[int] | None],
                      num_microbatches: int, *, max_tokens: int, min_bucket: int = 16,
                      num_seq_slots: int | None = None) -> list[PackedChunk]:
    """Split one chunk's sequences into `num_microbatches` packed streams of one shape: the
    pipeline's microbatches (moved stage to stage), the data replicas' shares, or both (replica r's
    microbatch m is stream r * stages + m; `BertModel._pack`).

    Rows (sorted by length, as `plan_chunks` gives them) are dealt round-robin, so the streams
    get similar token counts and similar lengths; each stream is padded to the bucket of the
    fullest one (and has `num_seq_slots` sequence slots if given, else the bucket of the most
    sequences a stream holds). Streams may be padding only when there are fewer sequences than
    microbatches.
    """
    groups = [rows[g::num_microbatches] for g in range(num_microbatches)]
    fullest = max(sum(len(ids[r]) for r in grp) for grp in groups)
    t = token_bucket(fullest, cap=max_tokens, minimum=min_bucket)
    slots = num_seq_slots or bucket(max(len(grp) for grp in groups), minimum=MIN_SEQ_BUCKET)
    return [pack_chunk(grp, ids, types, max_tokens=max_tokens, num_tokens=t, num_seq_slots=slots) for grp in groups]


def check_sequences(ids: Sequence[Sequence[int]], types: Sequence[Sequence[int] | None]) -> None:
    """Every sequence non-empty, with one token type per token (or None: all type 0)."""
    if len(ids) != len(types):
        raise ValueError(f"{len(ids)} id sequences but {len(types)} token-type sequences")
    for i, (a, b) in enumerate(zip(ids, types)):
        if b is not None and len(a) != len(b):
            raise ValueError(f"sequence {i}: {len(a)} token ids but {len(b)} token types")
        if not len(a):
            raise ValueError(f"sequence {i} is empty; every sequence needs at least one token")


def pack(ids: Sequence[Sequence[int]], types: Sequence[Sequence[int] | None], *, max_tokens: int,
         min_bucket: int = 16) -> list[PackedChunk]:
    """All sequences -> packed chunks (sorted by length; see `plan_chunks`)."""
    check_sequences(ids, types)
    return [pack_chunk(rows, ids, types, max_tokens=max_tokens, min_bucket=min_bucket)
            for rows in plan_chunks([len(a) for a in ids], max_tokens)]
