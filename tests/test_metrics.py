"""The /metrics page's parts without a server: histograms as Prometheus reads them."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from actors.histogram import HistogramRecorder
from gatefleet import metrics
from schemas.api import StatusReply


def test_a_histogram_counts_cumulatively_with_le_bounds() -> None:
    recorder = HistogramRecorder((0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 2.0):
        recorder.observe(seconds)
    h = recorder.snapshot()
    assert (h.bounds, h.counts, h.count, h.sum) == ([0.1, 1.0], [2, 3], 4, 2.65)


def test_the_page_parses_and_carries_the_histogram() -> None:
    recorder = HistogramRecorder((1.0, 10.0))
    recorder.observe(3.0)
    status = StatusReply(distribution_durations_s=recorder.snapshot())
    page = metrics.render(status).decode()
    families = {f.name: f for f in text_string_to_metric_families(page)}
    samples = {
        (s.name, s.labels.get("le")): s.value
        for s in families["gatefleet_distribution_duration_seconds"].samples
    }
    assert samples[("gatefleet_distribution_duration_seconds_bucket", "1.0")] == 0
    assert samples[("gatefleet_distribution_duration_seconds_bucket", "10.0")] == 1
    assert samples[("gatefleet_distribution_duration_seconds_bucket", "+Inf")] == 1
    assert samples[("gatefleet_distribution_duration_seconds_sum", None)] == 3.0
    assert families["gatefleet_up"].samples[0].value == 1


def test_no_status_is_up_zero_alone() -> None:
    families = list(text_string_to_metric_families(metrics.render(None).decode()))
    assert [(f.name, f.samples[0].value) for f in families] == [("gatefleet_up", 0.0)]
