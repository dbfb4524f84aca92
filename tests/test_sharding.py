"""Tensor / pipeline / data parallelism over 8 simulated CPU devices, proven equal to one device."""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

import energon_jax as ej
from energon_jax.engine.pipeline import schedule

LAYOUTS = [(2, 1, 1), (4, 1, 1), (1, 2, 1), (1, 4, 1), (2, 2, 1), (2, 2, 2), (1, 2, 4), (8, 1, 1)]
# 8 heads, 4 layers, vocab 101 (not divisible by any tp: the padded, masked path), positions 128.
CONFIG = dict(n_layer=4, n_head=8, n_embd=64, vocab_size=101)


@pytest.fixture(scope="module")
def gpt2_folder(tiny_gpt2_factory):
    return tiny_gpt2_factory(seed=4, **CONFIG)[0]


@pytest.fixture(scope="module")
def reference(gpt2_folder):
    model = ej.load_sharded_model(gpt2_folder)
    rng = np.random.RandomState(0)
    ids = rng.randint(0, CONFIG["vocab_size"], (8, 13))
    prompts = [ids[0, :n].tolist() for n in (13, 2, 7, 5)]
    return ids, model.logits(ids), prompts, [o.token_ids for o in model.generate(prompts, max_new_tokens=12)]


@pytest.fixture(scope="module")
def lone_reference(gpt2_folder, reference):
    """A lone prompt decodes as one row (engine.gpt.min_decode_rows): on a mesh its projections are
    reductions over sharded weights (models/layers.project)."""
    prompt = reference[2][2]
    return prompt, ej.load_sharded_model(gpt2_folder).generate([prompt], max_new_tokens=12, temperature=0.0)


@pytest.mark.parametrize("tp,pp,dp", LAYOUTS, ids=[f"tp{t}-pp{p}-dp{d}" for t, p, d in LAYOUTS])
def test_gpt2_layout_equals_one_device(gpt2_folder, reference, lone_reference, tp, pp, dp):
    ids, ref_logits, prompts, ref_tokens = reference
    model = ej.load_sharded_model(gpt2_folder, tp=tp, pp=pp, dp=dp)
    assert dict(model.mesh.shape) == {"data": dp, "stage": pp, "tensor": tp}
    for leaf in jax.tree.leaves(model.params):
        assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == model.mesh
    np.testing.assert_allclose(model.logits(ids), ref_logits, atol=1e-5, rtol=0)
    assert [o.token_ids for o in model.generate(prompts, max_new_tokens=12)] == ref_tokens
    prompt, lone = lone_reference
    assert model.generate([prompt], max_new_tokens=12, temperature=0.0) == lone


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_bfloat16_pipeline_is_as_close_as_one_device(gpt2_folder, bert_folder, kind):
    """bf16 with pp=2 (the tiny preset's default dtype) runs: XLA's CPU backend aborted the process
    on the 16-bit all-reduce that gathers the stages' output. Its results are as close to float32's
    as one bf16 device's (the two programs round differently, so they are not bit-equal)."""
    folder = gpt2_folder if kind == "gpt2" else bert_folder
    ref = ej.load_sharded_model(folder, dtype="float32")
    one = ej.load_sharded_model(folder, dtype="bfloat16")
    two = ej.load_sharded_model(folder, dtype="bfloat16", pp=2)
    ids = np.random.RandomState(2).randint(0, 101, (2, 9))
    for call in ("logits", "encode") if kind == "bert" else ("logits",):
        want = np.asarray(getattr(ref, call)(ids.tolist() if call == "encode" else ids))
        err_one, err_two = (np.abs(np.asarray(getattr(m, call)(ids.tolist() if call == "encode" else ids)) - want).max()
                            for m in (one, two))
        assert err_two <= 2 * err_one + 1e-3 * np.abs(want).max(), (call, err_one, err_two)
    if kind == "gpt2":
        outs = two.generate([ids[0].tolist(), ids[1, :4].tolist()], max_new_tokens=6)
        assert [len(o.token_ids) for o in outs] == [6, 6]


