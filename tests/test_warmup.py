"""SlotEngine.warmup: every serving program compiled at once on a thread pool, then dispatched
through; served tokens equal the lazily compiled programs', sharded too, and nothing compiles twice."""
import threading

import numpy as np
import pytest

PROMPTS = [[5, 9, 2, 77, 31], list(range(1, 21)), [42] * 3]
SETTINGS = dict(temperature=[0.0, 0.9, 1.1], top_k=[0, 7, 0], top_p=[1.0, 0.8, 0.9], seed=[3, 4, 5])


def serve(eng, steps=(4, 2, 1)):
    """Prefill PROMPTS into slots 0-2 together, then decode; the tokens per slot."""
    first = np.asarray(eng.prefill_batch([0, 1, 2], PROMPTS, **SETTINGS))[:3]
    rest = [np.asarray(eng.decode(k, [True] * 3 + [False] * (eng.num_slots - 3))) for k in steps]
    return np.concatenate([first[None]] + [r[:, :3] for r in rest])


@pytest.fixture(scope="module")
def folder(tiny_gpt2_factory):
    return tiny_gpt2_factory(seed=3)[0]


@pytest.mark.parametrize("mesh", [dict(), dict(tp=2, dp=2)], ids=["one-device", "tp2-dp2"])
def test_warmup_compiles_on_threads_and_serves_the_same_tokens(folder, mesh, monkeypatch):
    import energon_jax as ej
    from energon_jax.engine import steps as engine_steps
    from energon_jax.engine.slots import SlotEngine

    model = ej.load_sharded_model(folder, **mesh)
    tracing = []  # (program, thread) of every trace: the counter is bumped inside each traced program
    bump = engine_steps.CompileCounter.__setitem__

    def record(counter, key, value):
        tracing.append((key, threading.current_thread().name))
        bump(counter, key, value)

    monkeypatch.setattr(engine_steps.CompileCounter, "__setitem__", record)
    warm = SlotEngine(model, 4, decode_steps=4, cache_len=32, max_prefill_batch=4)
    warm.warmup(workers=3)
    programs = {f"prefill_{p}x{t}" for p, t in warm.prefill_shapes} | {f"decode_{k}" for k in warm.step_options}
    assert sorted(key for key, _ in tracing) == sorted(programs)  # each once
    assert all(name.startswith("energon-compile") for _, name in tracing)
    assert len({name for _, name in tracing}) > 1  # more than one thread did compile
    served = serve(warm)
    warm.warmup()  # again: everything is compiled already
    assert sorted(key for key, _ in tracing) == sorted(programs)  # serving and the second warm-up traced nothing

    lazy = SlotEngine(model, 4, decode_steps=4, cache_len=32, max_prefill_batch=4)  # no warm-up: jit on first call
    np.testing.assert_array_equal(served, serve(lazy))
    assert len(tracing) > len(programs)  # the lazy engine traced its programs as it went


def test_warmup_on_one_thread_and_bad_worker_counts(folder):
    import energon_jax as ej
    from energon_jax.engine.slots import SlotEngine

    model = ej.load_sharded_model(folder)
    eng = SlotEngine(model, 4, decode_steps=2, cache_len=16, max_prefill_batch=2)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match=rf"workers={bad!r} must be an int >= 1"):
            eng.warmup(workers=bad)
    assert not eng._programs  # refused before compiling anything
    took = eng.warmup(workers=1)
    assert took > 0 and set(eng._programs) == ({("prefill", shape) for shape in eng.prefill_shapes}
                                               | {("decode", k) for k in eng.step_options})


@pytest.mark.parametrize("mesh", [dict(), dict(dp=2, tp=2)], ids=["one-device", "dp2-tp2"])
def test_bert_warmup_compiles_on_threads_and_encodes_the_same(tiny_bert_factory, mesh, monkeypatch):
    import energon_jax as ej
    from energon_jax.engine import steps as engine_steps

    folder = tiny_bert_factory("base")[0]
    tracing = []
    bump = engine_steps.CompileCounter.__setitem__
    monkeypatch.setattr(engine_steps.CompileCounter, "__setitem__",
                        lambda counter, key, value: (tracing.append(threading.current_thread().name),
                                                     bump(counter, key, value))[1])
    # its own max_seq_len: programs compiled by other tests' loads of this folder are not this one's
    model = ej.load_sharded_model(folder, max_seq_len=24, **mesh)
    view = model.fixed_shapes(4)
    ids = [[101, 7, 9, 102], [101] + list(range(20, 38)) + [102], [101, 5, 102]]
    view.warmup(["mean", "cls"], workers=2)
    assert len(tracing) == 2 * len(view.token_buckets()) and set(tracing) == {"energon-compile_0", "energon-compile_1"}
    got = {p: view.encode(ids, pooling=p) for p in ("mean", "cls")}
    assert len(tracing) == 2 * len(view.token_buckets())  # served from the warmed-up programs
    warmed = dict(view._programs)
    view._programs.clear()  # the same shapes through the jitted step, compiled on first call
    try:
        for p in got:
            np.testing.assert_array_equal(got[p], view.encode(ids, pooling=p))
            np.testing.assert_allclose(got[p], model.encode(ids, pooling=p), atol=2e-5, rtol=0)  # unbounded shapes
    finally:
        view._programs.update(warmed)
    assert len(tracing) > 2 * len(view.token_buckets())
