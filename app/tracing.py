"""Optional OpenTelemetry tracing: a server span per HTTP request, with ``queue_wait``, ``tokenize``
and ``forward`` child spans for predictions.

On only when ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set and the
``otel`` extra is installed (``pip install -e ".[otel]"``); the exporter, sampler, resource and
propagators then follow the standard ``OTEL_*`` variables. When off, this module imports nothing
from OpenTelemetry and no span or timing object is ever made: the middleware holds ``None``, and
the request path pays one ``ContextVar.get`` per prediction and one dict truthiness test per batch.

How the child spans are timed: a batch is tokenised and run on the model thread for many requests
at once, after the request has left the event loop. So the model thread only *records* times
(:func:`record_batch`, wall-clock nanoseconds) on the :class:`RequestTimings` of each traced request
in the batch, and the middleware makes the spans afterwards with those explicit start and end
times: each request gets ``queue_wait`` (from queueing to the start of its first batch) and, for
each batch that held its texts, ``tokenize`` and ``forward`` covering that batch's phases.
"""

from __future__ import annotations

import logging
import os
import time
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

if TYPE_CHECKING:  # never imported at run time unless tracing is on
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span

log = logging.getLogger(__name__)

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
DEFAULT_SERVICE_NAME = "lstm-sentiment-service"
NS_PER_S = 1_000_000_000


@dataclass
class BatchTiming:
    """One batch that held texts of a traced request (wall-clock ns, as OpenTelemetry wants)."""

    start_ns: int
    tokenized_ns: int
    end_ns: int
    size: int  # texts in the batch, from every request
    texts: int  # of which this request's


@dataclass
class RequestTimings:
    """Where one traced prediction request's time went; filled by the service and the model thread."""

    enqueued_ns: int | None = None
    done_ns: int | None = None
    batches: list[BatchTiming] = field(default_factory=list)

    def watch(self, items: Iterable[object], registry: dict[int, "RequestTimings"]) -> None:
        """The request's items are about to be queued: let the model thread find this by item."""
        for item in items:
            registry[id(item)] = self
        self.enqueued_ns = time.time_ns()

    def unwatch(self, items: Iterable[object], registry: dict[int, "RequestTimings"]) -> None:
        """The request stopped waiting (answered, timed out or cancelled)."""
        self.done_ns = time.time_ns()
        for item in items:
            registry.pop(id(item), None)


_timings: ContextVar[RequestTimings | None] = ContextVar("request_timings", default=None)


def current_timings() -> RequestTimings | None:
    """The current request's timings when it is traced; None otherwise (always, with tracing off)."""
    return _timings.get()


def record_batch(registry: Mapping[int, RequestTimings], items: Sequence[object], start_ns: int,
                 tokenize_s: float, forward_s: float) -> None:
    """On the model thread, after a batch: give each traced request in it the batch's timings."""
    tokenized_ns = start_ns + int(tokenize_s * NS_PER_S)
    end_ns = tokenized_ns + int(forward_s * NS_PER_S)
    counts: dict[int, tuple[RequestTimings, int]] = {}
    for item in items:
        timings = registry.get(id(item))
        if timings is not None:
            counts[id(timings)] = (timings, counts.get(id(timings), (timings, 0))[1] + 1)
    for timings, texts in counts.values():
        timings.batches.append(BatchTiming(start_ns, tokenized_ns, end_ns, len(items), texts))


@dataclass
class ServerSpan:
    """A request's open span and its timings (made by :meth:`RequestTracing.start`)."""

    span: "Span"
    method: str
    timings: RequestTimings
    token: Token

    @property
    def trace_id(self) -> str:
        return format(self.span.get_span_context().trace_id, "032x")


