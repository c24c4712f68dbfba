"""The Prometheus metrics of the service, in one place, on a registry per app instance."""

from __future__ import annotations

from typing import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, PlatformCollector, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from app.errors import Errors
from app.lanes import LANES

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024)
DELTA_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
MODEL_LOAD_OUTCOMES = ("promoted", "shadow", "refused", "unloaded")
PROBABILITY_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class LaneGauge(Collector):
    """A gauge with one series per queue lane (``lane="interactive"|"batch"``), read when scraped.

    ``set_function`` takes a function of no arguments returning ``{lane: value}``.
    """

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self._read: Callable[[], Mapping[str, float]] = lambda: {lane: 0.0 for lane in LANES}
        registry.register(self)

    def set_function(self, read: Callable[[], Mapping[str, float]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=["lane"])
        for lane, value in self._read().items():
            family.add_metric([lane], float(value))
        yield family


class ServiceMetrics:
    """All metric objects, registered on their own registry so that several apps can coexist."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.request_duration = Histogram(
            "sentiment_request_duration_seconds", "Time to answer an HTTP request, by route and status.",
            ["route", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.requests_in_flight = Gauge(
            "sentiment_requests_in_flight", "Prediction requests being served now.", registry=r)
        self.batch_size = Histogram(
            "sentiment_batch_size", "Texts per batch handed to the model.", buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = LaneGauge("sentiment_queue_depth", "Queue items waiting for a batch (live work only), by lane.", r)
        self.queue_cost = LaneGauge(
            "sentiment_queue_cost", "Work waiting for a batch, in characters (a gate trace counts 6x), by lane.", r)
        self.estimated_wait = LaneGauge(
            "sentiment_queue_estimated_wait_seconds", "Predicted wait for new work of each lane at the measured "
            "throughput.", r)
        self.lane_requests = Counter(
            "sentiment_lane_requests", "Prediction requests that reached admission, by lane.", ["lane"], registry=r)
        self.lane_errors = Counter(
            "sentiment_lane_errors", "Prediction requests refused or dropped for lack of capacity or time, by lane "
            "and error kind (overloaded, deadline_exceeded, timeout).", ["lane", "kind"], registry=r)
        for lane in LANES:  # every series exists from the start, at 0
            self.lane_requests.labels(lane=lane)
            for kind in (Errors.OVERLOADED, Errors.DEADLINE_EXCEEDED, Errors.TIMEOUT):
                self.lane_errors.labels(lane=lane, kind=kind.code)
        self.body_bytes_in_flight = Gauge(
            "sentiment_body_bytes_in_flight", "Request-body bytes held in memory now, by all requests together "
            "(capped by SENTIMENT_MAX_BODY_BYTES_IN_FLIGHT).", registry=r)
        self.queue_wait = Histogram(
            "sentiment_queue_wait_seconds", "Time a text waited in the queue before its batch started.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.batch_duration = Histogram(
            "sentiment_batch_duration_seconds", "Model-thread time per batch (tokenising, padding, forward passes, copy-out).",
            buckets=LATENCY_BUCKETS, registry=r)
        self.tokenize_duration = Histogram(
            "sentiment_tokenize_duration_seconds", "Time to tokenise one batch's texts (on the model thread, before its forward pass).",
            buckets=LATENCY_BUCKETS, registry=r)
        self.texts = Counter("sentiment_texts", "Texts scored.", registry=r)
        self.tokens_per_text = Histogram(
            "sentiment_tokens_per_text", "Tokens per scored text, after truncation.", buckets=TOKEN_BUCKETS, registry=r)
        self.truncated = Counter("sentiment_truncated_texts", "Texts cut to the token limit.", registry=r)
        # What the model says, for drift: a shift in the served distribution shows here before anyone
        # labels data. Buckets of 0.1 (finer at the extremes, where a confident model puts most texts).
        self.probability = Histogram(
            "sentiment_prediction_probability", "P(positive) of each scored text.",
            buckets=PROBABILITY_BUCKETS, registry=r)
        self.predictions = Counter(
            "sentiment_predictions", "Scored texts by predicted label.", ["label"], registry=r)
        for label in ("positive", "negative"):
            self.predictions.labels(label=label)  # both series exist from the start, at 0
        self.explained_texts = Counter(
            "sentiment_explained_texts", "Texts scored with an occlusion explanation.", registry=r)
        self.explanation_variants = Counter(
            "sentiment_explanation_variants",
            "Extra sequences scored for explanations (one per token of each explained text).", registry=r)
        self.errors = Counter("sentiment_errors", "Requests that failed, by kind.", ["kind"], registry=r)
        for kind in Errors.all():  # every series exists from the start, at 0, so rate() sees the first error
            self.errors.labels(kind=kind.code)
        self.model_info = Info("sentiment_model", "The loaded model.", registry=r)
        self.workers_ready = Gauge(
            "sentiment_workers_ready", "Model-worker processes loaded, warm and serving (0: the model runs in "
            "the server process).", registry=r)
        self.worker_restarts = Counter(
            "sentiment_worker_restarts", "Model-worker processes that exited and were replaced.", registry=r)
        self.workers = Gauge(
            "sentiment_workers", "Model-worker processes the pool runs when whole (0: the model runs in the "
            "server process); compare with sentiment_workers_ready.", registry=r)
        self.worker_failures = Counter(
            "sentiment_worker_failures", "Model workers killed and replaced, by why: exit (it died), deadline "
            "(no answer in time: frozen or stuck), bad_reply (an answer that could not be decoded).",
            ["reason"], registry=r)
        for reason in ("exit", "deadline", "bad_reply"):
            self.worker_failures.labels(reason=reason)
        self.retried_texts = Counter(
            "sentiment_retried_texts", "Texts scored again, alone, after the worker holding their batch failed.",
            registry=r)
        self.poison_texts = Counter(
            "sentiment_poison_texts", "Texts refused because they made a model worker fail twice, the second "
            "time alone.", registry=r)
        self.worker_memory = Gauge(
            "sentiment_worker_resident_memory_bytes", "Resident memory of each model-worker process.", ["worker"],
            registry=r)
        self.resident_memory = Gauge(
            "sentiment_resident_memory_bytes", "Resident memory of the server process and its model workers "
            "together: what the container's memory limit sees.", registry=r)
        # Model repository: swaps and the shadow phase (docs/releasing.md).
        self.model_loads = Counter(
            "sentiment_model_loads", "Repository operations, by outcome: promoted (a version now serves), shadow (a "
            "shadow started), refused (a candidate failed its checks), unloaded (a shadow ended).", ["outcome"],
            registry=r)
        for outcome in MODEL_LOAD_OUTCOMES:
            self.model_loads.labels(outcome=outcome)
        self.shadow_fraction = Gauge(
            "sentiment_shadow_fraction", "Share of live texts the shadow candidate also scores (0: no shadow).", registry=r)
        self.shadow_texts = Counter(
            "sentiment_shadow_texts", "Live texts the shadow candidate scored beside the served version.", registry=r)
        self.shadow_agreements = Counter(
            "sentiment_shadow_agreements", "Shadowed texts where the candidate gave the served version's label.",
            registry=r)
        self.shadow_delta = Histogram(
            "sentiment_shadow_probability_delta", "|P(positive) of the candidate - P(positive) served| per shadowed text.",
            buckets=DELTA_BUCKETS, registry=r)
        self.shadow_duration = Histogram(
            "sentiment_shadow_batch_duration_seconds", "Time the shadow candidate took per batch of shadowed texts.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.shadow_dropped = Counter(
            "sentiment_shadow_dropped", "Texts picked for the shadow but dropped because the candidate was behind "
            "(shadow work is dropped first under load).", registry=r)
        self.shadow_failed = Counter(
            "sentiment_shadow_failed", "Shadowed texts the candidate could not score.", registry=r)
        self.ready = Gauge("sentiment_ready", "1 when the model is loaded, warmed up and not draining.", registry=r)
        # process_resident_memory_bytes, process_cpu_seconds_total, open fds …; python_info.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
