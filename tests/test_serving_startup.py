"""Start-up lines and URLs of the serving layer, and the Server's option and input checks, with a
stand-in Bert model (nothing compiles): `energon serve` printed http://0.0.0.0:PORT, a URL no client
can open, and logged two "ready" lines."""
import logging
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


class FakeBert:
    """What a Bert `Server` needs of its model: encode (refusing a bare str, as BertModel's does)."""

    max_seq_len = 16
    source = "fake"

    def __init__(self, warmup: bool = False):
        self.warmed = 0
        if warmup:
            self.warmup = self._warmup

    def _warmup(self):
        self.warmed += 1

    def encode(self, inputs, *, pooling="mean", normalize=False):
        if isinstance(inputs, str):
            raise TypeError("texts_or_ids must be a list")
        return np.array([[float(len(x)), 1.0] for x in inputs], np.float32)


def free_port(host="127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ipv6_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("host,url", [
    ("127.0.0.1", "http://127.0.0.1:8005"),
    ("localhost", "http://localhost:8005"),
    ("0.0.0.0", "http://127.0.0.1:8005"),  # a wildcard bind is reached through the loopback
    ("::", "http://[::1]:8005"),
    ("::0", "http://[::1]:8005"),
    ("0:0:0:0:0:0:0:0", "http://[::1]:8005"),
    ("::1", "http://[::1]:8005"),  # IPv6 in brackets
    ("fe80::1%eth0", "http://[fe80::1%25eth0]:8005"),  # a zone id's % escaped (RFC 6874)
])
def test_http_url_is_the_url_a_client_opens(host, url):
    from energon_jax.serving.http import http_url, listening_note

    assert http_url(host, 8005) == url
    wildcard = host in ("0.0.0.0", "::", "::0", "0:0:0:0:0:0:0:0")
    assert listening_note(host) == (f"listening on {host}, every interface" if wildcard else "")


def test_ready_line_of_an_ipv6_wildcard_bind():
    from energon_jax.serving.http import ready_message

    assert ready_message("::", 80, "gpt") == (
        "ready: http://[::1]:80 (POST /v1/completions, POST /generation, GET /run/{text}; GET /v1/models, "
        "/v1/models/{model}, /health, /metrics, /docs; listening on ::, every interface)")
    assert ready_message("localhost", 80, "bert").endswith("/metrics, /docs)")


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_background_http_on_a_wildcard_bind_gives_a_url_that_answers(host, caplog):
    """start_http's .url was http://0.0.0.0:PORT; the start-up log says "ready" once, with the same URL."""
    if host == "::" and not ipv6_available():
        pytest.skip("no IPv6 on this machine")
    from energon_jax.serving import Server
    from energon_jax.serving.http import ready_message

    server = Server(FakeBert(), max_batch_size=4, max_queue=8, name="fake")
    port = free_port("::1" if ":" in host else "127.0.0.1")
    with caplog.at_level(logging.INFO, logger="energon_jax.serving"):
        http = server.start_http(host=host, port=port)
        try:
            assert http.url == (f"http://[::1]:{port}" if ":" in host else f"http://127.0.0.1:{port}")
            assert repr(http) == f"BackgroundHTTP({http.url}, running)"
            end = time.monotonic() + 30
            while time.monotonic() < end and httpx.get(http.url + "/health", timeout=5).status_code != 200:
                time.sleep(0.05)
            r = httpx.post(http.url + "/v1/embeddings", json={"input": ["abc", "de"], "normalize": False}, timeout=10)
            assert r.status_code == 200, r.text
            assert [d["embedding"][0] for d in r.json()["data"]] == [3.0, 2.0]
            end = time.monotonic() + 10  # the ready line is logged just after /health turns 200
            while time.monotonic() < end and not any("ready: " in m for m in caplog.messages):
                time.sleep(0.02)
        finally:
            server.stop()
    lines = [m for m in caplog.messages if "ready" in m]
    assert lines == [ready_message(host, port, "bert")], caplog.messages
    assert ready_message(host, port, "bert").startswith(f"ready: {http.url} (")
    started = [m for m in caplog.messages if m.startswith("fake (bert)")]
    assert started == [f"fake (bert) started in {server.startup_seconds:.1f} s, without a warm-up (each shape "
                       "compiles on first use): embedding batches of 4 sequences, queue 8"], caplog.messages


