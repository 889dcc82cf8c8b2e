"""The server's counters, in one Prometheus registry per app (several apps in one process do not clash).

``/metrics`` gives a JSON snapshot; ``/metrics?format=prometheus`` the Prometheus text format (OpenMetrics when
the scraper's Accept header asks for it). Prometheus names are ``edgemed_`` and the JSON key, counters ending in
``_total`` as the format wants; latency is a histogram there (``edgemed_latency_seconds``) and p50/p95 of the last
1000 answers in the JSON.

Each event is counted in one place: a request arriving (``arrived``), a request ending with its outcome
(``ended``), and a generation's tokens and time (``generated``).
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

if TYPE_CHECKING:
    from edgemed.serve.admission import Gate

# outcome -> help; a request ends with exactly one
OUTCOMES = {
    "completed": "Requests answered in full.",
    "rejected_queue_full": "Requests refused with 429: every slot and queue place taken.",
    "client_errors": "Requests refused with a 4xx other than 429.",
    "server_errors": "Requests that failed with a 5xx other than 504.",
    "timed_out": "Requests past their timeout (504).",
    "cancelled": "Requests whose client went away before the answer was whole.",
}
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, float("inf"))


def outcome_of(status: int) -> str:
    """The outcome an error answer with HTTP ``status`` counts as."""
    if status == 429:
        return "rejected_queue_full"
    if status == 504:
        return "timed_out"
    return "server_errors" if status >= 500 else "client_errors"


def _total(counter: Counter) -> float:
    return next(s.value for s in counter.collect()[0].samples if s.name.endswith("_total"))


class Metrics:
    """Counters of one app, and the gauges of its gate (queue depth, running generations, their bounds)."""

    def __init__(self, gate: Gate):
        self.registry = r = CollectorRegistry()
        self.started = time.time()
        self._requests = Counter("edgemed_requests", "Requests to the completion endpoints.", registry=r)
        self._ended = {k: Counter(f"edgemed_requests_{k}", help_, registry=r) for k, help_ in OUTCOMES.items()}
        self._tokens = Counter("edgemed_tokens_generated", "Tokens generated.", registry=r)
        self._seconds = Counter("edgemed_generation_seconds", "Seconds spent generating, summed over slots.",
                                registry=r)
        self._latency = Histogram("edgemed_latency_seconds", "Seconds from arrival to the last token of answers "
                                  "completed.", buckets=LATENCY_BUCKETS, registry=r)
        self._recent: deque[float] = deque(maxlen=1000)
        gauges = {
            "tokens_per_second": ("Tokens generated per second of generation.", self._tokens_per_second),
            "queue_depth": ("Requests waiting for a slot.", lambda: gate.waiting),
            "running": ("Generations running.", lambda: gate.running),
            "max_queue": ("Requests that may wait for a slot.", lambda: gate.max_queue),
            "max_concurrency": ("Generations that may run at once.", lambda: gate.slots),
            "uptime_s": ("Seconds since the server started.", lambda: time.time() - self.started),
        }
        for name, (help_, value) in gauges.items():
            Gauge(f"edgemed_{name}", help_, registry=r).set_function(value)

    # ------------------------------------------------------------------ events
    def arrived(self) -> None:
        self._requests.inc()

    def ended(self, outcome: str, arrived: float | None = None) -> None:
        """A request ended with ``outcome`` (one of OUTCOMES); a completed one's latency counts from ``arrived``."""
        self._ended[outcome].inc()
        if outcome == "completed" and arrived is not None:
            latency = time.monotonic() - arrived
            self._latency.observe(latency)
            self._recent.append(latency)

    def generated(self, tokens: int, seconds: float) -> None:
        """One generation's tokens and time (from the worker thread; prometheus_client's counters are locked)."""
        self._tokens.inc(tokens)
        self._seconds.inc(seconds)

    # ------------------------------------------------------------------ reading
    def _tokens_per_second(self) -> float:
        seconds = _total(self._seconds)
        return _total(self._tokens) / seconds if seconds else 0.0

    def snapshot(self) -> dict[str, Any]:
        """The JSON view of ``/metrics``, read from the registry."""
        v = {s.name: s.value for m in self.registry.collect() for s in m.samples}
        lat = sorted(self._recent)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 4) if lat else None

        return {
            "requests_total": int(v["edgemed_requests_total"]),
            **{f"requests_{k}": int(v[f"edgemed_requests_{k}_total"]) for k in OUTCOMES},
            "tokens_generated": int(v["edgemed_tokens_generated_total"]),
            "generation_seconds": round(v["edgemed_generation_seconds_total"], 4),
            "tokens_per_second": round(v["edgemed_tokens_per_second"], 3),
            **{k: int(v[f"edgemed_{k}"]) for k in ("queue_depth", "running", "max_queue", "max_concurrency")},
            "latency_p50_s": pct(0.5),
            "latency_p95_s": pct(0.95),
            "uptime_s": round(v["edgemed_uptime_s"], 1),
        }

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """The registry in the format the scraper's Accept header asks for (Prometheus text by default), and its
        content type."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type
