"""Configuration loading: defaults, user file key by key, --nats, and one-line errors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
import tomli

from gatefleet.config import (
    ConfigError,
    config_warnings,
    format_key_path,
    load_settings,
    resolve_data_dir,
    resolve_replica_id,
)
from schemas.settings import BusSettings, GatewayEntry, Settings

DEFAULT_TOML = Path(__file__).resolve().parent.parent / "config" / "default.toml"
SEED = """\
[orchestrator]
enabled = true
distribution_batch_size = 5
distribution_retry_count = 3
distribution_retry_delay_ms = 1000
load_balancing_strategy = "RoundRobin"  # RoundRobin, LeastConnections, WeightedRandom, LatencyBased, RegionAware
health_threshold_percent = 70.0
ha_enabled = true
"""


def write(tmp_path: Path, text: str, name: str = "gf.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- config/default.toml -------------------------------------------------------------------


def test_default_toml_is_exactly_the_settings_defaults() -> None:
    assert load_settings(DEFAULT_TOML, env={}) == Settings()
    # Not only through the merge: the file on its own converts to the defaults.
    assert msgspec.convert(tomli.loads(DEFAULT_TOML.read_text()), Settings) == Settings()


def _missing_keys(data: dict[str, Any], struct: msgspec.Struct, prefix: str) -> list[str]:
    missing = []
    for field in msgspec.structs.fields(struct):
        value = getattr(struct, field.name)
        if isinstance(value, msgspec.Struct) and isinstance(data.get(field.encode_name), dict):
            missing += _missing_keys(data[field.encode_name], value, f"{prefix}{field.name}.")
        elif field.encode_name not in data:
            missing.append(prefix + field.name)
    return missing


def test_default_toml_lists_every_key() -> None:
    data = tomli.loads(DEFAULT_TOML.read_text())
    # TOML has no null, and regions/gateways are empty by default: those are commented examples.
    absent = ["load_balancing.random_seed", "regions", "gateways"]
    assert _missing_keys(data, Settings(), "") == absent
    assert "# random_seed = " in DEFAULT_TOML.read_text()


def test_default_toml_starts_with_the_seed_section_verbatim() -> None:
    text = DEFAULT_TOML.read_text()
    assert SEED in text
    assert text.index(SEED) < text.index("distribution_ack_timeout_ms")
    assert text.index("[orchestrator]") == text.index(SEED)


def test_default_toml_examples_are_valid(tmp_path: Path) -> None:
    lines = DEFAULT_TOML.read_text().splitlines()
    start = lines.index("# Example (uncomment to use):") + 1
    example = "\n".join(line.removeprefix("#").removeprefix(" ") for line in lines[start:])
    settings = load_settings(write(tmp_path, example), env={})
    assert settings.regions == {"eu-west": ["eu-central", "us-east"], "eu-central": ["eu-west"]}
    assert [g.id for g in settings.gateways] == ["gw-eu-1", "gw-eu-2"]
    assert settings.gateways[1].backup_for == "gw-eu-1"


# --- merging and where the file comes from ---------------------------------------------------


def test_no_file_gives_the_defaults() -> None:
    assert load_settings(env={}) == Settings()
    assert load_settings(env={"GATEFLEET_CONFIG": ""}) == Settings()


def test_user_file_overrides_key_by_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [orchestrator]
        distribution_batch_size = 10
        load_balancing_strategy = "LatencyBased"
        [health.weights]
        cpu = 1.0
        [bus]
        url = "nats://nats.example:4222"
        """,
    )
    settings = load_settings(path, env={})
    defaults = Settings()
    assert settings.orchestrator == msgspec.structs.replace(
        defaults.orchestrator, distribution_batch_size=10, load_balancing_strategy="LatencyBased"
    )
    assert settings.health.weights == msgspec.structs.replace(defaults.health.weights, cpu=1.0)
    assert settings.health.fall == defaults.health.fall
    assert settings.bus == BusSettings(url="nats://nats.example:4222")
    assert settings.ha == defaults.ha
    assert isinstance(settings.orchestrator.health_threshold_percent, float)


