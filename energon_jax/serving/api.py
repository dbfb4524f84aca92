"""In-process serving for scripts and notebooks: `Server` around a loaded model.

    with ej.Server(model, max_batch_size=16) as server:       # compiles every bucket, starts the loop
        handle = server.submit("def add(a, b):", max_tokens=32)
        for delta in handle:                                   # streamed as tokens arrive
            print(delta.text, end="")
        print(handle.result().finish_reason)
        outs = server.generate(["a", "b"], max_tokens=8)      # many requests, continuously batched

`server.serve_http(host, port)` puts the same server behind the HTTP routes (serving/http.py).
"""
from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import os
import queue
import sys
import threading
import time
import weakref

from energon_jax.engine.bert import check_input_batch
from energon_jax.engine.gpt import GenerationOutput
from energon_jax.engine.sampling import is_finite_number, resolve_seed, validate_sampling
from energon_jax.runtime.checks import check_int
from energon_jax.serving.scheduler import Delta, SamplingOptions, Scheduler, ShuttingDown, check_timeout

log = logging.getLogger(__name__)


def check_host(host, name: str = "host") -> str:
    """An address to listen on: a non-empty str."""
    if not isinstance(host, str) or not host.strip():
        raise ValueError(f"{name}={host!r} must be a non-empty address, e.g. '127.0.0.1' or '0.0.0.0'")
    return host


def check_port(port, name: str = "port") -> int:
    """A TCP port to listen on: 99999 was taken modulo 65536 by the socket, without a word."""
    return check_int(name, port, 1, 65535)


def check_shutdown_timeout(value, name: str = "shutdown_timeout") -> float:
    """How long SIGTERM lets requests in flight finish: a finite number of seconds >= 0 (0: end them
    at once). A negative one handed uvicorn a graceful-shutdown limit below its 5 s margin, inf or
    NaN a drain that never ends."""
    if not (is_finite_number(value) and value >= 0):
        raise ValueError(f"{name}={value!r} must be a number of seconds >= 0")
    return float(value)


class _Mailbox:
    """Hands the engine thread's deltas to one asyncio loop with one wake-up per batch: an engine
    iteration streams a delta to every running request, and a `call_soon_threadsafe` each (a
    self-pipe write and a GIL hand-off) cost the event loop that serves HTTP once per request
    per iteration."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = weakref.ref(loop)  # the registry's key: a strong reference would keep it forever
        self._lock = threading.Lock()
        self._items: list = []

    def post(self, q: asyncio.Queue, delta: Delta) -> None:  # the engine loop's thread
        loop = self._loop()
        with self._lock:
            if loop is None or loop.is_closed():  # nobody is listening any more
                self._items.clear()
                return
            self._items.append((q, delta))
            if len(self._items) > 1:  # a delivery is already scheduled and has not run yet
                return
        try:
            loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # closed in the meantime
            with self._lock:
                self._items.clear()

    def _deliver(self) -> None:  # the event loop's thread
        with self._lock:
            items, self._items = self._items, []
        for q, delta in items:
            q.put_nowait(delta)


class _GCTuning:
    """Process-wide garbage-collector settings while at least one Server runs (counted, so that
    servers started and stopped in any order restore the settings once, at the last stop).

    After warm-up every object alive (the model, jax, the libraries: millions) is frozen out of
    the collector's scans (`gc.freeze`), and the youngest generation collects every 20,000 net
    allocations instead of 700. Without this a full collection took 130-150 ms of the HTTP event
    loop in about one 64-request burst in three, and young collections ~50-90 us per request
    (measured on the 2-core CI machine with benchmarks/serve.py's tiny model). The last stop
    restores the thresholds and unfreezes, unless something had frozen objects before the first
    start: `gc` cannot unfreeze only ours, so then everything stays frozen rather than undoing
    the caller's freeze. Cyclic garbage among frozen objects is not collected while frozen."""

    GEN0_THRESHOLD = 20_000
    _lock = threading.RLock()
    _users = 0
    _saved: tuple | None = None
    _frozen_before = False

    @classmethod
    def acquire(cls) -> None:  # a Server's start
        with cls._lock:
            cls._users += 1
            if cls._users == 1:
                cls._saved = gc.get_threshold()
                cls._frozen_before = gc.get_freeze_count() > 0
                gc.collect()
                gc.freeze()
                gc.set_threshold(max(cls._saved[0], cls.GEN0_THRESHOLD), *cls._saved[1:])

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            cls._users -= 1
            if cls._users == 0 and cls._saved is not None:
                gc.set_threshold(*cls._saved)
                if not cls._frozen_before:
                    gc.unfreeze()
                cls._saved = None


class _SwitchInterval:
    """Python's thread switch interval while Servers that set one run (process-wide, counted as
    `_GCTuning` is): the smallest interval any running one asked for, and the interval found at
    the first start restored at the last stop (saved and restored per server, two servers stopped in
    the order they started left the first one's interval set after both had stopped)."""

    _lock = threading.Lock()
    _active: list[float] = []
    _saved: float | None = None

    @classmethod
    def acquire(cls, interval: float) -> None:
        with cls._lock:
            if not cls._active:
                cls._saved = sys.getswitchinterval()
            cls._active.append(interval)
            sys.setswitchinterval(min(cls._active))

    @classmethod
    def release(cls, interval: float) -> None:
        with cls._lock:
            cls._active.remove(interval)
            sys.setswitchinterval(min(cls._active) if cls._active else cls._saved)


_mailboxes: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox]" = weakref.WeakKeyDictionary()
_mailboxes_lock = threading.Lock()


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    with _mailboxes_lock:
        box = _mailboxes.get(loop)
        if box is None:
            box = _mailboxes[loop] = _Mailbox(loop)
        return box


