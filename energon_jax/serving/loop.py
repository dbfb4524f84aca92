"""Background threads that drive the engines: the decode loop (scheduler + slot engine) and the
embedding batcher (requests gathered for a short wait, then encoded together)."""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import re
import threading
import time

import jax
import numpy as np

from energon_jax.serving.scheduler import EngineOutput, QueueFull, Scheduler, SchedulerOutput, ShuttingDown

log = logging.getLogger(__name__)


class SlotExecutor:
    """Runs a SchedulerOutput on a SlotEngine: the prefills (batched into as few dispatches as the
    compiled shapes allow), then one decode dispatch, then one read-back.

    `launch` dispatches and returns at once (jax runs the work asynchronously); `collect` waits
    for that work's tokens. `execute` is both."""

    def __init__(self, engine):
        self.engine = engine

    def launch(self, out: SchedulerOutput):
        batches = []
        work = out.prefills
        # dispatched asynchronously; the decode below uses their state on device
        for group in self.engine.group_prefills([len(p.token_ids) for p in work]):
            ps = [work[i] for i in group]
            toks = self.engine.prefill_batch(
                [p.slot for p in ps], [p.token_ids for p in ps], temperature=[p.options.temperature for p in ps],
                top_k=[p.options.top_k for p in ps], top_p=[p.options.top_p for p in ps],
                seed=[p.options.seed for p in ps])
            batches.append(([p.request_id for p in ps], toks))
        tokens = self.engine.decode(out.decode_steps, out.active) if out.decode_steps else None
        for x in [t for _, t in batches] + ([tokens] if tokens is not None else []):
            x.copy_to_host_async()  # the copy starts when the device is done, not when collect asks
        return batches, tokens

    def collect(self, launched) -> EngineOutput:
        batches, tokens = launched
        toks_host, tokens_host = jax.device_get(([t for _, t in batches], tokens))
        firsts = {}
        for (ids, _), got in zip(batches, toks_host):  # padding rows past len(ids) are dropped
            firsts.update({rid: int(got[j]) for j, rid in enumerate(ids)})
        return EngineOutput(firsts, np.asarray(tokens_host) if tokens is not None else ())

    def execute(self, out: SchedulerOutput) -> EngineOutput:
        return self.collect(self.launch(out))

    def reset(self) -> None:
        """A failed dispatch may have consumed the donated state: start from a fresh one."""
        self.engine.state = self.engine.fresh_state()


