"""Continuous-batching scheduler for decode slots. Pure Python: no jax, testable with a fake engine.

The serving core is three calls per iteration (vLLM v1 style), with plain dataclasses between:

    out = scheduler.schedule()                 # who is prefilled into which slot, how many decode steps
    result = executor.execute(out)             # the engine runs it (EngineOutput)
    scheduler.update_from_output(out, result)  # tokens appended, stop conditions, slots freed

A finished request's slot is refilled at the very next `schedule()` (continuous batching).
Admission is FIFO. `add_request` and `cancel` may be called from other threads.

`schedule()` may run again before the previous output has come back (the engine loop overlaps
the host's work with the device's): a request counts the tokens it has been *scheduled*, so a
request whose last token is already on the way decodes no further and its slot is refilled at
once. A request that stops early on a stop token may decode one dispatch too many; those
tokens are dropped when they arrive, because it has finished by then.
"""
from __future__ import annotations

import collections
import dataclasses
import enum
import itertools
import threading
import time
from typing import Callable, Sequence

from energon_jax.engine.sampling import check_stop_strings, cut_at_stop_string, is_finite_number, validate_sampling
from energon_jax.runtime.checks import check_int


class QueueFull(Exception):
    """The waiting queue is at its bound; retry after `retry_after` seconds (HTTP 429)."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server no longer admits requests (HTTP 503)."""


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


def check_timeout(value, name: str = "timeout") -> float | None:
    """A request's time limit: a finite number of seconds > 0, or None (no limit). A negative one
    ended every request at once; a str failed only when the first request came."""
    if value is None:
        return None
    if not (is_finite_number(value) and value > 0):
        raise ValueError(f"{name}={value!r} must be a number of seconds > 0, or None (no timeout)")
    return float(value)


# finish_reason values: "length" and "stop" as in GPTModel.generate; the rest end a request early.
EARLY_REASONS = ("cancelled", "timeout", "error")


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()  # a hit ends the request; the token is kept in token_ids, not in text
    stop_strings: tuple[str, ...] = ()  # a hit ends the request; text is cut before it


@dataclasses.dataclass
class Delta:
    """What one update added to a request's stream (text is None in token-id mode)."""

    request_id: str
    token_ids: list[int]
    text: str | None
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None


@dataclasses.dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    options: SamplingOptions
    sink: Callable[[Delta], None] | None = None  # called from the scheduler's thread
    deadline: float | None = None  # time.monotonic() after which the request is ended with "timeout"
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    slot: int | None = None
    output_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""  # text of output_ids so far, after any stop-string cut
    emitted_text: str = ""  # the part of `text` already sent to the sink
    emitted_ids: int = 0
    finish_reason: str | None = None
    error: str | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None  # when its last kept token arrived
    finish_time: float | None = None
    cancel_requested: bool = False
    scheduled: int = 0  # output tokens the engine has been asked for (some may still be on the way)
    # Incremental detokenization (Scheduler._text_of): the first `settled_ids` output ids have the
    # text `text[:settled_chars]`, which ended without U+FFFD; `context_ids` (<= settled_ids) is
    # where the previous settled stretch began, the left context of the next window.
    settled_ids: int = 0
    settled_chars: int = 0
    context_ids: int = 0

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclasses.dataclass(frozen=True)
class PrefillWork:
    request_id: str
    slot: int
    token_ids: list[int]
    options: SamplingOptions


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    prefills: list[PrefillWork]
    decode_steps: int  # 0: no decode this iteration
    active: list[bool]  # [num_slots]: slots whose decode output is wanted
    slot_requests: dict[int, Request]  # the occupant of each active or prefilled slot when this was scheduled

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decode_steps


@dataclasses.dataclass(frozen=True)
class EngineOutput:
    first_tokens: dict[str, int]  # request_id -> token sampled from its prefill
    decode_tokens: Sequence[Sequence[int]] = ()  # [decode_steps][num_slots]