class RequestHandle:
    """One submitted generation: iterate for `Delta`s (blocking, or `async for` when submitted with
    an asyncio loop), `result()` for the whole output, `cancel()` to free its slot."""

    def __init__(self, server: "Server", prompt_ids: list[int], aio_loop: asyncio.AbstractEventLoop | None = None):
        self._server = server
        self.prompt_ids = prompt_ids
        self.request_id: str | None = None
        self.token_ids: list[int] = []
        self.text: str | None = None if server.detokenize is None else ""
        self.finish_reason: str | None = None
        self.error: str | None = None
        self._done = threading.Event()
        self._mailbox = _mailbox(aio_loop) if aio_loop is not None else None
        self._queue = asyncio.Queue() if aio_loop is not None else queue.Queue()

    def _sink(self, delta: Delta) -> None:  # the engine loop's thread
        self.token_ids.extend(delta.token_ids)
        if delta.text is not None:
            self.text += delta.text
        if delta.finished:
            self.finish_reason, self.error = delta.finish_reason, delta.error
            self._done.set()
        if self._mailbox is not None:
            self._mailbox.post(self._queue, delta)
        else:
            self._queue.put(delta)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def __iter__(self):
        while True:
            delta = self._queue.get()
            yield delta
            if delta.finished:
                return

    async def __aiter__(self):
        while True:
            delta = await self._queue.get()
            yield delta
            if delta.finished:
                return

    def result(self, timeout: float | None = None) -> GenerationOutput:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        if self.error:
            raise RuntimeError(f"request {self.request_id} failed: {self.error}")
        return GenerationOutput(self.text, list(self.token_ids), self.finish_reason)

    def cancel(self) -> bool:
        return self._server.cancel(self.request_id)


# Server options that only one kind of model uses: a GPT Server's decode slots, prefill batching and
# request timeout (a generation ends with finish_reason "timeout"), a Bert Server's embedding batcher.
_GPT_ONLY = ("decode_steps", "cache_len", "request_timeout", "max_prefill_tokens", "max_prefill_batch",
             "prefill_batch_tokens", "batch_wait", "prefill_window", "overlap")