def test_the_warm_up_line_is_not_a_second_ready_line(caplog):
    """Server.start logged "NAME (KIND) ready in S s: N slots, queue Q" and the HTTP layer then
    "ready: URL (routes)": the Server's line now says what the warm-up did, and only the HTTP one
    says ready."""
    from energon_jax.serving import Server

    model = FakeBert(warmup=True)
    with caplog.at_level(logging.INFO, logger="energon_jax.serving"):
        server = Server(model, max_batch_size=4, max_queue=8, name="fake").start()
        server.stop()
    assert model.warmed == 1
    line = next(m for m in caplog.messages if m.startswith("fake (bert)"))
    assert line == f"fake (bert) warmed up in {server.warmup_seconds:.1f} s: embedding batches of 4 sequences, queue 8"
    assert not any("ready" in m for m in caplog.messages), caplog.messages


def test_energon_serve_names_a_url_a_client_can_open(monkeypatch, caplog):
    """The first line of `energon serve --host 0.0.0.0` said "serving NAME on http://0.0.0.0:PORT"."""
    from energon_jax.serving import Server, cli_verbs

    calls = []
    monkeypatch.setattr(Server, "serve_http", lambda self, **kw: calls.append(kw))
    with caplog.at_level(logging.INFO, logger="energon_jax.serving"):
        assert cli_verbs._run(FakeBert(), host="0.0.0.0", port=8005, max_batch_size=2, max_queue=4, name="fake") == 0
        assert cli_verbs._run(FakeBert(), host="::1", port=8006, max_batch_size=2, max_queue=4, name="fake") == 0
    assert [kw["host"] for kw in calls] == ["0.0.0.0", "::1"]  # the bind itself is unchanged
    serving = [m for m in caplog.messages if m.startswith("serving fake on ")]
    assert serving == [
        "serving fake on http://127.0.0.1:8005 (listening on 0.0.0.0, every interface; compiling before /health "
        "reports ready)",
        "serving fake on http://[::1]:8006 (compiling before /health reports ready)"], caplog.messages


def test_energon_serve_runs_off_the_main_thread_and_leaves_sigterm_as_it_found_it(monkeypatch):
    """_run's SIGTERM handler (what follows serve_http runs after SIGTERM) raised "signal only works
    in main thread" when _run ran on another thread, as an embedding application may run it."""
    import threading

    from energon_jax.serving import Server, cli_verbs

    monkeypatch.setattr(Server, "serve_http", lambda self, **kw: None)
    before = signal.getsignal(signal.SIGTERM)
    got = {}

    def serve():
        try:
            got["rc"] = cli_verbs._run(FakeBert(), host="127.0.0.1", port=8007, max_batch_size=2, max_queue=4,
                                       name="fake")
        except Exception as e:  # noqa: BLE001 - the test reports it
            got["error"] = e

    thread = threading.Thread(target=serve)
    thread.start()
    thread.join(60)
    assert got == {"rc": 0}
    assert cli_verbs._run(FakeBert(), host="127.0.0.1", port=8007, max_batch_size=2, max_queue=4, name="fake") == 0
    assert signal.getsignal(signal.SIGTERM) == before


def test_embed_refuses_a_bare_string():
    """server.embed("hello") embedded each character of the string (list("hello")) without a word."""
    from energon_jax.serving import Server

    with Server(FakeBert(), max_batch_size=4, name="fake") as server:
        for bad in ("hello", b"hello", [1, 2, 3], (1, 2), [np.int64(4)]):
            with pytest.raises(TypeError, match="inputs must be a list of str, .* wrap a single input in a list"):
                server.embed(bad)
        assert server.embed(["hello"], timeout=10).tolist() == [[5.0, 1.0]]
        assert server.embed([[1, 2, 3], [4]], timeout=10).tolist() == [[3.0, 1.0], [1.0, 1.0]]


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_batch_size=True), r"max_batch_size=True must be an int >= 1"),
    (dict(max_batch_size=0), r"max_batch_size=0 must be an int >= 1"),
    (dict(max_queue=True), r"max_queue=True must be an int >= 0"),
    (dict(max_queue=-1), r"max_queue=-1 must be an int >= 0"),
    (dict(switch_interval=True), r"switch_interval=True must be a number of seconds > 0, or None"),
    (dict(switch_interval=float("inf")), r"switch_interval=inf must be"),
    (dict(embed_max_wait="0.01"), r"embed_max_wait='0.01' must be a number of seconds >= 0"),
    (dict(embed_max_wait=float("inf")), r"embed_max_wait=inf must be"),
    (dict(embed_max_wait=float("nan")), r"embed_max_wait=nan must be"),
    (dict(embed_max_wait=-1), r"embed_max_wait=-1 must be"),
])
def test_server_options_are_checked(kwargs, match):
    """True was taken as 1 slot and switch_interval=True as 1 s; a str embed_max_wait killed the
    batcher's thread at the first request, inf raised in its queue wait."""
    from energon_jax.serving import Server

    with pytest.raises(ValueError, match=match):
        Server(FakeBert(), **kwargs)