def test_arrays_and_regions_come_from_the_user_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        regions = { us-east = ["us-west"] }
        [[gateways]]
        id = "a"
        region = "us-east"
        [[gateways]]
        id = "b"
        region = "us-east"
        role = "backup"
        backup_for = "a"
        """,
    )
    settings = load_settings(path, env={})
    assert settings.regions == {"us-east": ["us-west"]}
    assert settings.gateways == [
        GatewayEntry(id="a", region="us-east"),
        GatewayEntry(id="b", region="us-east", role="backup", backup_for="a"),
    ]


def test_gatefleet_config_env_names_the_file(tmp_path: Path) -> None:
    from_env = write(tmp_path, "[health]\nfall = 7\n", "env.toml")
    explicit = write(tmp_path, "[health]\nfall = 9\n", "explicit.toml")
    env = {"GATEFLEET_CONFIG": str(from_env)}
    assert load_settings(env=env).health.fall == 7
    assert load_settings(explicit, env=env).health.fall == 9


@pytest.mark.parametrize(
    ("health", "warned"),
    [
        ("", False),  # the defaults: fall 3, share 0.5 (limit 0.83)
        ("fall = 1\n", True),  # limit 0.17
        ("fall = 1\nlag_suspend_share = 0.1\n", False),
        ("lag_suspend_share = 0.9\n", True),
    ],
)
def test_a_lag_share_that_voids_the_fall_rule_is_warned_of(
    tmp_path: Path, health: str, warned: bool
) -> None:
    settings = load_settings(write(tmp_path, "[health]\n" + health), env={})
    lines = config_warnings(settings)
    assert len(lines) == int(warned)
    assert all(line.startswith("health.lag_suspend_share = ") for line in lines)


def test_nats_url_overrides_bus_url(tmp_path: Path) -> None:
    path = write(tmp_path, '[bus]\nurl = "nats://from-file:4222"\nport = 0\n')
    settings = load_settings(path, nats_url="nats://from-flag:4222", env={})
    assert settings.bus.url == "nats://from-flag:4222"
    assert settings.bus.port == 0
    assert load_settings(nats_url="nats://x:1", env={}).bus.url == "nats://x:1"
    assert load_settings(path, env={}).bus.url == "nats://from-file:4222"
    bad = write(tmp_path, "bus = 5\n", "bad.toml")
    with pytest.raises(ConfigError, match=r"bad\.toml: bus: expected a table, got an integer$"):
        load_settings(bad, nats_url="nats://x:1", env={})


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        (
            "[orchestrator]\nhealth_treshold_percent = 50.0\n",
            "orchestrator.health_treshold_percent",
            "unknown key (did you mean 'health_threshold_percent'?)",
        ),
        (
            "[orchestrater]\nenabled = true\n",
            "orchestrater",
            "unknown section (did you mean 'orchestrator'?)",
        ),
        ("[metrics]\nenabled = true\n", "metrics", "unknown section"),
        ("[health.weights]\ncpuu = 1.0\n", "health.weights.cpuu", "did you mean 'cpu'?"),
        (
            "[[gateways]]\nid = 'a'\nregoin = 'r'\n",
            "gateways[0].regoin",
            "unknown key (did you mean 'region'?)",
        ),
        (
            '[orchestrator]\ndistribution_batch_size = "5"\n',
            "orchestrator.distribution_batch_size",
            "expected an integer, got a string",
        ),
        ("[orchestrator]\nenabled = 1\n", "orchestrator.enabled", "expected a boolean"),
        ("orchestrator = 5\n", "orchestrator", "expected a table, got an integer"),
        (
            "[orchestrator]\ndistribution_batch_size = 0\n",
            "orchestrator.distribution_batch_size",
            "expected an integer >= 1, got 0",
        ),
        (
            "[orchestrator]\nhealth_threshold_percent = 101.0\n",
            "orchestrator.health_threshold_percent",
            "expected a float <= 100.0, got 101.0",
        ),
        (
            "[orchestrator]\nload_balancing_strategy = 'roundrobin'\n",
            "orchestrator.load_balancing_strategy",
            "got 'roundrobin' (did you mean 'RoundRobin'?)",
        ),
        ("[bus]\nport = 70000\n", "bus.port", "expected an integer <= 65535, got 70000"),
        ("[cluster]\nreplica_id = 'a.b'\n", "cluster.replica_id", "expected a string matching"),
        ("[cluster]\nlease_ms = 500\n", "cluster.lease_ms", "expected an integer >= 1000, got 500"),
        ("[bus]\nreplicas = 6\n", "bus.replicas", "expected an integer <= 5, got 6"),
        ("[bus]\nreplicas = 3\n", "bus.replicas", "more than 1 needs a NATS cluster ([bus] url)"),
        ("[regions]\neu = 'x'\n", "regions.eu", "expected an array, got a string"),
        ("[[gateways]]\nid = 'a'\n", "gateways[0].region", "missing required key"),
        (
            "[[gateways]]\nid = 'a'\nregion = 'r'\n[[gateways]]\nid = 'a'\nregion = 'r'\n",
            "gateways[1].id",
            "duplicate gateway id 'a', already used by gateways[0]",
        ),
        (
            "[[gateways]]\nid = 'a'\nregion = 'r'\nbackup_for = 'a'\n",
            "gateways[0].backup_for",
            "cannot be its own backup",
        ),
        (
            "[load_balancing]\nregion_inner_strategy = 'RegionAware'\n",
            "load_balancing.region_inner_strategy",
            "RegionAware cannot be its own inner strategy",
        ),
        ("[http]\nlisten = 'localhost'\n", "http.listen", "expected HOST:PORT, got 'localhost'"),
    ],
)
def test_invalid_value_is_one_line_with_file_key_and_reason(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {key}: ")
    assert reason in message
    assert caught.value.file == str(path)
    assert caught.value.where == key


def test_first_unknown_key_in_file_order_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "[bus]\nurll = ''\n[health]\nfal = 1\n")
    with pytest.raises(ConfigError, match=r"bus\.urll: unknown key \(did you mean 'url'\?\)$"):
        load_settings(path, env={})


def test_replicas_on_a_cluster_named_by_several_urls(tmp_path: Path) -> None:
    path = write(tmp_path, "[bus]\nreplicas = 3\n")
    urls = "nats://a:4222,nats://b:4222,nats://c:4222"
    assert load_settings(path, nats_url=urls, env={}).bus.replicas == 3


def test_replica_id_is_the_configured_one_else_the_host_name_and_a_random_suffix(
    tmp_path: Path,
) -> None:
    configured = load_settings(write(tmp_path, "[cluster]\nreplica_id = 'gf-a'\n"), env={})
    assert resolve_replica_id(configured) == "gf-a"
    first, second = (resolve_replica_id(Settings(), "web 1.example.com") for _ in range(2))
    assert re.fullmatch(r"web-1-[0-9a-f]{6}", first), first
    assert first != second  # two processes on one host
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", resolve_replica_id(Settings(), "x" * 80))
    assert resolve_replica_id(Settings(), "").startswith("gatefleet-")


def test_valid_listen_is_accepted(tmp_path: Path) -> None:
    for listen in ("127.0.0.1:8080", "[::1]:8080", "localhost:0"):
        path = write(tmp_path, f"[http]\nlisten = '{listen}'\n")
        assert load_settings(path, env={}).http.listen == listen


def test_toml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "[orchestrator]\nenabled = true\nha_enabled = \n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    message = str(caught.value)
    assert message == f"{path}: line 3, column 14: Invalid value"
    assert "\n" not in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"GATEFLEET_CONFIG": str(path)})
    assert str(caught.value) == f"{path}: cannot read: No such file or directory"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bin.toml"
    path.write_bytes(b"[bus]\nurl = '\xff'\n")
    with pytest.raises(ConfigError, match=r": line 2: not valid UTF-8$"):
        load_settings(path, env={})


def test_format_key_path_quotes_keys_that_are_not_bare() -> None:
    assert format_key_path(["gateways", 0, "id"]) == "gateways[0].id"
    assert format_key_path(["regions", "us east", 1]) == 'regions."us east"[1]'
    assert format_key_path(["a\nb"]) == '"a\\nb"'


# --- data directory --------------------------------------------------------------------------


def test_resolve_data_dir() -> None:
    def with_dir(data_dir: str) -> Settings:
        return Settings(bus=BusSettings(data_dir=data_dir))

    env = {"HOME": "/home/u", "XDG_STATE_HOME": "/state"}
    assert resolve_data_dir(with_dir("/srv/gf"), env) == Path("/srv/gf")
    assert resolve_data_dir(with_dir("~/gf"), env) == Path("/home/u/gf")
    assert resolve_data_dir(Settings(), env) == Path("/state/gatefleet")
    assert resolve_data_dir(Settings(), {"HOME": "/home/u"}) == Path(
        "/home/u/.local/state/gatefleet"
    )
    # A relative XDG_STATE_HOME is invalid per the spec and ignored.
    relative = {"HOME": "/home/u", "XDG_STATE_HOME": "state"}
    assert resolve_data_dir(Settings(), relative) == Path("/home/u/.local/state/gatefleet")


def test_a_backup_may_name_a_primary_known_only_by_heartbeat(tmp_path: Path) -> None:
    path = write(
        tmp_path, "[[gateways]]\nid = 'b'\nregion = 'r'\nrole = 'backup'\nbackup_for = 'a'\n"
    )
    assert load_settings(path, env={}).gateways[0].backup_for == "a"