@pytest.mark.parametrize("tp,pp,dp", [(2, 2, 2), (4, 1, 2)], ids=["tp2-pp2-dp2", "tp4-dp2"])
def test_slot_engine_serves_a_sharded_model(gpt2_folder, reference, tp, pp, dp):
    """The serving engine on a sharded model: a batched prefill (each prompt's K/V scattered into
    its slot's row of the sharded cache) and decode steps give one device's greedy tokens."""
    from energon_jax.engine.slots import SlotEngine

    _, _, prompts, ref_tokens = reference
    model = ej.load_sharded_model(gpt2_folder, tp=tp, pp=pp, dp=dp)
    eng = SlotEngine(model, 4, decode_steps=4, cache_len=32, max_prefill_batch=4)
    slots = [2, 0, 3, 1]
    n = len(prompts)
    firsts = np.asarray(eng.prefill_batch(slots, prompts, temperature=[0.0] * n, top_k=[0] * n, top_p=[1.0] * n,
                                          seed=[0] * n))[:n]
    rest = np.concatenate([np.asarray(eng.decode(4, [True] * 4)) for _ in range(2)])
    for i, slot in enumerate(slots):  # the reference stops at EOS; the engine decodes on (its scheduler stops)
        expected = ref_tokens[i][:9]
        assert ([int(firsts[i])] + rest[:, slot].tolist())[: len(expected)] == expected
    # every prefill program's rows split over "data": on a GPU the prefill kernel's shard_map splits
    # them, and a 1-row program (a lone prompt) could not start a Server under dp=2
    assert all(rows % dp == 0 for rows, _ in eng.prefill_shapes), eng.prefill_shapes
    lone = np.asarray(eng.prefill_batch([1], [prompts[0]], temperature=[0.0], top_k=[0], top_p=[1.0], seed=[0]))
    assert lone.shape == (dp,) and int(lone[0]) == ref_tokens[0][0]


@pytest.mark.parametrize("tp,pp", [(2, 2), (4, 2), (1, 4)])
def test_weight_bytes_per_device_bound(gpt2_folder, tp, pp):
    model = ej.load_sharded_model(gpt2_folder, tp=tp, pp=pp)
    leaves = jax.tree_util.tree_leaves_with_path(model.params)
    total = sum(x.nbytes for _, x in leaves)
    # Replicated small tensors: layer norms and the biases that sit on the embed axis.
    small = sum(x.nbytes for path, x in leaves
                if any(k in jax.tree_util.keystr(path) for k in ("ln_", "out_bias", "proj_bias")))
    per_device = model.param_bytes_per_device()
    assert len(per_device) == tp * pp
    held = {}  # what the shards occupy, read from the arrays
    for _, x in leaves:
        for shard in x.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    assert per_device == held
    assert max(per_device.values()) <= total / (tp * pp) + small
    # No device holds a whole vocabulary matrix.
    wte = model.params["wte"]
    for shard in wte.addressable_shards:
        assert shard.data.shape[0] * tp * pp == wte.shape[0]
        assert shard.data.shape[0] < CONFIG["vocab_size"]
    assert "weights" in model.memory_report(batch=4)


def test_pipeline_schedule():
    ticks = schedule(num_microbatches=4, num_stages=2)
    assert len(ticks) == 4 + 2 - 1
    assert ticks[0] == [0, None] and ticks[1] == [1, 0] and ticks[-1] == [None, 3]
    # after the fill, every stage works on a distinct microbatch
    assert all(None not in t and len(set(t)) == 2 for t in ticks[1:4])
    # every stage sees every microbatch exactly once, in order
    for stage in range(2):
        assert [t[stage] for t in ticks if t[stage] is not None] == [0, 1, 2, 3]
    assert len(schedule(8, 4)) == 11


def test_decode_step_has_collective_permutes(gpt2_folder):
    import jax.numpy as jnp

    from energon_jax.engine.sampling import SamplingParams

    model = ej.load_sharded_model(gpt2_folder, pp=2, tp=2)
    b = 4
    args = (model.params, model.put_rows(np.ones((b, 16), np.int32)), model.put_rows(np.full(b, 3, np.int32)),
            model.put_rows(np.full(b, 4, np.int32)), SamplingParams.make(b), model.put_rows(np.arange(b, dtype=np.uint32)),
            jnp.asarray([-1], np.int32))
    hlo = model._generate.lower(*args, cache_len=32, out_len=8).compile().as_text()
    assert "collective-permute" in hlo


def test_validation_errors(gpt2_folder):
    with pytest.raises(ValueError, match="n_head|heads=8 is not divisible by tp=3"):
        ej.load_sharded_model(gpt2_folder, tp=3)
    with pytest.raises(ValueError, match="layers=4 is not divisible by pp=3"):
        ej.load_sharded_model(gpt2_folder, pp=3)
    with pytest.raises(ValueError, match="16 devices asked for, but only 8 exist"):
        ej.load_sharded_model(gpt2_folder, tp=4, pp=2, dp=2)
    with pytest.raises(ValueError, match="tp=0"):
        ej.load_sharded_model(gpt2_folder, tp=0)
    model = ej.load_sharded_model(gpt2_folder, dp=2)
    mesh = ej.make_mesh(tp=2)
    with pytest.raises(ValueError, match="disagree with the mesh"):
        ej.load_sharded_model(gpt2_folder, tp=4, mesh=mesh)
    # generate pads an odd batch to the data-parallel size instead of failing
    assert len(model.generate([[1, 2], [3], [4, 5, 6]], max_new_tokens=3)) == 3