@pytest.mark.parametrize("name", ["batch_wait", "prefill_window", "arrival_gap", "burst_gap"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.5, True, "0.1"])
def test_scheduler_seconds_must_be_finite(name, value):
    """NaN passed `value < 0` (and then acted as 0): `energon serve --batch-wait nan` started."""
    from energon_jax.serving import Scheduler

    with pytest.raises(ValueError, match=rf"{name}={value!r} must be a number of seconds >= 0"):
        Scheduler(2, context_len=8, **{name: value})
    assert Scheduler(2, context_len=8, **{name: np.float32(0.5)})  # numpy numbers are numbers


def test_serve_refuses_a_nan_batch_wait_before_loading():
    from energon_jax.serving.cli_verbs import check_serve_options

    for flag in ("batch_wait", "prefill_window"):
        with pytest.raises(ValueError, match=rf"--{flag.replace('_', '-')}=nan must be a number of seconds >= 0"):
            check_serve_options(2, 4, None, {flag: float("nan")})


@pytest.mark.parametrize("host,line", [
    ("0.0.0.0", "Uvicorn running on http://127.0.0.1:8005 (listening on 0.0.0.0, every interface; Press CTRL+C to quit)"),
    ("::", "Uvicorn running on http://[::1]:8005 (listening on ::, every interface; Press CTRL+C to quit)"),
    ("127.0.0.1", "Uvicorn running on http://127.0.0.1:8005 (Press CTRL+C to quit)"),
])
def test_uvicorns_start_line_names_the_same_url(host, line, caplog):
    """uvicorn's own line, between ours, said "Uvicorn running on http://0.0.0.0:8005"."""
    import uvicorn

    from energon_jax.serving.http import _uvicorn_server

    server = _uvicorn_server()(uvicorn.Config(lambda scope, receive, send: None, host=host, port=8005))
    uv_log = logging.getLogger("uvicorn.error")  # uvicorn's loggers do not propagate to the root
    uv_log.addHandler(caplog.handler)
    try:
        server._log_started_message([object()])
    finally:
        uv_log.removeHandler(caplog.handler)
    assert caplog.messages == [line]


@pytest.mark.parametrize("host,text", [
    ("127.0.0.1", "127.0.0.1:8000"), ("localhost", "localhost:8000"), ("0.0.0.0", "0.0.0.0:8000"),
    ("::1", "[::1]:8000"), ("::", "[::]:8000"), ("fe80::1%eth0", "[fe80::1%eth0]:8000"),
])
def test_host_port_brackets_ipv6(host, text):
    """Errors named "::1:8000", which reads as the address ::1:8000 with no port."""
    from energon_jax.serving.http import host_port

    assert host_port(host, 8000) == text


def test_listen_errors_bracket_an_ipv6_address():
    """`energon serve`'s pre-load port check, start_http and serve_http said "... listen on ::1:PORT"."""
    if not ipv6_available():
        pytest.skip("no IPv6 on this machine")
    from energon_jax.serving import Server
    from energon_jax.serving.cli_verbs import check_http_ready

    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=rf"^cannot listen on \[::1\]:{port}: "):
            check_http_ready("::1", port)
        server = Server(FakeBert(), max_batch_size=2, name="fake")
        try:
            with pytest.raises(OSError, match=rf"^the HTTP server could not listen on \[::1\]:{port} "):
                server.start_http(host="::1", port=port, log_level="critical")
            with pytest.raises(OSError, match=rf"^the HTTP server could not start on \[::1\]:{port} "):
                server.serve_http(host="::1", port=port, log_level="critical")
        finally:
            server.stop()