class EngineLoop:
    """schedule() -> execute() -> update_from_output(), on a daemon thread, until stopped.

    overlap (with an executor that has `launch` / `collect`): iteration n+1 is scheduled and
    dispatched before iteration n's tokens are read back, so the device works through the host's
    read-back, streaming and scheduling instead of idling (the scheduler counts tokens still on
    the way; see serving/scheduler.py). Without it, each iteration waits for its own tokens."""

    def __init__(self, scheduler: Scheduler, executor, metrics=None, name: str = "energon-engine-loop",
                 overlap: bool = True):
        self.scheduler = scheduler
        self.executor = executor
        self.metrics = metrics
        self.overlap = overlap and hasattr(executor, "launch") and hasattr(executor, "collect")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.iterations = 0
        self.failure: str | None = None  # why the thread ended on its own (then `alive` is False)
        # the last iterations as (start, scheduled, executed, updated) perf_counter times, prompts
        # prefilled, decode steps: the device idles while the host schedules and updates, and the
        # host waits for the device inside execute (benchmarks/serve.py reads this). With overlap,
        # "executed" is when the iteration's tokens were back and "updated" when they were applied.
        self.timeline: collections.deque = collections.deque(maxlen=4096)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _fail(self, outs, e: Exception) -> None:
        """An engine failure ends the requests in flight, not the server. The reset wipes every
        slot's decode state, so every other request holding a slot ends too: none may decode on
        from a zeroed cache."""
        error = f"engine error: {type(e).__name__}: {e}"
        # the request objects, not their ids: a finished one's id may name a newer request by now
        in_flight = list(dict.fromkeys(r for out in outs for r in out.slot_requests.values()))
        for req in in_flight:
            self.scheduler.end(req, "error", error)
        others = self.scheduler.fail_running("error", f"{error} (in another request's step: the engine was reset "
                                                      "and this request's decode state was lost)")
        log.exception("engine step failed; failing %d requests in flight and %d more running",
                      len(in_flight), len(others))
        self.executor.reset()

    def _finish_iteration(self, out, result, t0: float, t1: float, t2: float) -> None:
        self.scheduler.update_from_output(out, result)
        self.iterations += 1
        self.timeline.append((t0, t1, t2, time.perf_counter(), len(out.prefills), out.decode_steps))
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(sum(len(p.token_ids) for p in out.prefills))

    def _run(self) -> None:
        """Errors of the engine calls end their requests (`_fail`); any other error ends the loop:
        every request then ends with an error and new ones are refused, so none waits on a dead thread."""
        try:
            self._iterate()
        except Exception as e:
            log.exception("the engine loop stopped")
            self.failure = f"{type(e).__name__}: {e}"
            self.scheduler.stop_accepting()
            self.scheduler.fail_all("error", f"the engine loop stopped: {self.failure}")

    def _iterate(self) -> None:
        sched = self.scheduler
        pending = None  # (out, launched, t0, t1): dispatched, tokens not read back yet
        while not self._stop.is_set():
            if pending is None:
                with sched.work_available:
                    if not sched.has_work():
                        sched.work_available.wait(timeout=0.1)
                        continue
                    delay = sched.admission_delay()  # an idle engine gathers a burst of arrivals
                    if delay > 0:
                        sched.work_available.wait(timeout=delay)
                        continue
            t0 = time.perf_counter()
            out = sched.schedule()
            t1 = time.perf_counter()
            if not self.overlap:
                if out.empty:
                    time.sleep(0.001)
                    continue
                try:
                    result = self.executor.execute(out)
                except Exception as e:
                    self._fail([out], e)
                    continue
                self._finish_iteration(out, result, t0, t1, time.perf_counter())
                continue
            launched = None
            if not out.empty:
                try:
                    launched = self.executor.launch(out)
                except Exception as e:
                    self._fail([out] + ([pending[0]] if pending else []), e)
                    pending = None
                    continue
            if pending is not None:
                p_out, p_launched, p_t0, p_t1 = pending
                try:
                    result = self.executor.collect(p_launched)
                except Exception as e:
                    self._fail([p_out] + ([out] if launched is not None else []), e)
                    pending = None
                    continue
                self._finish_iteration(p_out, result, p_t0, p_t1, time.perf_counter())
            elif out.empty:
                time.sleep(0.001)
            pending = (out, launched, t0, t1) if launched is not None else None

    def drain(self, timeout: float) -> bool:
        """Stop admitting; wait up to `timeout` s for the requests in flight. True if all finished."""
        self.scheduler.stop_accepting()
        end = time.monotonic() + timeout
        while self.scheduler.has_work() and time.monotonic() < end and self.alive:
            time.sleep(0.01)
        return not self.scheduler.has_work()

    def stop(self) -> None:
        """Stop the thread; requests still in flight end with finish_reason "error"."""
        self.scheduler.stop_accepting()
        self._stop.set()
        with self.scheduler.work_available:
            self.scheduler.work_available.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self.scheduler.fail_all("error", "the server stopped before this request finished")


def request_error(e: BaseException, offset: int) -> BaseException:
    """The encoder's error about one request's piece, in the request's terms: the model names the
    inputs of its own call (texts_or_ids[i], texts[i]), which for a piece starting at input
    `offset` of the request is inputs[offset + i]; and a Server has no truncate= to pass."""
    if type(e) not in (ValueError, TypeError):
        return e
    message = re.sub(r"\btexts(?:_or_ids)?\[(\d+)\]", lambda m: f"inputs[{int(m.group(1)) + offset}]", str(e))
    return type(e)(message.replace("; pass truncate=True to cut it", ""))


class EmbeddingCancelled(Exception):
    """An embedding request ended by `EmbeddingBatcher.cancel` after its encoding had begun."""


