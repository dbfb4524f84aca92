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


def record_compile_threads(monkeypatch) -> list:
    """The thread name of every jax.stages.Lowered.compile call from now on."""
    import jax

    names, compile_ = [], jax.stages.Lowered.compile

    def record(lowered, *args, **kwargs):
        names.append(threading.current_thread().name)
        return compile_(lowered, *args, **kwargs)

    monkeypatch.setattr(jax.stages.Lowered, "compile", record)
    return names


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
    compiling = record_compile_threads(monkeypatch)
    warm = SlotEngine(model, 4, decode_steps=4, cache_len=32, max_prefill_batch=4)
    warm.warmup(workers=3)
    programs = {f"prefill_{p}x{t}" for p, t in warm.prefill_shapes} | {f"decode_{k}" for k in warm.step_options}
    assert sorted(key for key, _ in tracing) == sorted(programs)  # each once
    assert {name for _, name in tracing} == {threading.main_thread().name}  # traced in the caller's thread
    assert len(compiling) == len(programs) and all(name.startswith("energon-compile") for name in compiling)
    assert len(set(compiling)) > 1  # more than one thread did compile
    served = serve(warm)
    warm.warmup()  # again: everything is compiled already
    assert sorted(key for key, _ in tracing) == sorted(programs)  # serving and the second warm-up traced nothing

    lazy = SlotEngine(model, 4, decode_steps=4, cache_len=32, max_prefill_batch=4)  # no warm-up: jit on first call
    np.testing.assert_array_equal(served, serve(lazy))
    assert len(tracing) > len(programs)  # the lazy engine traced its programs as it went


def test_warmup_on_one_thread_and_bad_worker_counts(folder, caplog):
    import logging

    import energon_jax as ej
    from energon_jax.engine.slots import SlotEngine

    model = ej.load_sharded_model(folder)
    eng = SlotEngine(model, 4, decode_steps=2, cache_len=16, max_prefill_batch=2)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match=rf"workers={bad!r} must be an int >= 1"):
            eng.warmup(workers=bad)
    assert not eng._programs  # refused before compiling anything
    with caplog.at_level(logging.INFO, logger="energon_jax.engine.slots"):
        took = eng.warmup(workers=1)
        eng.warmup(workers=1)
    assert took > 0 and set(eng._programs) == ({("prefill", shape) for shape in eng.prefill_shapes}
                                               | {("decode", k) for k in eng.step_options})
    # the log says what compiled; a second warm-up compiled nothing (it said "compiling on 0 threads")
    first, again = [m for m in caplog.messages if m.startswith("warmed up")]
    assert f"compiling {len(eng._programs)} on 1 thread)" in first, first
    assert "(all compiled before)" in again and "compiling" not in again, again


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
    compiling = record_compile_threads(monkeypatch)
    view.warmup(["mean", "cls"], workers=2)
    assert len(tracing) == 2 * len(view.token_buckets()) and set(tracing) == {threading.main_thread().name}
    assert len(compiling) == len(tracing) and set(compiling) == {"energon-compile_0", "energon-compile_1"}
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


def test_compile_concurrently_applies_the_callers_jax_settings_and_stops_at_a_failure():
    import jax
    import jax.numpy as jnp

    from energon_jax.engine.steps import compile_concurrently

    f = jax.jit(lambda a, b: a @ b)
    x = jnp.ones((4, 4))
    with jax.default_matmul_precision("highest"):  # thread-local: the pool's threads do not see it
        programs, _ = compile_concurrently({"dot": lambda: f.lower(x, x)}, workers=2)
    assert "highest" in programs["dot"].as_text().lower()

    lowered = []

    def lower(i):
        lowered.append(i)
        if i == 1:
            raise ValueError("program 1 does not lower")
        return f.lower(x, x)

    with pytest.raises(ValueError, match="program 1 does not lower"):
        compile_concurrently({i: (lambda i=i: lower(i)) for i in range(4)}, workers=2)
    assert lowered == [0, 1]  # the programs after the failure were never lowered


def test_a_bert_placed_otherwise_does_not_call_the_programs_another_load_warmed_up(tiny_bert_factory):
    """Every load of a model shares the programs a warm-up compiled (engine/bert._compiled_step),
    keyed by their inputs: a model whose params sit otherwise on the same mesh (built directly,
    replicated) got one of them and a ValueError (input shardings disagree) instead of a compile."""
    import jax

    import energon_jax as ej
    from energon_jax.engine.bert import BertModel

    warmed = ej.load_sharded_model(tiny_bert_factory("base")[0], tp=2, max_seq_len=20).fixed_shapes(4)
    warmed.warmup(["mean"])
    ids = [[101, 7, 9, 102], [101, 5, 102]]
    replicated = jax.device_put(warmed.params, jax.sharding.NamedSharding(warmed.mesh, jax.sharding.PartitionSpec()))
    other = BertModel(warmed.config, replicated, warmed.mesh, warmed.tokenizer, max_seq_len=20).fixed_shapes(4)
    np.testing.assert_allclose(other.encode(ids), warmed.encode(ids), atol=1e-6, rtol=0)
