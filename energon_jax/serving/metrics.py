"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""
from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1)


class Metrics:
    """queue depth, slots in use, TTFT, TPOT, tokens/s, request counts by route and status."""

    def __init__(self, queue_depth=lambda: 0, slots_in_use=lambda: 0, num_slots: int = 0, window_s: float = 10.0):
        self.registry = r = CollectorRegistry()
        Gauge("energon_queue_depth", "requests waiting for a slot", registry=r).set_function(queue_depth)
        Gauge("energon_slots_in_use", "decode slots holding a request", registry=r).set_function(slots_in_use)
        Gauge("energon_slots_total", "decode slots", registry=r).set(num_slots)
        self.ttft = Histogram("energon_time_to_first_token_seconds", "arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("energon_time_per_output_token_seconds", "mean gap between output tokens of a request",
                              buckets=_TOKEN_BUCKETS, registry=r)
        self.latency = Histogram("energon_request_latency_seconds", "arrival to last token",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.generated = Counter("energon_generated_tokens", "output tokens kept by requests", registry=r)
        self.prompt_tokens = Counter("energon_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.finished = Counter("energon_finished_requests", "requests ended, by finish reason", ["reason"], registry=r)
        self.http = Counter("energon_http_requests", "HTTP requests by route and status code", ["route", "status"],
                            registry=r)
        self.embedded = Counter("energon_embedded_sequences", "sequences encoded", registry=r)
        Gauge("energon_tokens_per_second", f"output tokens per second over the last {window_s:g} s",
              registry=r).set_function(self.tokens_per_second)
        self.warmup_seconds = Gauge("energon_warmup_seconds",
                                    "time the start-up's warm-up spent compiling (0: started without one)", registry=r)
        self._window_s = window_s
        self._events: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def record_tokens(self, n: int) -> None:
        if n <= 0:
            return
        self.generated.inc(n)
        now = time.monotonic()
        with self._lock:
            self._events.append((now, n))
            while self._events and self._events[0][0] < now - self._window_s:
                self._events.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            return sum(n for t, n in self._events if t >= now - self._window_s) / self._window_s

    def record_finished(self, req) -> None:
        """req: a scheduler.Request that just finished."""
        self.finished.labels(req.finish_reason or "unknown").inc()
        if req.first_token_time is None:
            return
        self.ttft.observe(req.first_token_time - req.arrival)
        self.latency.observe(req.finish_time - req.arrival)
        if len(req.output_ids) > 1:  # to its last token: a cancel or a timeout later is no token's time
            self.tpot.observe((req.last_token_time - req.first_token_time) / (len(req.output_ids) - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