class _EmbedJob:
    """One embedding request: its inputs go to batches in consecutive pieces of at most
    `max_batch` inputs, and its future gets the pieces' results joined in input order."""

    __slots__ = ("inputs", "pooling", "normalize", "future", "taken", "parts", "counted", "cancelled")

    def __init__(self, inputs: list, pooling: str, normalize: bool, future: concurrent.futures.Future):
        self.inputs, self.pooling, self.normalize, self.future = inputs, pooling, normalize, future
        self.taken = 0  # inputs handed to batches so far
        self.parts: list = []  # results of the pieces encoded so far, in order
        self.counted = True  # in the batcher's count of waiting requests (max_queue's)
        self.cancelled = False  # EmbeddingBatcher.cancel after it began: no more pieces

    def take(self, room: int) -> tuple["_EmbedJob", int, int]:
        """The next piece, (job, start, end), of at most `room` inputs."""
        start = self.taken
        self.taken = min(len(self.inputs), start + room)
        return self, start, self.taken

    @property
    def all_taken(self) -> bool:
        return self.taken >= len(self.inputs)

    def finish_piece(self, end: int, out) -> None:
        self.parts.append(out)
        if end >= len(self.inputs) and not self.future.done():
            if len(self.parts) == 1:
                result = self.parts[0]
            elif all(isinstance(p, np.ndarray) for p in self.parts):
                result = np.concatenate(self.parts)
            else:  # pooling="none": a list of [T_i, hidden] arrays
                result = [x for p in self.parts for x in p]
            self.future.set_result(result)