@pytest.mark.parametrize("dp", [2, 4])
def test_gpt2_logits_of_a_batch_that_does_not_split_over_dp(gpt2_folder, reference, dp):
    """logits refused a batch of rows that is no multiple of dp ("batch of 1 rows does not split
    over dp=2") where generate pads: it now pads rows to the replicas and cuts them off again."""
    ids, ref_logits, _, _ = reference
    model = ej.load_sharded_model(gpt2_folder, dp=dp)
    for rows in (ids[:1], ids[:3], ids[:dp + 1]):
        got = model.logits(rows)
        assert got.shape == (len(rows), ids.shape[1], CONFIG["vocab_size"]) and np.isfinite(got).all()
        np.testing.assert_allclose(got, ref_logits[: len(rows)], atol=1e-5, rtol=0)
    np.testing.assert_allclose(model.logits(ids[:1, :4].tolist()), model.logits(ids[:2, :4])[:1], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- Bert
BERT_LAYOUTS = [(2, 1, 1), (1, 2, 1), (2, 2, 2), (1, 4, 1), (2, 2, 1)]


@pytest.fixture(scope="module")
def bert_folder(tiny_bert_factory):
    """A tiny random BertForMaskedLM: 4 layers, 4 heads, vocab 101 (split over no tp: padded rows)."""
    return tiny_bert_factory("mlm", seed=3, vocab_size=101, num_hidden_layers=4)[0]


@pytest.fixture(scope="module")
def bert_inputs(bert_folder):
    rng = np.random.RandomState(1)
    ids = [rng.randint(0, 101, n).tolist() for n in (5, 40, 1, 17, 64, 9, 33)]
    model = ej.load_sharded_model(bert_folder)
    return ids, {
        "mean": model.encode(ids, pooling="mean"),
        "none": model.encode(ids, pooling="none"),
        "one": model.encode(ids[1:2], pooling="mean"),
        "logits": model.logits(np.array([x[:5] for x in ids if len(x) >= 5])),
    }


@pytest.mark.parametrize("tp,pp,dp", BERT_LAYOUTS, ids=[f"tp{t}-pp{p}-dp{d}" for t, p, d in BERT_LAYOUTS])
def test_bert_layout_equals_one_device(bert_folder, bert_inputs, tp, pp, dp):
    ids, ref = bert_inputs
    model = ej.load_sharded_model(bert_folder, tp=tp, pp=pp, dp=dp)
    assert dict(model.mesh.shape) == {"data": dp, "stage": pp, "tensor": tp}
    for leaf in jax.tree.leaves(model.params):
        assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == model.mesh
    np.testing.assert_allclose(model.encode(ids, pooling="mean"), ref["mean"], atol=1e-5, rtol=0)
    for got, want in zip(model.encode(ids, pooling="none"), ref["none"]):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # fewer sequences than pipeline microbatches: the other streams are padding only
    np.testing.assert_allclose(model.encode(ids[1:2], pooling="mean"), ref["one"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(model.logits(np.array([x[:5] for x in ids if len(x) >= 5])), ref["logits"],
                               atol=1e-5, rtol=0)
    stats = model.last_stats
    assert stats.computed_tokens >= stats.real_tokens


def test_bert_pipeline_is_a_pipeline(bert_folder):
    """pp=2: each stage holds only its layers, and the compiled encode moves activations stage
    to stage with collective-permutes over pp microbatches (one packed stream each)."""
    from energon_jax.engine.packing import pack_microbatches

    model = ej.load_sharded_model(bert_folder, pp=2, tp=2)
    qkv = model.params["encoder"]["layers"]["qkv_kernel"]
    assert {s.data.shape[0] for s in qkv.addressable_shards} == {2}  # 4 layers over 2 stages
    ids = [[1, 2, 3], [4, 5, 6, 7], [8], [9, 10]]
    parts = pack_microbatches(np.arange(4), ids, [None] * 4, 2, max_tokens=64)
    assert [p.rows.tolist() for p in parts] == [[0, 2], [1, 3]]
    assert len({p.tokens.shape for p in parts}) == 1
    arrays = [np.stack(col) for col in zip(*[(p.tokens, p.positions, p.token_types, p.segments, p.cu_seqlens)
                                             for p in parts])]
    attention = model._attention(16, parts[0].computed_tokens, len(parts[0].cu_seqlens) - 1)
    hlo = model._step.lower(model.params, *arrays, attention=attention, head="mean").compile().as_text()
    assert "collective-permute" in hlo
    with pytest.raises(ValueError, match="triton.*pipeline"):
        model.attention_impl = "triton"
        model.encode(ids)


def test_bert_layers_not_divisible_by_pp(bert_folder):
    with pytest.raises(ValueError, match="layers=4 is not divisible by pp=3|num_hidden_layers=4"):
        ej.load_sharded_model(bert_folder, pp=3)
