"""GET /metrics: Prometheus text made by prometheus_client from Scheduler.stats() and the server's own
counters, collected at scrape time (nothing is kept twice). Process metrics (resident memory, CPU
seconds) come from prometheus_client's ProcessCollector, which reads /proc/self."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# (stats key, metric name, help); counters get "_total" appended by the exposition
_COUNTERS = [
    ("requests", "flexinfer_requests", "requests the scheduler finished (any finish reason)"),
    ("prompt_tokens", "flexinfer_prompt_tokens", "prompt tokens evaluated (tokens in)"),
    ("decode_tokens", "flexinfer_completion_tokens", "tokens generated (tokens out)"),
    ("cached_tokens", "flexinfer_cached_tokens", "prompt tokens reused from the cache"),
]
_GAUGES = [
    ("running", "flexinfer_running_sequences", "sequences being generated now"),
    ("queued", "flexinfer_queued_sequences", "requests waiting in the queue"),
    ("decode_tok_s", "flexinfer_decode_tokens_per_second", "generated tokens per second of decode"),
    ("prefill_tok_s", "flexinfer_prefill_tokens_per_second", "prompt tokens per second of prefill"),
    ("bytes_read_per_token", "flexinfer_bytes_read_per_token", "weight bytes read from disk per "
                                                               "generated token"),
    ("resident_bytes", "flexinfer_resident_bytes", "weight bytes kept in memory by the plan"),
    ("budget_bytes", "flexinfer_memory_budget_bytes", "the memory budget the plan holds to"),
]


class _Collector:
    def __init__(self, state):
        self.state = state

    def collect(self):
        st = self.state
        yield GaugeMetricFamily("flexinfer_model_loaded", "1 once the model is loaded and serving",
                                value=1.0 if st.scheduler is not None else 0.0)
        http = CounterMetricFamily("flexinfer_http_responses", "HTTP responses by status",
                                   labels=["status"])
        for status, n in sorted(st.responses.items()):
            http.add_metric([str(status)], n)
        yield http
        for key, name, text in (("cancelled", "flexinfer_requests_cancelled",
                                 "requests whose client left before the end"),
                                ("timed_out", "flexinfer_requests_timed_out",
                                 "requests cut by --timeout")):
            yield CounterMetricFamily(name, text, value=st.counts[key])
        if st.scheduler is None:
            return
        s = st.scheduler.stats()
        for key, name, text in _COUNTERS:
            yield CounterMetricFamily(name, text, value=s[key])
        for key, name, text in _GAUGES:
            yield GaugeMetricFamily(name, text, value=s[key])
        source = GaugeMetricFamily("flexinfer_memory_budget_info", "1, labelled with where the "
                                   "budget in force came from", labels=["source"])
        source.add_metric([s["budget_source"]], 1.0)
        yield source
        ratio = s["cached_tokens"] / s["prompt_tokens"] if s["prompt_tokens"] else 0.0
        yield GaugeMetricFamily("flexinfer_cached_token_ratio",
                                "cached prompt tokens / all prompt tokens", value=ratio)


def make_registry(state) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(state))
    ProcessCollector(registry=reg)
    return reg


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(registry), CONTENT_TYPE_LATEST