class Scheduler:
    """FIFO admission into `num_slots` decode slots, with a bounded waiting queue.

    detokenize: ids -> text (None: token-id mode; stop strings are then refused).
    decode_step_options: the decode step counts the engine has compiled (ascending powers of two);
      a decode dispatch runs the largest that wastes no slot-steps while requests wait.
    max_prefill_tokens: prompt tokens admitted per iteration when every slot is busy (the first
      waiting request is admitted whatever its length, and counts), so that long prompt bursts
      interleave with the decode of running requests.
      With fewer running requests the budget grows as num_slots / running (`prefill_budget`).
    context_len: prompt + max_tokens - 1 positions must fit (the decode cache length).
    batch_wait / arrival_gap: while nothing runs, requests that arrive close together (each within
      arrival_gap s of the last) are gathered for up to batch_wait s, so a burst starts as one batch
      (`admission_delay`); a lone request waits arrival_gap. batch_wait=0 admits at once.
    prefill_window / burst_gap: after an idle engine admits requests, iterations only prefill (no
      decode steps) while slots are free and requests keep arriving (each within burst_gap s of
      the last), for up to prefill_window s (`_decode_held`). A decode dispatch of several steps
      holds the host until most of it has run (the GPU launch queue is shorter than its kernels),
      so a burst still arriving behind one joins a whole dispatch later; a decode step costs about
      the same for 4 slots as for 64, so holding it until the burst is in costs the first requests
      little. 0 turns it off.
    """

    def __init__(self, num_slots: int, *, max_queue: int = 64, context_len: int,
                 detokenize: Callable[[list[int]], str] | None = None,
                 decode_step_options: Sequence[int] = (1,), max_prefill_tokens: int = 4096,
                 batch_wait: float = 0.0, arrival_gap: float = 0.002, prefill_window: float = 0.0,
                 burst_gap: float = 0.01, clock: Callable[[], float] = time.monotonic):
        # the Server's checks: 2.5 slots passed `< 1` and broke the slot list, True was 1 slot
        self.num_slots = check_int("num_slots", num_slots, 1)
        self.max_queue = check_int("max_queue", max_queue, 0)
        self.context_len = check_int("context_len", context_len, 1)
        self.detokenize = detokenize
        self.decode_step_options = sorted(set(int(k) for k in decode_step_options))
        if not self.decode_step_options or self.decode_step_options[0] != 1:
            raise ValueError(f"decode_step_options={list(decode_step_options)} must include 1")
        self.max_prefill_tokens = check_int("max_prefill_tokens", max_prefill_tokens, 1)
        for name, value in (("batch_wait", batch_wait), ("arrival_gap", arrival_gap),
                            ("prefill_window", prefill_window), ("burst_gap", burst_gap)):
            if not (is_finite_number(value) and value >= 0):  # NaN passed `< 0` (and acted as 0), inf too
                raise ValueError(f"{name}={value!r} must be a number of seconds >= 0")
        self.batch_wait, self.arrival_gap = float(batch_wait), float(arrival_gap)
        self.prefill_window, self.burst_gap = float(prefill_window), float(burst_gap)
        self.clock = clock
        self._last_arrival = float("-inf")
        self._burst_until = float("-inf")  # decode may be held until then (prefill_window)
        self.waiting: collections.deque[Request] = collections.deque()
        self.slots: list[Request | None] = [None] * self.num_slots
        self.requests: dict[str, Request] = {}  # every request not finished, by id
        self.accepting = True
        self._lock = threading.RLock()
        self._ids = itertools.count()
        self.work_available = threading.Condition(self._lock)  # notified when a request arrives
        self.on_finish: Callable[[Request], None] | None = None  # every ending, cancellations included
        self.on_tokens: Callable[[int], None] | None = None  # output tokens each update kept

    # ------------------------------------------------------------ submission
    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def add_request(self, prompt_ids: list[int], options: SamplingOptions, *, sink=None,
                    request_id: str | None = None, timeout: float | None = None) -> Request:
        """Queue a request; raises ValueError (bad input), QueueFull or ShuttingDown."""
        if not prompt_ids:
            raise ValueError("the prompt is empty; it needs at least one token")
        check_int("max_tokens", options.max_tokens, 1)
        validate_sampling(options.temperature, options.top_k, options.top_p)  # here, not on the engine thread
        positions = len(prompt_ids) + options.max_tokens - 1  # the last token is never fed back
        if positions > self.context_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; with max_tokens={options.max_tokens} it needs "
                             f"{positions} positions (the last new token is not fed back) > the context of "
                             f"{self.context_len} tokens")
        check_stop_strings(options.stop_strings, self.detokenize is not None)
        timeout = check_timeout(timeout)
        with self._lock:
            if not self.accepting:
                raise ShuttingDown("the server is shutting down and admits no new requests")
            # Requests that will take a free slot at the next step are not queued behind anyone: free
            # as schedule() counts it (the max_queue=0 server refused one a dispatch early).
            if len(self.waiting) >= self.max_queue + len(self._free_slots()):
                raise QueueFull(f"the waiting queue is full ({self.max_queue} requests); retry later",
                                retry_after=self._retry_after())
            req = Request(request_id or self.new_request_id(), list(prompt_ids), options, sink,
                          None if timeout is None else self.clock() + timeout, arrival=self.clock())
            if req.request_id in self.requests:
                raise ValueError(f"request_id {req.request_id!r} is already in use")
            self.requests[req.request_id] = req
            self.waiting.append(req)
            self._last_arrival = req.arrival
            # Wake the engine loop only when it can act: the first waiting request (an idle loop
            # sleeps on has_work) or a full set (it ends a burst's admission delay early). A timed
            # burst wait re-reads the arrivals when it ends, so other arrivals need no wake-up; one
            # per request cost the HTTP loop a GIL hand-off per request.
            if len(self.waiting) == 1 or len(self.waiting) >= self.num_slots:
                self.work_available.notify_all()
        return req

    def _retry_after(self) -> float:
        """Seconds a client is told to wait before retrying (Retry-After): the youngest running request's
        age (how long requests have been running at least), at least 1; a hint, not a promise."""
        now = self.clock()
        ages = [now - r.arrival for r in self.slots if r is not None]
        return max(1.0, min(ages) if ages else 1.0)

    def cancel(self, request_id: str, reason: str = "cancelled", error: str | None = None) -> bool:
        """End the unfinished request with this id now; its slot is free for the next `schedule()`.
        False if there is none (finished, or never added)."""
        with self._lock:
            req = self.requests.get(request_id)
            return req is not None and self.end(req, reason, error)

    def end(self, req: Request, reason: str = "cancelled", error: str | None = None) -> bool:
        """`cancel` for this request object: an id is free again once its request finished, so by id
        a caller holding a finished request could end a later one. False if already finished."""
        with self._lock:
            if req.finished:
                return False
            self._finish(req, reason, error)
            return True

    # ------------------------------------------------------------- inspection
    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def slots_in_use(self) -> int:
        return sum(s is not None for s in self.slots)

    def admission_delay(self) -> float:
        """Seconds to hold the next `schedule()` so that a burst of arrivals is admitted together:
        only while nothing runs, fewer requests wait than there are slots, and arrivals keep coming
        within arrival_gap of each other, for at most batch_wait after the oldest arrived. A burst
        split over two iterations runs the second part's decode steps after the first part's.
        While decode is held (`_decode_held`) and nobody waits: until the hold may end."""
        with self._lock:
            now = self.clock()
            if not self.waiting and self.slots_in_use and self._decode_held(now):
                # nothing to prefill and decode held: sleep until the window or the gap ends
                return max(0.0, min(self._burst_until, self._last_arrival + self.burst_gap) - now)
            if self.batch_wait <= 0 or not self.waiting or self.slots_in_use:
                return 0.0
            if len(self.waiting) >= self.num_slots:
                return 0.0
            until = min(self.waiting[0].arrival + self.batch_wait, self._last_arrival + self.arrival_gap)
            return max(0.0, until - now)

    def _decode_held(self, now: float) -> bool:
        """Decode waits (prefill_window): a burst that started on an idle engine is still arriving
        and free slots remain."""
        return (now < self._burst_until and now - self._last_arrival < self.burst_gap
                and any(r is None for r in self.slots))

    def has_work(self) -> bool:
        """Requests not finished yet: waiting, holding a slot, or with tokens still on the way from a
        slot already refilled (no slot names it then; a drain that counted slots ended before them)."""
        with self._lock:
            return bool(self.requests)

    # -------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        with self._lock:
            self._expire()
            prefills: list[PrefillWork] = []
            now = self.clock()
            if self.prefill_window > 0 and self.waiting and not self.slots_in_use:
                self._burst_until = now + self.prefill_window  # an idle engine starts a burst
            free = self._free_slots()
            budget = self.prefill_budget(self.num_slots - len(free))
            while self.waiting and free and (not prefills or budget >= len(self.waiting[0].prompt_ids)):
                req = self.waiting.popleft()
                slot = free.pop(0)
                req.slot, req.status, req.scheduled = slot, Status.RUNNING, 1  # the prefill samples a token
                self.slots[slot] = req
                budget -= len(req.prompt_ids)
                prefills.append(PrefillWork(req.request_id, slot, req.prompt_ids, req.options))
            decoding = {i: r for i, r in enumerate(self.slots)
                        if r is not None and r.scheduled < r.options.max_tokens}
            if decoding and self._decode_held(now):
                decoding = {}  # this iteration only prefills: the burst is still arriving
            steps = self._decode_steps(decoding) if decoding else 0  # >= 1 when anything decodes
            for req in decoding.values():
                req.scheduled += steps
            active = [i in decoding for i in range(self.num_slots)]
            occupants = {**decoding, **{p.slot: self.slots[p.slot] for p in prefills}}
            return SchedulerOutput(prefills, steps, active, occupants)

    def _free_slots(self) -> list[int]:
        """The slots the next `schedule()` may fill, in order: the empty ones, and those whose occupant
        has all its tokens scheduled (it finishes when they arrive)."""
        return [i for i, r in enumerate(self.slots) if r is None or r.scheduled >= r.options.max_tokens]

    def prefill_budget(self, running: int) -> float:
        """Prompt tokens admitted in one iteration (beyond its first request) while `running`
        requests decode. A prefill stalls the running requests for its length, and a decode
        dispatch costs the same however few slots are live: with few running, a long prefill
        stalls few and fills slots that would otherwise decode empty. So the budget is
        max_prefill_tokens x num_slots / running, unbounded when nothing runs."""
        if running == 0:
            return float("inf")
        return self.max_prefill_tokens * self.num_slots / running

    def _decode_steps(self, decoding: dict[int, Request]) -> int:
        remaining = [r.options.max_tokens - r.scheduled for r in decoding.values()]
        if not self.waiting:  # the fewest steps that finish every running request, in one dispatch
            longest = max(remaining)
            return next((k for k in self.decode_step_options if k >= longest), self.decode_step_options[-1])
        # Requests wait: stop at the first slot that frees up, so none idles while they wait.
        return max(k for k in self.decode_step_options if k <= min(remaining))

    def _expire(self) -> None:
        now = self.clock()
        for req in [r for r in self.requests.values() if r.deadline is not None and now > r.deadline]:
            self._finish(req, "timeout")

    # ---------------------------------------------------------------- update
    def update_from_output(self, out: SchedulerOutput, result: EngineOutput) -> list[Request]:
        """Append the engine's tokens; returns the requests that finished in this update."""
        done = []
        with self._lock:
            new_ids: dict[str, list[int]] = collections.defaultdict(list)
            for p in out.prefills:
                if p.request_id in result.first_tokens:
                    new_ids[p.request_id].append(int(result.first_tokens[p.request_id]))
            rows = result.decode_tokens
            rows = rows.tolist() if hasattr(rows, "tolist") else [[int(t) for t in row] for row in rows]
            columns = list(zip(*rows))  # [num_slots][decode_steps]
            for slot, req in out.slot_requests.items():
                if columns and out.active[slot]:
                    new_ids[req.request_id].extend(columns[slot])
            now = self.clock()
            kept = 0  # not the tokens computed: overshoot steps and tokens past a stop are dropped
            for req in out.slot_requests.values():
                if req.finished or not new_ids[req.request_id]:
                    continue
                if req.first_token_time is None:
                    req.first_token_time = now
                before = len(req.output_ids)
                reason = self._append(req, new_ids[req.request_id])
                kept += max(0, len(req.output_ids) - before)
                req.last_token_time = now
                if reason:
                    self._finish(req, reason)
                    done.append(req)
                else:
                    self._emit(req)
            if kept and self.on_tokens is not None:
                self.on_tokens(kept)
        return done

    def _append(self, req: Request, ids: list[int]) -> str | None:
        """Append tokens up to the first stop condition; returns the finish reason or None."""
        opts, reason = req.options, None
        for t in ids:
            req.output_ids.append(t)
            if t in opts.stop_token_ids:
                reason = "stop"
                break
            if len(req.output_ids) >= opts.max_tokens:
                reason = "length"
                break
        if self.detokenize is None:
            return reason
        body = req.output_ids[:-1] if reason == "stop" else req.output_ids
        req.text = self._text_of(req, body)
        cut = cut_at_stop_string(body, req.text, opts.stop_strings, self.detokenize)
        if cut is not None:
            (req.text, req.output_ids), reason = cut, "stop"
        return reason

    def _text_of(self, req: Request, body: list[int]) -> str:
        """detokenize(body), decoding only the ids since the last settled offset and a left context.

        Decoding all of body after every update cost its length each time, so the square of it over
        a request (a byte-level BPE decode costs ~0.17 us a token: 64 requests at 2,048 tokens spent
        ~22 ms of host time an iteration). The window ids[p:] (p = context_ids < s = settled_ids)
        stands in for the full decode only where it checks out: its settled part decoded alone,
        decode(ids[p:s]), is not empty (a rule for the start of a text, such as a stripped leading
        space, acts on it, not on the new text), is the end of the settled text (the left edge
        joins: no UTF-8 character or merged pair is cut there) and is a prefix of decode(ids[p:])
        (the new ids changed no earlier text). Otherwise the whole body is decoded, as before. So
        the text is the full decode's for any detokenizer whose rules reach no further back than
        the window (byte-level BPE, pairs merged into one character, space clean-up), concatenative
        or not. The settled offset advances only over text that ends without U+FFFD (an incomplete
        character can still change), though a window's text may end in one (the same bytes end the
        full text); an output that keeps ending in U+FFFD decodes a growing window until one
        completes."""
        s, p = req.settled_ids, req.context_ids
        text = None
        if s:
            settled = self.detokenize(body[p:s])
            window = self.detokenize(body[p:])
            if settled and window.startswith(settled) and req.text.endswith(settled, 0, req.settled_chars):
                text = req.text[: req.settled_chars] + window[len(settled):]
        if text is None:
            text = self.detokenize(body)
        if not text.endswith("\ufffd") and len(body) > s:
            req.context_ids, req.settled_ids, req.settled_chars = s, len(body), len(text)
        return text

    def _emit(self, req: Request, final: bool = False) -> None:
        text = None
        if self.detokenize is not None:
            safe = req.text
            if not final:
                # Hold back a possibly incomplete UTF-8 character and a possible stop-string prefix.
                safe = safe.rstrip("\ufffd")
                hold = max((len(s) - 1 for s in req.options.stop_strings), default=0)
                safe = safe[: max(len(req.emitted_text), len(safe) - hold)]
            text = safe[len(req.emitted_text):]
            req.emitted_text += text
        ids = req.output_ids[req.emitted_ids:]
        req.emitted_ids = len(req.output_ids)
        if req.sink is not None and (ids or text or final):
            req.sink(Delta(req.request_id, ids, text, final, req.finish_reason if final else None, req.error))

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        if req.status is Status.WAITING:
            self.waiting.remove(req)
        elif req.slot is not None and self.slots[req.slot] is req:
            self.slots[req.slot] = None
        req.status, req.finish_reason, req.finish_time = Status.FINISHED, reason, self.clock()
        req.error = error if error is not None else req.error
        self.requests.pop(req.request_id, None)
        self._emit(req, final=True)
        if self.on_finish is not None:
            self.on_finish(req)

    def fail_all(self, reason: str = "error", error: str = "the server stopped") -> None:
        """End every waiting and running request (engine failure or shutdown)."""
        with self._lock:
            for req in list(self.requests.values()):
                self._finish(req, reason, error)

    def fail_running(self, reason: str, error: str) -> list[Request]:
        """End every request holding a slot (the engine lost their decode state); returns them."""
        with self._lock:
            running = [r for r in self.slots if r is not None]
            for req in running:
                self._finish(req, reason, error)
            return running

    def stop_accepting(self) -> None:
        with self._lock:
            self.accepting = False
