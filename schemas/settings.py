"""The configuration tree: every key gatefleet reads, with its default and its bounds.

`config/default.toml` mirrors these defaults (a test keeps the two equal). Loading and
error reporting live in `gatefleet.config`; this module is types only.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from schemas.types import GatewayId, Percent, StrategyName, whole

PositiveInt = Annotated[int, Meta(ge=1)]
NonNegativeInt = Annotated[int, Meta(ge=0)]
Milliseconds = Annotated[int, Meta(ge=1, le=86_400_000)]
Port = Annotated[int, Meta(ge=0, le=65535)]
Weight = Annotated[float, Meta(ge=0.0, le=1000.0)]
RegionName = Annotated[str, Meta(min_length=1, max_length=64)]
# Dot-separated NATS tokens, no wildcards.
SubjectPrefix = Annotated[str, whole(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", max_length=128)]
# How long a sticky client's assignment outlives its last selection (the `sticky` bucket's
# max_age; bus/jetstream.py creates the bucket with it).
DEFAULT_STICKY_TTL_S = 3600.0
# Sticky clients each replica remembers (the least recently seen forgotten first), and
# the bucket keeps (the oldest written dropped first).
MAX_STICKY_CLIENTS = 100_000


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base for config sections: a typo in a key is an error, not a silent default."""


class OrchestratorSettings(_Section, frozen=True):
    enabled: bool = True
    distribution_batch_size: PositiveInt = 5
    distribution_retry_count: NonNegativeInt = 3
    distribution_retry_delay_ms: Milliseconds = 1000
    distribution_ack_timeout_ms: Milliseconds = 5000
    # Largest `config_data` accepted by P.api.distribute, as encoded JSON.
    max_config_bytes: Annotated[int, Meta(ge=1, le=64 * 1024 * 1024)] = 1024 * 1024
    load_balancing_strategy: StrategyName = "RoundRobin"
    health_threshold_percent: Percent = 70.0
    ha_enabled: bool = True
    # A failed key-value write (or read) is tried again this many times, the first after
    # kv_write_backoff_ms and each next one after twice the wait before it; then the step
    # that needed it fails (a distribution ends failed, a request gets `unavailable`).
    kv_write_retries: Annotated[int, Meta(ge=0, le=20)] = 3
    kv_write_backoff_ms: Milliseconds = 100
    # Retention: finished distributions kept (the oldest beyond are deleted, per-gateway
    # states and all), and the versions of each config type whose content is kept
    # whatever became of their distributions (besides those some gateway should run).
    distribution_history: Annotated[int, Meta(ge=1, le=1_000_000)] = 1000
    config_history: Annotated[int, Meta(ge=1, le=1_000_000)] = 20


class BusSettings(_Section, frozen=True):
    # Empty: start the embedded nats-server. Otherwise the NATS server(s) to use, several
    # (of one cluster) comma-separated.
    url: str = ""
    # Servers of the cluster that keep a copy of the event stream and of each bucket
    # (JetStream replication): 3 on a three-node cluster. More than 1 needs `url`.
    replicas: Annotated[int, Meta(ge=1, le=5)] = 1
    # Port of the embedded server; 0 picks a free one (clients then find it in data_dir).
    port: Port = 4222
    subject_prefix: SubjectPrefix = "gatefleet"
    # JetStream store of the embedded server. Empty: $XDG_STATE_HOME/gatefleet.
    data_dir: str = ""
    # The embedded server runs with NATS decentralized auth (operator, accounts, users).
    auth: bool = True
    # Host of the embedded server; anything but loopback needs auth (and gets TLS).
    listen: str = "127.0.0.1"
    # A .creds file for gatefleet's own connection to an external server (`url`).
    creds: str = ""
    # TLS of the embedded server (certificate and key, PEM); the CA clients check it with.
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""


class ClusterSettings(_Section, frozen=True):
    # This process among the replicas on one NATS cluster. Empty: the host's name and a
    # short random suffix, new at each start.
    replica_id: Annotated[str, whole(r"[A-Za-z0-9_-]{0,64}")] = ""
    # The leader's lease: it lasts this long unrenewed and is renewed every third of it;
    # a leader that could not renew for two thirds of it stops acting as leader. Writes to
    # the bucket stop for 4-9 s when the NATS node leading it is lost: under about 28 s that
    # mostly costs a step-down (the leader takes its lease back once writes work).
    lease_ms: Annotated[int, Meta(ge=1000, le=600_000)] = 10_000


class HealthWeights(_Section, frozen=True):
    """How much each metric counts in the 0-100 score (normalised by their sum)."""

    cpu: Weight = 0.30
    memory: Weight = 0.25
    connections: Weight = 0.25
    latency: Weight = 0.20
    # Points taken off per consecutive failure (missed heartbeat or failed probe).
    failure_penalty: Weight = 15.0


