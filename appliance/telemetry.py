"""Prometheus metrics (prefix ``appliance_``, base units). One registry per server instance so that
several servers in one test process never share counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds; from sub-millisecond cache hits to minute-long generations.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "appliance_requests",
            "Requests answered, by model, API and HTTP status.",
            ["model", "api", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "appliance_request_duration_seconds",
            "End-to-end request latency.",
            ["model", "api"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "appliance_queue_duration_seconds",
            "Time an item waited in the batcher's queue.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_duration = Histogram(
            "appliance_compute_duration_seconds",
            "Engine time per batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "appliance_batch_size",
            "Items per engine batch.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "appliance_queue_depth",
            "Items waiting, by model and priority level.",
            ["model", "priority"],
            registry=r,
        )
        self.rejections = Counter(
            "appliance_rejections",
            "Requests refused or dropped, by model, priority and reason.",
            ["model", "priority", "reason"],
            registry=r,
        )
        self.inflight = Gauge(
            "appliance_inflight_requests",
            "Requests being handled, by API.",
            ["api"],
            registry=r,
        )
        self.model_loaded = Gauge(
            "appliance_model_loaded",
            "1 when the model is resident and serving.",
            ["model"],
            registry=r,
        )
        self.model_load_duration = Histogram(
            "appliance_model_load_duration_seconds",
            "Time to load a model.",
            ["model"],
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
