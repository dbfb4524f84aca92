"""Compiled steps are cached per (config, dtype, mesh, attention impl) (docs/ARCHITECTURE.md): two
loads of one model share programs and `compile_counts`; the cache holds no model's weights."""
import gc
import weakref

import jax
import numpy as np
import pytest

import energon_jax as ej
from energon_jax.runtime.mesh import make_mesh

IDS = [[101, 7, 8, 102], [101, 5, 102], [101, 9, 10, 11, 12, 102]]


@pytest.fixture(scope="module")
def bert_folder(tiny_bert_factory):
    """A tiny random HF BertModel of a config no other test file uses (its steps start uncompiled)."""
    return tiny_bert_factory(seed=11, vocab_size=211, hidden_size=24, num_attention_heads=2, intermediate_size=40,
                             max_position_embeddings=32)[0]


def test_two_bert_loads_share_compiled_steps(bert_folder):
    """BertModel built its counter and step per instance: a second load of one model compiled
    every program again. They now come from one cache, keyed as GPT's."""
    first = ej.load_sharded_model(bert_folder)
    second = ej.load_sharded_model(bert_folder)
    assert first.params is not second.params
    assert second.compile_counts is first.compile_counts and second._step is first._step
    before = first.compile_counts["bert"]
    want = {p: first.encode(IDS, pooling=p) for p in ("mean", "cls")}
    compiled = first.compile_counts["bert"]
    assert compiled == before + 2
    got = {p: second.encode(IDS, pooling=p) for p in ("mean", "cls")}  # the second load's first encodes
    assert second.compile_counts["bert"] == compiled  # nothing new compiled
    for p in want:
        np.testing.assert_allclose(got[p], want[p], atol=0, rtol=0)
    # a fixed_shapes view shares its model's steps, and so does one of another load
    view, other_view = first.fixed_shapes(4), second.fixed_shapes(4)
    assert view.compile_counts is other_view.compile_counts is first.compile_counts
    view.warmup(["mean"])
    compiled = first.compile_counts["bert"]
    other_view.warmup(["mean"])
    np.testing.assert_allclose(other_view.encode(IDS), want["mean"], atol=2e-5, rtol=0)
    assert first.compile_counts["bert"] == compiled


def test_bert_steps_are_not_shared_across_dtype_impl_or_mesh(bert_folder):
    base = ej.load_sharded_model(bert_folder)
    ref = base.encode(IDS)
    compiled = base.compile_counts["bert"]

    half = ej.load_sharded_model(bert_folder, dtype="bfloat16")
    assert half.compile_counts is not base.compile_counts and half._step is not base._step
    before = half.compile_counts["bert"]
    np.testing.assert_allclose(half.encode(IDS), ref, atol=0.1, rtol=0)
    assert half.compile_counts["bert"] == before + 1

    xla = ej.load_sharded_model(bert_folder)
    xla.attention_impl = "xla"
    assert xla.compile_counts is not base.compile_counts and xla._step is not base._step
    before = xla.compile_counts["bert"]
    np.testing.assert_allclose(xla.encode(IDS), ref, atol=2e-5, rtol=0)
    assert xla.compile_counts["bert"] == before + 1
    xla.attention_impl = "auto"  # back to the first impl: its steps, already compiled
    assert xla.compile_counts is base.compile_counts
    np.testing.assert_allclose(xla.encode(IDS), ref, atol=0, rtol=0)
    with pytest.raises(ValueError, match="attention_impl='fast' is not supported"):
        xla.attention_impl = "fast"
    assert xla.attention_impl == "auto" and xla.compile_counts is base.compile_counts

    tp = ej.load_sharded_model(bert_folder, mesh=make_mesh(tp=2))
    assert tp.compile_counts is not base.compile_counts
    np.testing.assert_allclose(tp.encode(IDS), ref, atol=2e-5, rtol=0)
    assert base.compile_counts["bert"] == compiled  # none of the others compiled into the first's counter


def _freed_after_del(load, run):
    """Whether a loaded model's weights are freed once the model is dropped, its steps cached."""
    model = load()
    run(model)
    leaves = [weakref.ref(x) for x in jax.tree.leaves(model.params)]
    del model
    gc.collect()
    return all(r() is None for r in leaves)


def test_cached_steps_keep_no_weights_alive(bert_folder, tiny_gpt2_factory):
    """Params are the steps' argument, never closed over: a cache holding them would keep every
    model ever loaded in memory."""
    assert _freed_after_del(lambda: ej.load_sharded_model(bert_folder), lambda m: m.encode(IDS))
    assert _freed_after_del(lambda: ej.load_sharded_model(bert_folder).fixed_shapes(2), lambda m: m.encode(IDS))
    gpt_folder = tiny_gpt2_factory()[0]
    assert _freed_after_del(lambda: ej.load_sharded_model(gpt_folder),
                            lambda m: (m.logits([[1, 2, 3]]), m.generate([[1, 2]], max_new_tokens=3)))


def test_two_gpt2_loads_share_compiled_steps(tiny_gpt2_factory):
    folder = tiny_gpt2_factory(seed=9)[0]
    first, second = ej.load_sharded_model(folder), ej.load_sharded_model(folder)
    assert second.compile_counts is first.compile_counts
    want = first.logits([[1, 2, 3]])
    compiled = dict(first.compile_counts)
    np.testing.assert_allclose(second.logits([[1, 2, 3]]), want, atol=0, rtol=0)
    assert dict(second.compile_counts) == compiled
    assert ej.load_sharded_model(folder, dtype="bfloat16").compile_counts is not first.compile_counts