class HealthSettings(_Section, frozen=True):
    heartbeat_interval_ms: Milliseconds = 1000
    # Consecutive missed heartbeat intervals before a gateway is `down`.
    fall: PositiveInt = 3
    # Consecutive good heartbeats before a degraded or down gateway is `healthy` again.
    rise: PositiveInt = 2
    # gatefleet's own ping of each gateway (0 turns probing off).
    probe_interval_ms: Annotated[int, Meta(ge=0, le=86_400_000)] = 2000
    probe_timeout_ms: Milliseconds = 500
    # Weight of the newest probe in the smoothed response latency (EWMA).
    latency_smoothing: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.3
    # Latency at which the latency part of the score reaches 0.
    latency_budget_ms: Annotated[float, Meta(gt=0.0)] = 500.0
    # Connection count treated as full load when a gateway reports no max_connections.
    connection_reference: PositiveInt = 1000
    # Local health awareness: after gatefleet reconnects to NATS, missed heartbeats count
    # again only this long after (the gateways' own clients reconnect too).
    reconnect_grace_ms: Annotated[int, Meta(ge=0, le=86_400_000)] = 5000
    # ... and while gatefleet's own loop lags by more than this share of the heartbeat
    # interval, missed heartbeats do not count at all.
    lag_suspend_share: Annotated[float, Meta(gt=0.0, le=100.0)] = 0.5
    # A gateway down this long is forgotten (gateway.forgotten), unless [[gateways]] lists
    # it; 0: never.
    forget_after_s: Annotated[float, Meta(ge=0.0, le=365 * 86400.0)] = 86400.0
    # Flapping: this many status changes within flap_window_s (0: never flapping); it
    # ends after flap_hold_s healthy.
    flap_threshold: Annotated[int, Meta(ge=0, le=1000)] = 5
    flap_window_s: Annotated[float, Meta(gt=0.0, le=86400.0)] = 60.0
    flap_hold_s: Annotated[float, Meta(ge=0.0, le=86400.0)] = 30.0
    weights: HealthWeights = msgspec.field(default_factory=HealthWeights)


class LoadBalancingSettings(_Section, frozen=True):
    # Strategy used inside a region by RegionAware.
    region_inner_strategy: StrategyName = "LeastConnections"
    # LatencyBased shares load among gateways within max(percent of best, ms) of the best.
    latency_margin_percent: Annotated[float, Meta(ge=0.0, le=1000.0)] = 10.0
    latency_margin_ms: Annotated[float, Meta(ge=0.0)] = 2.0
    # Seed for WeightedRandom; absent means seeded from the OS.
    random_seed: int | None = None
    # A gateway that registers or recovers ramps up its share of selections linearly over
    # this many seconds (0: at once).
    slow_start_s: Annotated[float, Meta(ge=0.0, le=86400.0)] = 0.0
    # A sticky client's gateway is forgotten this long after its last selection, by every
    # replica (actors/sticky.py).
    sticky_ttl_s: Annotated[float, Meta(ge=1.0, le=30 * 86400.0)] = DEFAULT_STICKY_TTL_S


class HaSettings(_Section, frozen=True):
    failback: Literal["auto", "manual"] = "auto"
    max_failover_percent: Percent = 50.0
    # Window for the mass-failure guard; 0 means (fall + 1) heartbeat intervals.
    detection_window_ms: Annotated[int, Meta(ge=0, le=86_400_000)] = 0


class AuditSettings(_Section, frozen=True):
    record_selections: bool = True
    max_age_hours: Annotated[float, Meta(ge=0.0)] = 720.0  # 0: keep forever
    max_bytes: Annotated[int, Meta(ge=-1)] = 1024 * 1024 * 1024  # -1: no limit
    # How long an event the stream did not store is sent again before it counts as lost
    # (under the stream's 2-minute duplicate window, so a retry is never stored twice).
    event_retry_ms: Annotated[int, Meta(ge=1, le=60_000)] = 30_000


class HttpSettings(_Section, frozen=True):
    # HOST:PORT to serve the HTTP API on; empty: no HTTP API.
    listen: str = ""
    # When set, every API call needs `Authorization: Bearer <token>`.
    token: str = ""
    # /metrics shows each gateway's heartbeat age only for fleets up to this size.
    per_gateway_metrics_max: Annotated[int, Meta(ge=0, le=100_000)] = 1000
    # When set, this token may call the GET endpoints and select-gateway only.
    read_only_token: str = ""


class GatewayEntry(_Section, frozen=True):
    """A gateway named in the config file: known (as `unknown`) before it first beats."""

    id: GatewayId
    region: RegionName
    role: Literal["primary", "backup"] = "primary"
    backup_for: GatewayId | None = None


class Settings(_Section, frozen=True):
    orchestrator: OrchestratorSettings = msgspec.field(default_factory=OrchestratorSettings)
    bus: BusSettings = msgspec.field(default_factory=BusSettings)
    cluster: ClusterSettings = msgspec.field(default_factory=ClusterSettings)
    health: HealthSettings = msgspec.field(default_factory=HealthSettings)
    load_balancing: LoadBalancingSettings = msgspec.field(default_factory=LoadBalancingSettings)
    ha: HaSettings = msgspec.field(default_factory=HaSettings)
    audit: AuditSettings = msgspec.field(default_factory=AuditSettings)
    http: HttpSettings = msgspec.field(default_factory=HttpSettings)
    # Region -> nearer regions, nearest first; used by RegionAware when a region has no one.
    regions: dict[str, list[str]] = msgspec.field(default_factory=dict)
    gateways: list[GatewayEntry] = msgspec.field(default_factory=list)