@pytest.mark.parametrize("warmup", [False, True])
def test_warmup_seconds_say_what_the_warm_up_compiled(warmup):
    """/health's warmup_seconds and energon_warmup_seconds reported the whole start-up's time even
    when start(warmup=False) compiled nothing: they now say 0.0, and /health's warmed_up says why."""
    from fastapi.testclient import TestClient

    from energon_jax.serving import Server
    from energon_jax.serving.http import create_app

    model = FakeBert()
    model.warmup = lambda: time.sleep(0.05)  # a warm-up that takes a while
    server = Server(model, max_batch_size=2, name="fake", tune_gc=False)
    assert (server.warmup_seconds, server.warmed_up) == (None, False)  # not started
    server.start(warmup=warmup)
    try:
        assert server.warmed_up is warmup and server.startup_seconds >= server.warmup_seconds
        if warmup:
            assert 0.05 <= server.warmup_seconds <= server.startup_seconds
        else:
            assert server.warmup_seconds == 0.0
        client = TestClient(create_app(server))  # no lifespan: the server already runs
        health = client.get("/health").json()
        assert (health["warmup_seconds"], health["warmed_up"]) == (server.warmup_seconds, warmup), health
        gauge = next(x for x in client.get("/metrics").text.splitlines() if x.startswith("energon_warmup_seconds "))
        assert float(gauge.split()[1]) == server.warmup_seconds
    finally:
        server.stop()
    # a model with no warm-up to run compiles nothing either, whatever start() is asked
    server = Server(FakeBert(), max_batch_size=2, name="fake", tune_gc=False).start(warmup=True)
    server.stop()
    assert (server.warmup_seconds, server.warmed_up) == (0.0, False)


def test_embeddings_name_the_served_model_and_refuse_another():
    """/v1/embeddings echoed the body's `model`; another model's name is now a 404 naming both."""
    from fastapi.testclient import TestClient

    from energon_jax.serving import Server
    from energon_jax.serving.http import create_app

    server = Server(FakeBert(), max_batch_size=2, name="fake", tune_gc=False).start(warmup=False)
    try:
        client = TestClient(create_app(server))  # no lifespan: the server already runs
        for extra in ({}, {"model": "fake"}):
            r = client.post("/v1/embeddings", json={"input": ["abc"], "normalize": False, **extra})
            assert r.status_code == 200 and r.json()["model"] == "fake", r.text
            assert r.json()["data"][0]["embedding"] == [3.0, 1.0]
        r = client.post("/v1/embeddings", json={"input": ["abc"], "model": "text-embedding-3-small"})
        assert r.status_code == 404, r.text
        assert r.json()["error"] == {"message": "model 'text-embedding-3-small' is not served here: this server "
                                                "serves 'fake' (send model='fake', or leave model out)",
                                     "type": "invalid_request_error", "code": 404}
    finally:
        server.stop()


