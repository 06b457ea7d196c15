"""Prometheus metrics of `serve` (GET /metrics): requests by route (ours, or 'other') and status,
tokens in and out, requests waiting for their first token and running, time to first token and
per-token latency, restarts of the batching engine."""

from __future__ import annotations


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        self.registry = r = CollectorRegistry()
        self.content_type = CONTENT_TYPE_LATEST
        self.requests = Counter("devops_model_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("devops_model_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("devops_model_completion_tokens", "generated tokens", registry=r)
        self.engine_restarts = Counter("devops_model_engine_restarts", "batching engine restarts after its loop died",
                                       registry=r)
        self.waiting = Gauge("devops_model_queue_depth", "requests waiting for their first token", registry=r)
        self.running = Gauge("devops_model_requests_running", "requests generating", registry=r)
        self.ttft = Histogram("devops_model_time_to_first_token_seconds", "time to first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.per_token = Histogram("devops_model_time_per_output_token_seconds", "time between tokens", registry=r,
                                   buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
