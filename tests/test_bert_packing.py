"""Packing of encoder batches and the packed (segment-masked) attention, without a model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from energon_jax.engine.packing import pack, pack_chunk, plan_chunks, token_bucket, token_buckets
from energon_jax.engine.steps import bucket
from energon_jax.models.bert import PackedAttention, segment_attention_xla
from energon_jax.models.layers import masked_attention


def test_plan_chunks_sorts_and_respects_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, size=200)
    chunks = plan_chunks(lengths, max_tokens=256)
    flat = np.concatenate(chunks)
    assert sorted(flat.tolist()) == list(range(200))  # every sequence exactly once
    assert all(lengths[c].sum() <= 256 for c in chunks)
    assert np.all(np.diff(lengths[flat]) >= 0)  # shortest first: similar lengths share a chunk
    # greedy: a chunk is closed only when the next sequence would not fit
    for a, b in zip(chunks, chunks[1:]):
        assert lengths[a].sum() + lengths[b[0]] > 256
    with pytest.raises(ValueError, match="exceeds the chunk budget"):
        plan_chunks([10, 300], max_tokens=256)


def test_chunks_of_at_most_max_seqs_and_the_token_buckets_they_can_have():
    """What a Server's fixed-shape encoder and its warm-up rely on (BertModel.fixed_shapes)."""
    lengths = np.random.default_rng(1).integers(1, 9, size=50)
    chunks = plan_chunks(lengths, max_tokens=1000, max_seqs=8)
    assert [len(c) for c in chunks] == [8] * 6 + [2] and sorted(np.concatenate(chunks)) == list(range(50))
    for most in (1, 100, 4096, 9000):
        assert token_buckets(most, cap=9000) == sorted({token_bucket(n, cap=9000) for n in range(1, most + 1)})
    assert token_buckets(9000, cap=9000)[-4:] == [6144, 7168, 8192, 9000]  # eighths of 8k, then capped


def test_pack_layout():
    ids = [[5, 6, 7], [8], [9, 10]]
    types = [[0, 0, 1], [0], [0, 1]]
    (chunk,) = pack(ids, types, max_tokens=64)
    assert chunk.computed_tokens == bucket(6) == 16 and chunk.real_tokens == 6
    # sorted by length: [8], [9, 10], [5, 6, 7]
    assert chunk.rows.tolist() == [1, 2, 0]
    assert chunk.tokens[:6].tolist() == [8, 9, 10, 5, 6, 7] and not chunk.tokens[6:].any()
    assert chunk.positions[:6].tolist() == [0, 0, 1, 0, 1, 2]
    assert chunk.token_types[:6].tolist() == [0, 0, 1, 0, 0, 1]
    assert chunk.segments.tolist() == [0, 1, 1, 2, 2, 2] + [-1] * 10
    assert chunk.cu_seqlens.tolist() == [0, 1, 3, 6] + [6] * 5  # 3 sequences padded to a bucket of 8
    assert chunk.max_len == 3 and chunk.lengths().tolist() == [1, 2, 3]


def test_token_buckets_are_fine_for_long_streams():
    # powers of two up to 4096 tokens, then 4 lengths per octave: 4097..5120 -> 5120, 16385 -> 20480
    assert [token_bucket(n) for n in (1, 17, 1000, 4096)] == [16, 32, 1024, 4096]
    assert [token_bucket(n) for n in (4097, 5120, 5121, 7000, 16385, 17900, 24577, 32768)] == \
        [5120, 5120, 6144, 7168, 20480, 20480, 28672, 32768]
    assert token_bucket(17900, cap=18000) == 18000 and token_bucket(40000, cap=32768) == 32768
    # the last chunk of a large batch is padded to its eighth step, not the next power of two
    ids = [[1] * 500] * 36  # 18,000 tokens
    chunk = pack_chunk(np.arange(36), ids, [None] * 36, max_tokens=32768)
    assert chunk.computed_tokens == 20480 and chunk.real_tokens == 18000


def test_pack_rejects_bad_sequences():
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        pack([[1], []], [[0], []], max_tokens=64)
    with pytest.raises(ValueError, match="2 token ids but 1 token types"):
        pack([[1, 2]], [[0]], max_tokens=64)


def _attention_per_sequence(q, k, v, lengths, scale):
    """Each sequence alone through the reference attention, concatenated."""
    outs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        mask = jnp.ones((1, n, n), bool)
        outs.append(masked_attention(q[None, sl], k[None, sl], v[None, sl], mask, scale)[0])
        start += n
    return jnp.concatenate(outs)


@pytest.mark.parametrize("block", [16, 1024])  # windowed (T > block + 2 w) and dense-mask paths
def test_segment_attention_matches_each_sequence_alone(block):
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 17, size=20).tolist()
    total = sum(lengths)
    t, n, d = 512, 2, 8
    q, k, v = (jnp.asarray(rng.standard_normal((t, n, d)), jnp.float32) for _ in range(3))
    segments = np.full(t, -1, np.int32)
    segments[:total] = np.repeat(np.arange(len(lengths)), lengths)
    out = segment_attention_xla(q, k, v, jnp.asarray(segments), 0.35, max_seqlen=16, block=block)
    ref = _attention_per_sequence(q, k, v, lengths, 0.35)
    np.testing.assert_allclose(np.asarray(out[:total]), np.asarray(ref), atol=1e-5, rtol=1e-5)
    assert not np.asarray(out[total:]).any()  # padding rows give zeros


def test_packed_attention_kernel_switch():
    pytest.importorskip("energon_jax.kernels.varlen_attention")
    rng = np.random.default_rng(2)
    lengths = [3, 9, 1, 12]
    t, n, d = 32, 2, 16
    q, k, v = (jnp.asarray(rng.standard_normal((t, n, d)), jnp.float32) for _ in range(3))
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(lengths), [25] * 4]), jnp.int32)
    segments = np.full(t, -1, np.int32)
    segments[:25] = np.repeat(np.arange(4), lengths)
    xla = PackedAttention(16, "xla")(q, k, v, jnp.asarray(segments), cu, 0.25)
    # on CPU "auto" runs the kernel module's XLA reference: same contract, independent code
    auto = PackedAttention(16, "auto")(q, k, v, jnp.asarray(segments), cu, 0.25)
    np.testing.assert_allclose(np.asarray(xla[:25]), np.asarray(auto[:25]), atol=1e-5)
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        PackedAttention(16, "flash")
    assert jax.default_backend() == "cpu"


def test_default_token_budget_follows_the_attention_path():
    from energon_jax.engine.bert import DEFAULT_MAX_TOKENS, DEFAULT_MAX_TOKENS_FUSED, default_max_tokens

    assert default_max_tokens("triton") == DEFAULT_MAX_TOKENS_FUSED == 65536  # fused varlen kernel
    assert default_max_tokens("xla") == DEFAULT_MAX_TOKENS == 16384  # scores materialised per window
    assert default_max_tokens("auto") == (65536 if jax.default_backend() == "gpu" else 16384)
    assert token_bucket(10, minimum=8192) == token_bucket(5000, minimum=8192) == 8192
