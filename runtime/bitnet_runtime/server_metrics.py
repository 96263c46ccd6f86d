"""The server's Prometheus metrics: latency histograms it observes itself, and the engine's
gauges and totals read at each scrape (so the engine thread never touches prometheus-client).

Time to first token runs from a request's arrival to its first token (queueing and prefill
included); inter-token latency is the gap between a stream's consecutive tokens as the
server's event loop sees them.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .engine import Engine

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2, 5)


class _EngineCollector:
    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats
        yield GaugeMetricFamily("bitnet_queue_depth", "Requests waiting for a sequence slot", value=s.waiting)
        yield GaugeMetricFamily("bitnet_running_sequences", "Sequences being prefilled or decoded", value=s.running)
        yield GaugeMetricFamily(
            "bitnet_decode_tokens_per_second", "Tokens per second of the last decode step (all sequences)", value=s.tokens_per_second
        )
        yield CounterMetricFamily("bitnet_prompt_tokens", "Prompt tokens prefilled", value=s.prompt_tokens)
        yield CounterMetricFamily("bitnet_generation_tokens", "Tokens generated", value=s.generated_tokens)
        steps = CounterMetricFamily("bitnet_decode_steps", "Decode steps run, by how many sequences each decoded", labels=["batch"])
        for size, count in sorted(s.batch_sizes.items()):
            steps.add_metric([str(size)], count)
        yield steps


class Metrics:
    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.requests = Counter("bitnet_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"], registry=self.registry)
        self.ttft = Histogram("bitnet_time_to_first_token_seconds", "Arrival to first token", buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram(
            "bitnet_inter_token_latency_seconds", "Gap between a stream's tokens", buckets=ITL_BUCKETS, registry=self.registry
        )
        self.content_type = CONTENT_TYPE_LATEST

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def token(self, seconds: float, first: bool) -> None:
        (self.ttft if first else self.itl).observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
