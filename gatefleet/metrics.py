"""`/metrics`: what `P.api.status` counts, as Prometheus text through prometheus-client.

Rendered per scrape from one status reply and, for a fleet of at most
`[http] per_gateway_metrics_max` gateways, the gateways list (each gateway's heartbeat age
as a gauge: one series per gateway is more than a scrape should carry for a large fleet).
Nothing is kept between scrapes: every number is the orchestrator's own, so a restart of
this bridge changes none of them, and replicas each show their own.

Every known label value is listed, zeros included, so that a series does not vanish
when its count drops to 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import get_args

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from schemas.api import GatewaySnapshot, Histogram, StatusReply
from schemas.types import STRATEGIES, DistributionStatus, GatewayStatus

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
UP_HELP = "1 when gatefleet answered this scrape's requests, else 0."


def render(
    status: StatusReply | None,
    gateways: Sequence[GatewaySnapshot] | None = None,
    now: datetime | None = None,
) -> bytes:
    """The page: `gatefleet_up 0` alone when there is no status (gatefleet did not answer);
    per-gateway heartbeat ages when `gateways` is given (with `now`, the scrape's time)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Scrape(status, gateways, now))
    return generate_latest(registry)


class _Scrape(Collector):
    def __init__(
        self,
        status: StatusReply | None,
        gateways: Sequence[GatewaySnapshot] | None,
        now: datetime | None,
    ) -> None:
        self.status, self.gateways, self.now = status, gateways, now

    def collect(self) -> Iterator[Metric]:
        status = self.status
        yield _gauge("gatefleet_up", UP_HELP, 0 if status is None else 1)
        if status is None:
            return
        yield _gauge(
            "gatefleet_gateways_managed", "Gateways gatefleet tracks.", status.gateways_managed
        )
        yield _labelled(
            GaugeMetricFamily,
            "gatefleet_gateways",
            "Gateways by health status.",
            "status",
            _zeros(get_args(GatewayStatus), status.gateways_by_status),
        )
        yield _gauge(
            "gatefleet_gateways_flapping",
            "Gateways flapping (not selected, not failed back to).",
            status.gateways_flapping,
        )
        yield _gauge(
            "gatefleet_gateways_in_maintenance",
            "Gateways in maintenance (drained by an operator).",
            status.gateways_in_maintenance,
        )
        yield _labelled(
            CounterMetricFamily,
            "gatefleet_selections",
            "Gateway selections served since start, by the strategy in force.",
            "strategy",
            _zeros(STRATEGIES, status.selections),
        )
        yield _labelled(
            GaugeMetricFamily,
            "gatefleet_distributions",
            "Configuration distributions on record, by state.",
            "state",
            _zeros(get_args(DistributionStatus), status.distributions_by_state),
        )
        yield _labelled(
            CounterMetricFamily,
            "gatefleet_malformed_messages",
            "Messages dropped as malformed since start, by cause.",
            "cause",
            status.malformed_messages,
        )
        yield _labelled(
            CounterMetricFamily,
            "gatefleet_permission_violations",
            "Permission violations since start, by user (from the embedded server's log).",
            "user",
            status.permission_violations,
        )
        yield _counter(
            "gatefleet_actor_restarts",
            "Actors restarted after a crash since start.",
            status.actor_restarts,
        )
        yield _gauge(
            "gatefleet_orchestrator_lag_ms",
            "How late gatefleet's own event loop runs (local health awareness).",
            status.orchestrator_lag_ms,
        )
        yield _gauge(
            "gatefleet_detection_suspended",
            "1 while missed heartbeats are not counted (gatefleet disconnected or lagging).",
            int(status.detection_suspended),
        )
        yield _counter(
            "gatefleet_detection_suspended_seconds",
            "Seconds gatefleet did not count missed heartbeats since start.",
            status.detection_suspended_s,
        )
        yield _labelled(
            CounterMetricFamily,
            "gatefleet_shed",
            "Work shed under overload since start: requests answered unavailable, heartbeats "
            "coalesced away, probes not sent.",
            "kind",
            _zeros(("requests", "heartbeats", "probes"), status.shed),
        )
        yield _labelled(
            CounterMetricFamily,
            "gatefleet_probes",
            "Latency probes since start, by outcome.",
            "outcome",
            status.probes,
        )
        yield _counter(
            "gatefleet_events_lost",
            "Events the audit stream could not store since start (each reported by an "
            "audit.gap event).",
            status.events_lost,
        )
        yield _gauge(
            "gatefleet_health_threshold_percent",
            "Health score a gateway needs to be selectable.",
            status.health_check_threshold,
        )
        strategy = GaugeMetricFamily(
            "gatefleet_load_balancing_strategy",
            "The load-balancing strategy in force (always 1, the strategy is the label).",
            labels=["strategy"],
        )
        strategy.add_metric([status.load_balancing_strategy], 1)
        yield strategy
        yield _labelled(
            GaugeMetricFamily,
            "gatefleet_part_ok",
            "1 when the part (nats, jetstream, each top-level actor) is ok, else 0.",
            "part",
            {part: int(state == "ok") for part, state in status.health.items()},
        )
        if status.selection_latency_s:
            latency = HistogramMetricFamily(
                "gatefleet_selection_latency_seconds",
                "How long selections took, from the request's arrival to the reply, by strategy.",
                labels=["strategy"],
            )
            for name, h in sorted(status.selection_latency_s.items()):
                latency.add_metric([name], _buckets(h), h.sum)
            yield latency
        if status.distribution_durations_s is not None:
            yield _histogram(
                "gatefleet_distribution_duration_seconds",
                "How long distributions took, created to ended (those that ended since start).",
                status.distribution_durations_s,
            )
        if self.gateways is not None and self.now is not None:
            yield _heartbeat_ages(self.gateways, self.now)


def _heartbeat_ages(gateways: Iterable[GatewaySnapshot], now: datetime) -> Metric:
    ages = GaugeMetricFamily(
        "gatefleet_gateway_heartbeat_age_seconds",
        "Seconds since each gateway's last accepted heartbeat (only for fleets of at most "
        "[http] per_gateway_metrics_max gateways).",
        labels=["gateway", "region"],
    )
    for g in gateways:
        if g.last_seen is not None:
            ages.add_metric([g.gateway_id, g.region], max(0.0, (now - g.last_seen).total_seconds()))
    return ages


def _histogram(name: str, help_text: str, h: Histogram) -> Metric:
    return HistogramMetricFamily(name, help_text, buckets=_buckets(h), sum_value=h.sum)


def _buckets(h: Histogram) -> list[tuple[str, float]]:
    bounded = [(str(bound), float(n)) for bound, n in zip(h.bounds, h.counts, strict=True)]
    return [*bounded, ("+Inf", float(h.count))]


def _gauge(name: str, help_text: str, value: float) -> Metric:
    return GaugeMetricFamily(name, help_text, value=value)


def _counter(name: str, help_text: str, value: float) -> Metric:
    return CounterMetricFamily(name, help_text, value=value)


def _labelled(
    kind: type[GaugeMetricFamily] | type[CounterMetricFamily],
    name: str,
    help_text: str,
    label: str,
    counts: dict[str, int],
) -> Metric:
    family = kind(name, help_text, labels=[label])
    for value, count in sorted(counts.items()):
        family.add_metric([value], count)
    return family


def _zeros(known: tuple[str, ...], counts: dict[str, int]) -> dict[str, int]:
    """Every known label with its count, 0 where there is none."""
    return dict.fromkeys(known, 0) | counts