class EmbeddingBatcher:
    """Gathers embedding requests for up to `max_wait` s (or `max_batch` sequences), then one
    `encoder.encode(all_sequences, pooling=, normalize=)` per (pooling, normalize) group.

    A batch never holds more than `max_batch` sequences: a request with more inputs than the
    batch has room for is split across batches (its result joined in input order), so one large
    request neither makes an encode call past the size the Server warmed up for nor keeps the
    batcher in one call for as long as it likes. Batches take requests in arrival order, and the
    rest of a split request goes behind the requests that arrived while its piece was encoded:
    a small request waits behind a large one for at most the large one's piece in progress, not
    for all of it, and several large ones take turns.

    The encoder packs sequences by total tokens with no padding computed (BertModel.encode), so
    gathering concurrent requests fills one packed batch instead of many small ones.
    """

    def __init__(self, encoder, *, max_batch: int = 64, max_wait: float = 0.005, max_queue: int = 256,
                 metrics=None):
        self.encoder = encoder
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_queue = max_queue
        self.metrics = metrics
        self._queue: queue.Queue = queue.Queue()
        # requests taken off the queue with inputs not yet in a batch, in the order they get room
        # (the batcher thread's alone); their futures stay pending, so a caller can still cancel
        self._pending: collections.deque[_EmbedJob] = collections.deque()
        self._waiting = 0  # requests submitted and not yet in a batch (queued or pending): max_queue's count
        self._jobs: dict[concurrent.futures.Future, _EmbedJob] = {}  # by future, until it is settled (cancel's)
        self._accepting = True
        # submit's accepting check + count + put, stop's flag + sentinel, and the batcher's count down
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="energon-embedding-batcher", daemon=True)
        self.batches = 0

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, inputs: list, pooling: str = "mean", normalize: bool = False) -> concurrent.futures.Future:
        """inputs: list of str or list of token-id lists. The future gives what encode returns for them."""
        # one step with stop()'s: a job queued after its sentinel (and its drain) was never answered
        with self._lock:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down and admits no new requests")
            # like a GPT server's free slots: up to max_batch requests wait for the next batch
            # without counting as queued (max_queue=0 refused every request)
            if self._waiting >= self.max_batch + self.max_queue:
                raise QueueFull(f"the embedding queue is full ({self.max_queue} requests beyond the "
                                f"{self.max_batch} a batch takes); retry later")
            fut: concurrent.futures.Future = concurrent.futures.Future()
            job = _EmbedJob(list(inputs), pooling, bool(normalize), fut)
            self._jobs[fut] = job
            self._queue.put(job)
            self._waiting += 1
        fut.add_done_callback(lambda f: self._done(job))
        return fut

    def _done(self, job: _EmbedJob) -> None:
        """A job's future is settled. One cancelled while it waited (by cancel(), its caller, or an
        asyncio wrapper) frees its place in the queue at once, not when the batcher reaches it."""
        with self._lock:
            self._jobs.pop(job.future, None)
        if job.future.cancelled():
            self._uncount(job)

    def cancel(self, future: concurrent.futures.Future) -> bool:
        """End a submitted request whose caller has gone (an HTTP client that disconnected): one still
        waiting is never encoded; one whose encoding began gets no more batches (the piece in
        progress finishes) and then fails with `EmbeddingCancelled`. False if it was done already.
        Only the batcher thread settles a future once it runs, and never under a lock (a done
        callback may call back into the batcher)."""
        if future.cancel():
            return True
        with self._lock:
            job = self._jobs.get(future)
            if job is None or future.done():
                return False
            job.cancelled = True
            return True

    def _uncount(self, job: _EmbedJob) -> None:
        with self._lock:
            if job.counted:
                job.counted = False
                self._waiting -= 1

    @staticmethod
    def _fail(future: concurrent.futures.Future, error: BaseException) -> None:
        if not future.done():
            future.set_exception(error)

    def _settle_cancelled(self, job: _EmbedJob) -> bool:
        """Fail a job cancel() flagged; True if it was."""
        if job.cancelled:
            self._fail(job.future, EmbeddingCancelled("the request was cancelled while it was encoded"))
        return job.cancelled

    def _admit(self, job: _EmbedJob | None) -> bool:
        """A job off the queue joins the pending ones; False for stop()'s sentinel."""
        if job is None:
            return False
        self._pending.append(job)
        return True

    def _begin(self, job: _EmbedJob) -> bool:
        """A job's first piece goes into a batch: it no longer counts as waiting, and its future can
        no longer be cancelled, so setting its result cannot fail (a cancelled one's set_result
        killed this thread). False if its caller cancelled it while it waited: it is skipped."""
        self._uncount(job)
        return job.future.set_running_or_notify_cancel()

    def _take_arrivals(self) -> bool:
        """Every job queued so far joins the pending ones; False once stop()'s sentinel is read."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return True
            if not self._admit(job):
                return False

    def _run(self) -> None:
        pending = self._pending
        carry: _EmbedJob | None = None  # split by the last batch: its rest goes behind the arrivals
        accepting = True  # False once the sentinel is read: what came before it is still encoded
        while True:
            if not pending and carry is None:
                if not accepting or not self._admit(self._queue.get()):
                    return
            accepting = accepting and self._take_arrivals()
            if carry is not None and not carry.future.done() and not self._settle_cancelled(carry):
                if self._accepting:  # (done: an earlier piece failed)
                    pending.append(carry)
                else:
                    self._fail(carry.future, ShuttingDown("the server stopped before this request was encoded"))
            carry = None
            if not pending:
                continue
            end = time.monotonic() + self.max_wait  # room left: wait a little for more
            while accepting and sum(len(j.inputs) - j.taken for j in pending) < self.max_batch:
                try:
                    job = self._queue.get(timeout=max(0.0, end - time.monotonic()))
                except queue.Empty:
                    break
                accepting = self._admit(job)
            pieces, count = [], 0
            while pending and count < self.max_batch:
                job = pending.popleft()
                if job.taken == 0 and not self._begin(job):
                    continue
                if self._settle_cancelled(job):  # cancel() came while this batch gathered
                    continue
                pieces.append(job.take(self.max_batch - count))
                count += pieces[-1][2] - pieces[-1][1]
                if not job.all_taken:
                    carry = job  # the batch is full
            try:
                self._encode(pieces)
            except Exception as e:  # a bug here must fail this batch, not every later request
                log.exception("embedding batch failed")
                for job, _, _ in pieces:
                    self._fail(job.future, e)

    def _encode(self, pieces) -> None:
        groups: dict[tuple[str, bool], list] = {}
        for piece in pieces:
            if not piece[0].future.done():  # not failed in another batch
                groups.setdefault((piece[0].pooling, piece[0].normalize), []).append(piece)
        for (pooling, normalize), items in groups.items():
            flat = [x for job, lo, hi in items for x in job.inputs[lo:hi]]
            try:
                out = self.encoder.encode(flat, pooling=pooling, normalize=normalize)
            except Exception as e:  # bad input in one request must not fail the others
                if len(items) > 1:
                    for item in items:
                        self._encode([item])
                else:
                    job, lo, _ = items[0]
                    self._fail(job.future, request_error(e, lo))
                continue
            self.batches += 1
            if self.metrics is not None:
                self.metrics.embedded.inc(len(flat))
            i = 0
            for job, lo, hi in items:
                if not self._settle_cancelled(job):  # cancel() came while this piece was encoded
                    job.finish_piece(hi, out[i: i + hi - lo])
                i += hi - lo

    def stop(self) -> None:
        with self._lock:  # every job submitted before this is ahead of the sentinel
            self._accepting = False
            self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        while True:  # anything left behind the sentinel
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None and item.future.set_running_or_notify_cancel():
                item.future.set_exception(ShuttingDown("the server stopped before this request was encoded"))