class RequestTracing:
    """Makes the spans of HTTP requests with one tracer provider (not the global one, so that
    nothing else in the process starts tracing because this did)."""

    def __init__(self, provider: "TracerProvider") -> None:
        from opentelemetry import propagate, trace

        self.provider = provider
        self._tracer = provider.get_tracer("app")
        self._extract = propagate.extract  # honours OTEL_PROPAGATORS; default W3C tracecontext + baggage
        self._set_span_in_context = trace.set_span_in_context
        self._server, self._internal = trace.SpanKind.SERVER, trace.SpanKind.INTERNAL
        self._error = trace.StatusCode.ERROR

    def start(self, scope: Mapping[str, Any], request_id: str) -> ServerSpan:
        """Open the request's server span (child of an incoming ``traceparent``, if any)."""
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        parent = self._extract(headers)
        method = scope.get("method", "")
        span = self._tracer.start_span(method, context=parent, kind=self._server, attributes={
            "http.method": method, "http.request.method": method, "url.path": scope.get("path", ""),
            "request.id": request_id})
        timings = RequestTimings()
        return ServerSpan(span, method, timings, _timings.set(timings))

    def finish(self, handle: ServerSpan, route: str | None, status: int, texts: int | None,
               error: BaseException | None = None) -> None:
        """Name and close the server span, after adding the child spans from the request's timings."""
        _timings.reset(handle.token)
        span, timings = handle.span, handle.timings
        if route is not None:
            span.update_name(f"{handle.method} {route}")
            span.set_attribute("http.route", route)
        span.set_attribute("http.status_code", status)
        span.set_attribute("http.response.status_code", status)
        if texts is not None:
            span.set_attribute("sentiment.texts", texts)
        if error is not None:  # the type only: an exception's message could quote a request
            span.set_attribute("error.type", type(error).__qualname__)
        if error is not None or status >= 500:
            span.set_status(self._error)
        self._children(span, timings)
        span.end()

    def _children(self, parent: "Span", timings: RequestTimings) -> None:
        if timings.enqueued_ns is None:
            return  # not a prediction, or refused before queueing
        context = self._set_span_in_context(parent)
        first = timings.batches[0].start_ns if timings.batches else timings.done_ns or time.time_ns()
        wait = self._tracer.start_span("queue_wait", context=context, kind=self._internal,
                                       start_time=timings.enqueued_ns,
                                       attributes={"sentiment.batched": bool(timings.batches)})
        wait.end(end_time=max(first, timings.enqueued_ns))
        for batch in timings.batches:
            attributes = {"sentiment.batch.size": batch.size, "sentiment.batch.request_texts": batch.texts}
            for name, start, end in (("tokenize", batch.start_ns, batch.tokenized_ns),
                                     ("forward", batch.tokenized_ns, batch.end_ns)):
                child = self._tracer.start_span(name, context=context, kind=self._internal, start_time=start,
                                                attributes=attributes)
                child.end(end_time=end)

    def shutdown(self) -> None:
        self.provider.shutdown()


def tracing_requested(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the standard variables ask for span export (an OTLP endpoint, SDK not disabled)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(environ.get(name, "").strip() for name in ENDPOINT_VARS)


def make_exporter() -> "SpanExporter":
    """The OTLP/HTTP exporter; it reads its endpoint, headers, timeout etc. from ``OTEL_EXPORTER_OTLP_*``."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def setup_tracing(environ: Mapping[str, str] = os.environ) -> RequestTracing | None:
    """A :class:`RequestTracing` exporting over OTLP when the environment asks for it, else None.
    If it asks but the ``otel`` extra is missing, one warning says so and tracing stays off."""
    if not tracing_requested(environ):
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        exporter = make_exporter()
    except ImportError as exc:
        log.warning("%s is set but OpenTelemetry is not installed (%s): tracing is off; "
                    "install it with pip install -e \".[otel]\"",
                    next(name for name in ENDPOINT_VARS if environ.get(name, "").strip()), exc.name or exc)
        return None
    named = environ.get("OTEL_SERVICE_NAME") or "service.name=" in environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    resource = Resource.create({} if named else {"service.name": DEFAULT_SERVICE_NAME})
    provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER (default: parent-based, all)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    log.info("tracing on: spans go to %s", exporter_endpoint(environ))
    return RequestTracing(provider)


def exporter_endpoint(environ: Mapping[str, str]) -> str:
    traces = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    return traces or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip().rstrip("/") + "/v1/traces"