# `energon serve` (cli_verbs._run) around FakeBert, in a process of its own: argv[1] is the port;
# argv[2] "hang" gives the model a warm-up that never ends (a compile still running)
SERVE_FAKE_BERT = """
import sys, threading
sys.path.insert(0, {tests!r})
from test_serving_startup import FakeBert
from energon_jax.serving import cli_verbs
model = FakeBert()
if sys.argv[2] == "hang":
    model.warmup = threading.Event().wait
cli_verbs._setup_logging("info")
sys.exit(cli_verbs._run(model, host="127.0.0.1", port=int(sys.argv[1]), max_batch_size=2, max_queue=4,
                        name="fake", shutdown_timeout=5))
""".format(tests=os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("warm_up", ["done", "hang"])
def test_sigterm_runs_what_follows_serve_http_and_still_ends_by_the_signal(warm_up):
    """uvicorn raises SIGTERM again once it has shut down, and the default handler ended the process
    there: nothing after serve_http in cli_verbs._run ran (its stop, its last log lines). Now it does,
    and the process still ends by SIGTERM, 143 to a shell (README's exit codes), also while the
    warm-up runs (no interpreter exit under it)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVE_FAKE_BERT, str(port), warm_up], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    wait_for = "ready: " if warm_up == "done" else "Uvicorn running on "
    try:
        lines = []
        for line in proc.stdout:  # until that line (or the end of a process that failed)
            lines.append(line)
            if wait_for in line:
                break
        assert wait_for in lines[-1], "".join(lines)
        if warm_up == "done":
            r = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": ["abc"], "normalize": False},
                           timeout=10)
            assert r.status_code == 200 and r.json()["data"][0]["embedding"] == [3.0, 1.0], r.text
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines) + rest
    assert proc.returncode == -signal.SIGTERM, text
    after = text[text.index("Finished server process"):].splitlines()[1:]  # uvicorn's last line
    expected = ["terminated (SIGTERM); stopped"] + (["exiting during the warm-up"] if warm_up == "hang" else [])
    assert [x.split(" energon_jax.serving: ", 1)[-1] for x in after] == expected, text
    assert "Traceback" not in text and ("ready: " in text) == (warm_up == "done"), text


class GatedBert(FakeBert):
    """A FakeBert whose warm-up waits for `go` (or raises `error`) and counts its runs."""

    def __init__(self, error: Exception | None = None):
        super().__init__()
        self.began, self.go, self.error = threading.Semaphore(0), threading.Event(), error
        self.warmup = self._gated

    def _gated(self):
        self.warmed += 1
        self.began.release()
        assert self.go.wait(30)
        if self.error is not None:
            raise self.error


def wait_health(url, status, timeout=30.0):
    end = time.monotonic() + timeout
    while True:
        r = httpx.get(url + "/health", timeout=5)
        if r.status_code == status or time.monotonic() > end:
            return r
        time.sleep(0.02)


def batcher_threads() -> int:
    return sum(t.name == "energon-embedding-batcher" and t.is_alive() for t in threading.enumerate())


def test_every_front_end_logs_its_ready_line(caplog):
    """A second front end started while the first one's warm-up ran (or after it) never said
    "ready: URL" for its address."""
    from energon_jax.serving import Server
    from energon_jax.serving.http import ready_message

    model = GatedBert()
    server = Server(model, max_batch_size=2, name="fake", tune_gc=False)
    ports = [free_port() for _ in range(3)]
    try:
        with caplog.at_level(logging.INFO, logger="energon_jax.serving"):
            server.start_http(port=ports[0])
            assert model.began.acquire(timeout=10)
            server.start_http(port=ports[1])  # while the first warms up
            model.go.set()
            end = time.monotonic() + 10
            while time.monotonic() < end and sum("ready: " in m for m in caplog.messages) < 2:
                time.sleep(0.02)
            server.start_http(port=ports[2])  # once it runs
        ready = sorted(m for m in caplog.messages if m.startswith("ready: "))
        assert ready == sorted(ready_message("127.0.0.1", p, "bert") for p in ports), caplog.messages
    finally:
        model.go.set()
        server.stop()


def test_a_port_in_use_starts_no_warm_up_and_a_retry_starts_the_server_once():
    """start_http on a busy port left its warm-up running, and a retry on another port started a
    second: two engine loops then shared one decode state (requests failed with "Buffer has been
    deleted or donated" or got another's tokens). The warm-up now starts once the port is bound,
    and a second front end while one warms up starts nothing more."""
    from energon_jax.serving import Server

    model = GatedBert()
    server = Server(model, max_batch_size=2, name="fake", tune_gc=False)
    before = batcher_threads()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(OSError, match="could not listen"):
            server.start_http(port=busy.getsockname()[1], log_level="critical")
    assert (model.warmed, server.warmup_thread, server.starting) == (0, None, False)
    try:
        first = server.start_http(port=free_port())
        assert model.began.acquire(timeout=10)
        assert server.starting and wait_health(first.url, 503, 0).json()["status"] == "starting"
        second = server.start_http(port=free_port())  # while the first warms up
        assert server.start_in_background() is None  # nor by any other route
        model.go.set()
        for http in (first, second):
            assert wait_health(http.url, 200).json()["status"] == "ok"
            r = httpx.post(http.url + "/v1/embeddings", json={"input": ["abc"], "normalize": False}, timeout=10)
            assert r.json()["data"][0]["embedding"] == [3.0, 1.0]
        assert model.warmed == 1 and batcher_threads() == before + 1
    finally:
        model.go.set()
        server.stop()
    assert batcher_threads() == before


def test_stop_during_the_warm_up_starts_nothing_after_it():
    """stop() while the background warm-up compiled: the warm-up went on to start the engine loop
    and tune the process (GC freeze, switch interval) of a server that had been stopped."""
    import gc

    from energon_jax.serving import Server
    from energon_jax.serving.api import _GCTuning
    from energon_jax.serving.scheduler import ShuttingDown

    model = GatedBert()
    interval, users, batchers = sys.getswitchinterval(), _GCTuning._users, batcher_threads()
    server = Server(model, max_batch_size=2, name="fake", switch_interval=0.0007)
    thread = server.start_in_background()
    assert server.start_in_background() is None  # one start at a time
    assert model.began.acquire(timeout=10)
    server.stop()
    model.go.set()
    thread.join(10)
    assert not thread.is_alive() and not server.ready and server.batcher is None
    assert batcher_threads() == batchers and server.start_error is None
    assert sys.getswitchinterval() == interval and _GCTuning._users == users
    if users == 0:
        assert gc.get_freeze_count() == 0
    with pytest.raises(ShuttingDown, match="has been stopped; a Server starts once: make a new one"):
        server.start()  # it started nothing and served nothing before
    with pytest.raises(ShuttingDown, match="not running"):
        server.embed([["a"]])


def test_a_failed_warm_up_reports_failed_and_a_later_start_can_succeed():
    """A warm-up that raised left /health at 503 "starting" with Retry-After, for ever."""
    from fastapi.testclient import TestClient

    from energon_jax.serving import Server
    from energon_jax.serving.http import create_app
    from energon_jax.serving.scheduler import ShuttingDown

    model = GatedBert(error=RuntimeError("RESOURCE_EXHAUSTED: out of memory"))
    model.go.set()
    server = Server(model, max_batch_size=2, name="fake", tune_gc=False)
    with TestClient(create_app(server, stop_server=False)) as client:  # its lifespan starts the server
        server.warmup_thread.join(10)
        r = client.get("/health")
        assert r.status_code == 503 and "retry-after" not in r.headers
        assert r.json() == {"status": "failed", "model": "fake",
                            "error": "start-up failed: RuntimeError: RESOURCE_EXHAUSTED: out of memory; "
                                     "see the server log"}
        r = client.post("/v1/embeddings", json={"input": ["abc"]})
        assert r.status_code == 503 and "retry-after" not in r.headers
        assert "start-up failed (RuntimeError: RESOURCE_EXHAUSTED" in r.json()["error"]["message"]
        with pytest.raises(ShuttingDown, match=r"the start-up of fake failed \(RuntimeError"):
            server.embed([["a"]])
        model.error = None  # the cause mended: start() tries again
        server.start()
        assert client.get("/health").json()["status"] == "ok" and server.start_error is None
        assert client.post("/v1/embeddings", json={"input": ["abc"], "normalize": False}).status_code == 200
    server.stop()


def test_start_waits_for_a_start_in_progress():
    """`with server:` (or start()) while start_http's warm-up runs waits for it instead of starting
    a second engine."""
    from energon_jax.serving import Server

    model = GatedBert()
    server = Server(model, max_batch_size=2, name="fake", tune_gc=False)
    server.start_in_background()
    assert model.began.acquire(timeout=10)
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (server.start(), done.set()))
    waiter.start()
    assert not done.wait(0.3)  # blocked behind the warm-up
    model.go.set()
    assert done.wait(10) and server.ready and model.warmed == 1
    with server:  # runs already: nothing more
        assert model.warmed == 1 and server.embed([[1, 2]])[0, 0] == 2.0
    assert not server.ready


def test_switch_interval_stays_set_until_the_last_server_stops():
    """Each server saved the interval it found and put it back at its stop: servers stopped in the
    order they started left the first one's interval set after both had stopped (and the first
    stop put Python's default back under a server still running)."""
    from energon_jax.serving import Server

    before = sys.getswitchinterval()
    a = Server(FakeBert(), max_batch_size=2, tune_gc=False, switch_interval=0.0009).start()
    b = Server(FakeBert(), max_batch_size=2, tune_gc=False, switch_interval=0.0007).start()
    c = Server(FakeBert(), max_batch_size=2, tune_gc=False, switch_interval=None).start()
    d = None
    try:
        assert sys.getswitchinterval() == pytest.approx(0.0007)  # the smallest asked for
        a.stop()
        a.stop()  # a second stop releases nothing more
        assert sys.getswitchinterval() == pytest.approx(0.0007)  # b still runs
        d = Server(FakeBert(), max_batch_size=2, tune_gc=False, switch_interval=0.0011).start()
        assert sys.getswitchinterval() == pytest.approx(0.0007)
        b.stop()
        assert sys.getswitchinterval() == pytest.approx(0.0011)  # c asked for none
    finally:
        for s in (a, b, c, d):
            if s is not None:
                s.stop()
    assert sys.getswitchinterval() == before