_BERT_ONLY = ("embed_max_wait",)


def check_kind_options(kind: str, options: dict) -> None:
    """Refuse a Server option set away from its default on the kind of model ("gpt" or "bert") it
    does not apply to (it would be ignored without a word); options left out are at their defaults.
    The CLI calls it before a model loads, when the kind is read from the model's config."""
    defaults = {k: p.default for k, p in inspect.signature(Server.__init__).parameters.items()}
    foreign, other = (_BERT_ONLY, "Bert") if kind == "gpt" else (_GPT_ONLY, "GPT")
    given = [f"{k}={options[k]!r}" for k in foreign if k in options and options[k] != defaults[k]]
    if given:
        raise ValueError(f"{', '.join(given)}: only a {other} model's Server uses "
                         f"{'it' if len(given) == 1 else 'them'}; this model is {kind}")


class Server:
    """Serve one loaded model in this process: continuous batching for GPT models (decode slots),
    batched encoding for Bert models.

    max_batch_size: decode slots (concurrent generations); for a Bert model, the sequences an
    embedding batch gathers and one packed chunk holds (`BertModel.fixed_shapes`, whose programs
    start() compiles). max_queue: requests waiting for a slot beyond that (a full queue raises
    QueueFull). decode_steps: most decode steps per dispatch.
    cache_len: positions per slot (default: the model's max_seq_len); prompt + max_tokens must fit.
    request_timeout: seconds (> 0) after which a request is ended with finish_reason "timeout"; None: never.
    max_prefill_tokens: prompt tokens admitted per engine iteration when every slot is busy (the
    first waiting request whatever its length); more while fewer requests run (`Scheduler.prefill_budget`).
    max_prefill_batch / prefill_batch_tokens: prompts admitted together are prefilled in batches of
    up to this many rows and rows x bucketed length tokens (each such shape is compiled at start;
    None: 16 on GPUs, 1 on CPU, see `engine.slots.default_prefill_batch`).
    batch_wait: while the engine is idle, requests arriving within 2 ms of each other are gathered
    for up to this many seconds and start as one batch (`Scheduler.admission_delay`); 0: at once.
    switch_interval: Python's thread switch interval while the server runs (process-wide: the smallest
    of the running servers', restored when the last of them stops, `_SwitchInterval`; None leaves it). The engine loop and the HTTP event loop take turns at the GIL, and at
    Python's default 5 ms each can wait that long for the other: GPT-2 medium served 73% of offline
    throughput at 0.5 ms against 68% at 5 ms (H100, benchmarks/serve.py, BENCHMARKS.md).
    overlap: dispatch each engine iteration before reading back the previous one's tokens, so
    the device does not wait on the host (`serving.loop.EngineLoop`); False waits every iteration.
    prefill_window: after an idle engine admits requests, it only prefills (no decode steps) while
    free slots remain and requests keep arriving within 10 ms of each other, for up to this many
    seconds, so that a burst joins one decode batch (`Scheduler._decode_held`); 0: off.
    tune_gc: after warm-up, freeze the objects alive then out of Python's garbage collections and
    collect the young generation less often, until the last running Server stops (`_GCTuning`).
    """

    def __init__(self, model, *, max_batch_size: int = 16, max_queue: int = 64, decode_steps: int = 8,
                 cache_len: int | None = None, request_timeout: float | None = None,
                 max_prefill_tokens: int = 4096, max_prefill_batch: int | None = None, prefill_batch_tokens: int = 8192,
                 embed_max_wait: float = 0.005, name: str | None = None, overlap: bool = True,
                 batch_wait: float = 0.02, switch_interval: float | None = 0.0005, tune_gc: bool = True,
                 prefill_window: float = 0.1):
        options = dict(locals())  # the arguments, for check_kind_options (before any other name is bound)
        from energon_jax.serving.metrics import Metrics

        self.model = model
        self.overlap = bool(overlap)
        self.tune_gc = bool(tune_gc)
        self._gc_tuned = False
        # a bool is no interval (True set 1 s), nor inf (setswitchinterval took it as 0)
        if switch_interval is not None and not (is_finite_number(switch_interval) and switch_interval > 0):
            raise ValueError(f"switch_interval={switch_interval!r} must be a number of seconds > 0, or None")
        self.switch_interval = switch_interval
        self._switch_set = False
        self.name = name or os.path.basename(str(getattr(model, "source", "")).rstrip("/")) or "model"
        self.kind = "gpt" if hasattr(model, "generate") else "bert" if hasattr(model, "encode") else None
        if self.kind is None:
            raise TypeError(f"{type(model).__name__} has neither generate (GPT) nor encode (Bert)")
        check_kind_options(self.kind, options)
        self.max_batch_size = check_int("max_batch_size", max_batch_size, 1)  # True was taken as 1
        self.max_queue = check_int("max_queue", max_queue, 0)
        self.request_timeout = check_timeout(request_timeout, "request_timeout")
        tok = getattr(model, "tokenizer", None)
        self.detokenize = tok.decode if tok is not None else None
        self.ready = False
        self.stopping = False
        # start(), start_in_background() and stop() under one lock: a second start while one ran
        # (a retried start_http) made two engine loops share one decode state, and a stop() during
        # the warm-up was undone when the warm-up went on to start the loop
        self._lifecycle = threading.Condition()
        self._starting = False
        self._on_ready: list = []  # start_in_background's callbacks for the start in progress
        self.start_error: str | None = None  # why the last start failed (None: it did not)
        self.warmup_thread: threading.Thread | None = None  # start_in_background's
        # set by start(): seconds the warm-up compiled for (0.0 when it compiled nothing), whether
        # it ran, and the whole start's seconds
        self.warmup_seconds: float | None = None
        self.warmed_up = False
        self.startup_seconds: float | None = None
        self.engine = self.scheduler = self.loop = self.batcher = self.encoder = None
        self._http: list = []  # start_http's servers
        if self.kind == "gpt":
            from energon_jax.engine.slots import SlotEngine

            self.engine = SlotEngine(model, self.max_batch_size, decode_steps=decode_steps, cache_len=cache_len,
                                     max_prefill_batch=max_prefill_batch, prefill_batch_tokens=prefill_batch_tokens)
            self.context_len = self.engine.cache_len
            self.scheduler = Scheduler(self.max_batch_size, max_queue=self.max_queue, context_len=self.context_len,
                                       detokenize=self.detokenize, decode_step_options=self.engine.step_options,
                                       max_prefill_tokens=max_prefill_tokens, batch_wait=batch_wait,
                                       prefill_window=prefill_window)
            self.metrics = Metrics(lambda: self.scheduler.queue_depth, lambda: self.scheduler.slots_in_use,
                                   self.max_batch_size)
            self.scheduler.on_finish = self.metrics.record_finished
            self.scheduler.on_tokens = self.metrics.record_tokens
        else:
            # checked here: a str failed the batcher's thread at the first request (the server
            # then failed), inf raised in its queue wait, NaN never waited
            if not (is_finite_number(embed_max_wait) and embed_max_wait >= 0):
                raise ValueError(f"embed_max_wait={embed_max_wait!r} must be a number of seconds >= 0")
            self.context_len = model.max_seq_len
            # chunks of at most max_batch_size sequences: one program per token bucket, all warmed up
            self.encoder = model.fixed_shapes(self.max_batch_size) if hasattr(model, "fixed_shapes") else model
            self.metrics = Metrics(num_slots=self.max_batch_size)
            self._embed_args = dict(max_batch=self.max_batch_size, max_wait=embed_max_wait, max_queue=self.max_queue)

    # ------------------------------------------------------------- lifecycle
    def start(self, warmup: bool = True) -> "Server":
        """Compile every bucket (unless warmup=False), then start the background loop. Returns at once
        when the server runs already; waits for a start in progress in another thread (and starts
        again if that one failed). A stopped Server does not start again: make a new one."""
        if self._claim_start(wait=True):
            self._start_claimed(warmup)
        return self

    def start_in_background(self, warmup: bool = True, on_ready=None) -> threading.Thread | None:
        """start() on a daemon thread, kept as `warmup_thread` (a process leaving while it compiles
        must not wait on it, cli_verbs._run); None when the server runs or is starting already. A
        failed start is logged and kept in `start_error` (/health answers "failed"). on_ready()
        runs once the server is up: at once if it runs already, after the start in progress if
        there is one."""
        with self._lifecycle:
            claimed = self._claim_start(wait=False)
            if on_ready is not None and (claimed or self._starting):  # run by the start that succeeds
                self._on_ready.append(on_ready)
                on_ready = None
        if on_ready is not None:  # it runs already
            on_ready()
        if not claimed:
            return None

        def run():
            try:
                self._start_claimed(warmup)
            except ShuttingDown as e:
                log.info("%s", e)
            except Exception:
                log.exception("start-up of %s failed", self.name)

        self.warmup_thread = threading.Thread(target=run, name="energon-warmup", daemon=True)
        self.warmup_thread.start()
        return self.warmup_thread

    @property
    def starting(self) -> bool:
        """A start (its warm-up) is in progress."""
        return self._starting

    def _claim_start(self, wait: bool) -> bool:
        """True if the caller is to start this server; False when it runs already (or, with
        wait=False, another start is in progress)."""
        with self._lifecycle:
            while wait and self._starting:
                self._lifecycle.wait()
            if self.stopping:
                raise ShuttingDown(f"the server for {self.name} has been stopped; a Server starts once: "
                                   "make a new one")
            if self.ready or self._starting:
                return False
            self._starting, self.start_error = True, None
            return True

    def _start_claimed(self, warmup: bool) -> None:
        from energon_jax.serving.loop import EmbeddingBatcher, EngineLoop, SlotExecutor

        try:
            t0 = time.perf_counter()
            warmed = bool(warmup) and (self.kind == "gpt" or hasattr(self.encoder, "warmup"))
            warm_s = 0.0  # nothing compiled without a warm-up: /health and the metric say 0, not the start-up time
            if warmed:
                t_warm = time.perf_counter()
                (self.engine if self.kind == "gpt" else self.encoder).warmup()
                warm_s = time.perf_counter() - t_warm
            with self._lifecycle:
                if self.stopping:  # stop() ran during the warm-up: nothing is started behind its back
                    raise ShuttingDown(f"the server for {self.name} was stopped during its warm-up; it did not start")
                if self.kind == "gpt":
                    worker = self.loop = EngineLoop(self.scheduler, SlotExecutor(self.engine), self.metrics,
                                                    overlap=self.overlap)
                else:
                    worker = self.batcher = EmbeddingBatcher(self.encoder, metrics=self.metrics, **self._embed_args)
                if self.switch_interval is not None:
                    _SwitchInterval.acquire(self.switch_interval)
                    self._switch_set = True
                if self.tune_gc:
                    _GCTuning.acquire()
                    self._gc_tuned = True
                worker.start()  # the last step that can fail: a start that raised leaves no thread running
                self.startup_seconds = time.perf_counter() - t0
                self.warmup_seconds, self.warmed_up = warm_s, warmed
                self.metrics.warmup_seconds.set(warm_s)
                self.ready = True
                on_ready, self._on_ready = self._on_ready, []
        except ShuttingDown:
            raise
        except BaseException as e:
            self.start_error = f"{type(e).__name__}: {e}"
            self.loop = self.batcher = None
            self._release_process_settings()
            raise
        finally:
            with self._lifecycle:
                self._starting = False
                if not self.ready:
                    self._on_ready = []
                self._lifecycle.notify_all()
        # not "ready": behind HTTP, the routes log the one "ready: URL (routes)" line right after this
        capacity = (f"{self.max_batch_size} slots" if self.kind == "gpt"
                    else f"embedding batches of {self.max_batch_size} sequences")
        done = (f"warmed up in {self.warmup_seconds:.1f} s" if warmed else
                f"started in {self.startup_seconds:.1f} s, without a warm-up (each shape compiles on first use)")
        log.info("%s (%s) %s: %s, queue %d", self.name, self.kind, done, capacity, self.max_queue)
        for callback in on_ready:
            callback()

    def stop(self, drain_timeout: float = 0.0) -> None:
        """Stop admitting, let requests in flight finish for up to `drain_timeout` s, then end the rest
        (finish_reason "error"). A warm-up in progress goes on compiling (nothing interrupts it) but
        starts nothing after."""
        with self._lifecycle:  # after this, a start in progress sees it and starts no loop
            self.stopping = True
        if self.loop is not None:
            if drain_timeout > 0:
                self.loop.drain(drain_timeout)
            self.loop.stop()
        if self.batcher is not None:
            self.batcher.stop()
        # then start_http's routes: the requests still streaming have just ended, so their
        # connections close at once
        for http in self._http:
            http.stop()
        self._http.clear()
        self._release_process_settings()
        self.ready = False

    def _release_process_settings(self) -> None:
        """The switch interval and GC settings this server holds, released once (stop() may run in
        two threads at once: the drain and the lifespan)."""
        with self._lifecycle:
            switch, self._switch_set = self._switch_set, False
            gc_tuned, self._gc_tuned = self._gc_tuned, False
        if switch:
            _SwitchInterval.release(self.switch_interval)
        if gc_tuned:
            _GCTuning.release()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def accepting(self) -> bool:
        return self.ready and not self.stopping and not self.failed

    @property
    def failed(self) -> bool:
        """Started and not stopped, but its background thread (decode loop or embedding batcher)
        has ended after an error it could not recover from: nothing is served any more."""
        worker = self.loop if self.kind == "gpt" else self.batcher
        return self.ready and not self.stopping and worker is not None and not worker.alive

    # ------------------------------------------------------------ generation
    def _require(self, kind: str, what: str) -> None:
        if self.kind != kind:
            raise ValueError(f"{what} needs a {'GPT' if kind == 'gpt' else 'Bert'} model; "
                             f"{self.name} is a {self.kind} model")
        if self.start_error is not None and not self.ready and not self.stopping:
            raise ShuttingDown(f"the start-up of {self.name} failed ({self.start_error}); see the log")
        if not self.ready or self.stopping:
            raise ShuttingDown(f"the server for {self.name} is not running")
        if self.failed:
            raise ShuttingDown(f"the engine thread of {self.name} stopped after an error (see the server log); "
                               "restart the server")

    def submit(self, prompt, *, max_tokens: int = 16, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               seed: int | None = None, stop=None, timeout: float | None = None,
               aio_loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue one prompt (str, or a list of token ids). Raises ValueError for bad input, QueueFull
        when the queue is full, ShuttingDown when stopped."""
        self._require("gpt", "generation")
        max_tokens = check_int("max_tokens", max_tokens, 1)
        validate_sampling(temperature, top_k, top_p)
        prompt_ids = self.encode_prompt(prompt)
        stop_ids, stop_strings = self.model.stop_token_ids(stop)
        seed = resolve_seed(seed)
        options = SamplingOptions(max_tokens, float(temperature), int(top_k), float(top_p), seed,
                                  tuple(stop_ids), tuple(stop_strings))
        handle = RequestHandle(self, prompt_ids, aio_loop)
        req = self.scheduler.add_request(prompt_ids, options, sink=handle._sink,
                                         timeout=timeout if timeout is not None else self.request_timeout)
        handle.request_id = req.request_id
        return handle

    def encode_prompt(self, prompt) -> list[int]:
        """One prompt (str, or a list of token ids) as token ids, checked as `submit` takes it: bad
        input raises ValueError or TypeError naming `prompt` (the model's batch check named it
        prompts[0], a field nobody sent)."""
        if isinstance(prompt, (list, tuple)) and not prompt:
            raise ValueError("prompt is empty; it needs at least one token")
        try:
            return self.model.encode_prompts([prompt])[0]
        except (ValueError, TypeError) as e:
            raise (ValueError if isinstance(e, ValueError) else TypeError)(
                str(e).replace("prompts[0]", "prompt")) from None

    def cancel(self, request_id: str | None) -> bool:
        return request_id is not None and self.scheduler is not None and self.scheduler.cancel(request_id)

    def generate(self, prompts, **kwargs) -> list[GenerationOutput]:
        """Submit every prompt at once and wait for all (same sampling settings for each). With a
        seed, prompt i samples with seed + i, as row i of `GPTModel.generate` does, so both give
        the same tokens (and repeated prompts are not all alike); in 16-bit dtypes only up to
        rounding, which differs between programs of different row counts (README, Python API)."""
        seed = kwargs.pop("seed", None)
        if seed is not None:
            seed = resolve_seed(seed)
        handles = []
        try:
            for i, p in enumerate(prompts):
                handles.append(self.submit(p, **kwargs, seed=None if seed is None else (seed + i) & 0xFFFFFFFF))
            return [h.result() for h in handles]
        except BaseException:  # a bad prompt, a full queue, a failed request, Ctrl-C: the others ran for nobody
            for h in handles:
                h.cancel()
            raise

    # ------------------------------------------------------------- encoding
    def embed_async(self, inputs, *, pooling: str = "mean", normalize: bool = False):
        """A concurrent.futures.Future of `model.encode(inputs, pooling=, normalize=)`, batched with
        other requests (the model checks pooling; a bad value fails the future with ValueError).
        inputs: a list of str, (str, str) pairs or token-id lists, as `BertModel.encode` takes."""
        self._require("bert", "embeddings")
        check_input_batch(inputs, "inputs")  # the batcher would take a str as the list of its characters
        return self.batcher.submit(inputs, pooling, normalize)

    def embed(self, inputs, *, pooling: str = "mean", normalize: bool = False, timeout: float | None = None):
        return self.embed_async(inputs, pooling=pooling, normalize=normalize).result(timeout)

    # ----------------------------------------------------------------- HTTP
    def serve_http(self, host: str = "127.0.0.1", port: int = 8005, log_level: str = "info",
                   shutdown_timeout: float = 30.0) -> None:
        """Serve the HTTP routes until SIGINT/SIGTERM (blocking); starts this server if needed, and
        stops it at the end. In a thread that runs an event loop already (a Jupyter cell), use
        `start_http`."""
        from energon_jax.serving.http import run_http

        check_host(host)
        check_port(port)
        shutdown_timeout = check_shutdown_timeout(shutdown_timeout)
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # none: uvicorn can run its own here
            pass
        else:
            raise RuntimeError("serve_http blocks in an event loop of its own, and this thread runs one already "
                               "(a Jupyter kernel's?): use server.start_http(host, port), which serves from a "
                               "background thread")
        run_http(self, host=host, port=port, log_level=log_level, shutdown_timeout=shutdown_timeout)

    def start_http(self, host: str = "127.0.0.1", port: int = 8005, log_level: str = "warning"):
        """Serve the HTTP routes from a background thread and return at once (notebooks): a
        `BackgroundHTTP` with `.url` and `.stop()`. Starts this server in the background if needed
        (/health answers 503 until it is ready); stopping the HTTP leaves the server running, and
        `stop()` ends both."""
        from energon_jax.serving.http import BackgroundHTTP

        check_host(host)
        check_port(port)
        if self.stopping:
            raise ShuttingDown(f"the server for {self.name} has been stopped")
        http = BackgroundHTTP(self, host=host, port=port, log_level=log_level)
        self._http.append(http)
        return http
