"""Bert encode under data parallelism (mesh "data" > 1) on 8 simulated CPU devices: each data
replica encodes its own share of every chunk, and the numbers are one device's."""
import numpy as np
import pytest

import energon_jax as ej
from energon_jax.engine.bert import ReplicaAttention, _compiled_step, default_max_tokens
from energon_jax.engine.packing import token_bucket

LENGTHS = (5, 40, 1, 17, 64, 9, 33)  # 7 sequences: divisible by no dp tested, one as long as the positions
LAYOUTS = [(2, 1, 4), (2, 2, 2)]  # (tp, pp, dp); dp=2 alone below


@pytest.fixture(scope="module")
def bert_folder(tiny_bert_factory):
    """A tiny random BertForMaskedLM: 2 layers, 4 heads, 64 positions, vocab 101 (padded rows under tp)."""
    return tiny_bert_factory("mlm", seed=11, vocab_size=101)[0]


@pytest.fixture(scope="module")
def seqs():
    rng = np.random.RandomState(2)
    return [rng.randint(0, 101, n).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def reference(bert_folder, seqs):
    """One device's results: what every layout must give, in input order."""
    model = ej.load_sharded_model(bert_folder)
    return {
        "mean": model.encode(seqs, pooling="mean"),
        "none": model.encode(seqs, pooling="none"),
        "logits": model.logits(np.array([x[:5] for x in seqs if len(x) >= 5])),  # 5 rows
    }


@pytest.mark.parametrize("tp,pp,dp", LAYOUTS, ids=[f"tp{t}-pp{p}-dp{d}" for t, p, d in LAYOUTS])
def test_data_parallel_encode_equals_one_device(bert_folder, seqs, reference, tp, pp, dp):
    model = ej.load_sharded_model(bert_folder, tp=tp, pp=pp, dp=dp)
    assert dict(model.mesh.shape) == {"data": dp, "stage": pp, "tensor": tp}
    assert model.num_streams == dp * pp
    # "auto" without stages: the varlen kernel's path (on CPU its XLA reference), per replica as on GPUs
    assert isinstance(model._attention(64, 128, 8), ReplicaAttention) == (pp == 1)
    np.testing.assert_allclose(model.encode(seqs, pooling="mean"), reference["mean"], atol=1e-5, rtol=0)
    assert model.last_stats.chunks == 1 and model.last_stats.real_tokens == sum(LENGTHS)
    for got, want in zip(model.encode(seqs, pooling="none"), reference["none"], strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # one sequence: every other replica's stream is padding only
    np.testing.assert_allclose(model.encode(seqs[3:4]), reference["mean"][3:4], atol=1e-5, rtol=0)
    if pp > 1:  # the masked-LM head (5 rows) once: the same streams, another head
        np.testing.assert_allclose(model.logits(np.array([x[:5] for x in seqs if len(x) >= 5])),
                                   reference["logits"], atol=1e-5, rtol=0)


def test_segment_mask_and_several_chunks_under_dp(bert_folder, seqs, reference):
    """dp=2 with XLA's segment-masked attention, and a token budget small enough for several
    dispatches, each dealt to both replicas: results still in input order."""
    model = ej.load_sharded_model(bert_folder, dp=2)
    model.attention_impl = "xla"
    assert not isinstance(model._attention(64, 128, 8), ReplicaAttention)
    np.testing.assert_allclose(model.encode(seqs), reference["mean"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(model.encode(seqs[3:4]), reference["mean"][3:4], atol=1e-5, rtol=0)
    model.max_tokens_per_chunk = 64
    order = [4, 0, 6, 2, 1, 5, 3]
    np.testing.assert_allclose(model.encode([seqs[i] for i in order]), reference["mean"][order], atol=1e-5, rtol=0)
    assert model.last_stats.chunks == 4  # 169 tokens in dispatches of at most 64


def test_each_replica_gets_its_share_of_the_work(bert_folder):
    """Not only equal numbers: under dp=2 a chunk is dealt into one packed stream per replica,
    each about half the chunk's tokens, the step's stream inputs are split over "data" (each
    device holds one stream), and each device's program does about half the one-device flops."""
    seqs = [[7] * n for n in np.random.RandomState(3).randint(20, 64, 16)]  # 16 sequences, ~670 tokens
    real = sum(map(len, seqs))
    flops = {}
    for dp in (1, 2):
        model = ej.load_sharded_model(bert_folder, dp=dp)
        parts = model._pack(np.argsort([len(s) for s in seqs]), seqs, [None] * len(seqs))
        assert len(parts) == dp and sum(p.real_tokens for p in parts) == real
        assert all(abs(p.real_tokens - real / dp) <= 64 for p in parts)  # within one sequence of a fair share
        arrays, attention, _ = model._step_inputs(parts)
        assert arrays[0].shape == ((dp,) if dp > 1 else ()) + (parts[0].computed_tokens,)
        compiled = model._step.lower(model.params, *arrays, attention=attention, head="mean").compile()
        analysis = compiled.cost_analysis()
        flops[dp] = (analysis[0] if isinstance(analysis, list) else analysis)["flops"]
        if dp > 1:
            assert parts[0].computed_tokens == token_bucket(max(p.real_tokens for p in parts)) < token_bucket(real)
            for x in arrays:
                assert "data" in str(x.sharding.spec[0])
                assert {s.data.shape[0] for s in x.addressable_shards} == {1}  # one stream per device
            assert "data" in str(compiled.input_shardings[0][1].spec[0])
    assert flops[2] < 0.6 * flops[1], flops


def test_fixed_shapes_view_under_dp_compiles_everything_in_warmup(bert_folder):
    """What the Server encodes through: one program per token bucket, now taking one stream per
    replica; warmup compiles them all, so no batch compiles while serving."""
    short = [[7 + i] * n for i, n in enumerate((3, 8, 1, 6, 7, 5, 8))]
    want = ej.load_sharded_model(bert_folder, max_seq_len=8).encode(short)
    _compiled_step.cache_clear()  # loads share compiled steps: count this view's programs from none
    view = ej.load_sharded_model(bert_folder, dp=2, max_seq_len=8).fixed_shapes(4)  # few buckets to compile
    view.warmup(["mean"])
    compiled = view.compile_counts["bert"]
    assert compiled == len(view.token_buckets()) == 3
    for rows in ([3], [0, 2, 5], [1, 4, 6, 0], list(range(7))):
        np.testing.assert_allclose(view.encode([short[i] for i in rows]), want[rows], atol=1e-5, rtol=0)
    assert view.compile_counts["bert"] == compiled


def test_default_token_budget_is_per_replica(bert_folder):
    """A replica's stream keeps the size tuned for one device (engine/bert.DEFAULT_MAX_TOKENS)."""
    one = ej.load_sharded_model(bert_folder).max_tokens_per_chunk
    assert one == default_max_tokens("auto")
    assert ej.load_sharded_model(bert_folder, dp=4).max_tokens_per_chunk == 4 * one
    with pytest.raises(ValueError, match="max_tokens_per_chunk=16"):
        ej.load_sharded_model(bert_folder, dp=2).max_tokens_per_chunk = 16


def test_default_token_budget_follows_the_attention_until_set(bert_folder):
    """A switch of attention_impl kept the budget of the impl the model was built with: from the
    fused kernel's 65,536 tokens to XLA's attention, 4x the memory that path was sized for."""
    model = ej.load_sharded_model(bert_folder, dp=2)
    model.attention_impl = "triton"  # only sets the step up: nothing runs on this CPU
    assert model.max_tokens_per_chunk == 2 * default_max_tokens("triton") > 2 * default_max_tokens("xla")
    model.attention_impl = "xla"
    assert model.max_tokens_per_chunk == 2 * default_max_tokens("xla")
    model.max_tokens_per_chunk = 512  # given: kept across switches
    model.attention_impl = "triton"
    assert model.max_tokens_per_chunk == 512
