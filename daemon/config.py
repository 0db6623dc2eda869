"""Settings: built-in defaults < TOML file < environment `ANVIL_*` < CLI flags.

Every key is declared once in `FIELDS`; an unknown key or a bad value anywhere
is refused with a ConfigError naming the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.capability_config import LocalCapability, example_capabilities, parse_capabilities
from daemon.exceptions import ConfigError
from daemon.registry.jobs import MAX_INLINE_OUTPUT
from daemon.registry.models import DEFAULT_QUEUE_TIMEOUT_MS, MAX_QUEUE_TIMEOUT_MS

DEFAULT_CONFIG_FILE = Path("/etc/anvil-compute/config.toml")
ENV_PREFIX = "ANVIL_"


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "anvil-compute"


def _path(value: Any) -> Path:
    if not isinstance(value, (str, Path)) or not str(value):
        raise ValueError("expected a non-empty path")
    return Path(value).expanduser()


def _optional_str(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    return value


def _cdi_devices(value: Any) -> tuple[str, ...]:
    """CDI device names: a TOML list, or one comma-separated string (from ANVIL_*)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ValueError("expected a list of CDI device names")
    names = tuple(i.strip() for i in items if i.strip())
    for name in names:
        vendor, _, rest = name.partition("/")
        if not vendor or "=" not in rest or rest.startswith("=") or rest.endswith("="):
            raise ValueError(f"{name!r} is not a CDI device name like 'nvidia.com/gpu=all'")
    if not names:
        raise ValueError("expected at least one CDI device name")
    return names


def _listen(value: Any) -> str:
    text = _str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected HOST:PORT")
    return text


def _optional_path(value: Any) -> Path | None:
    return None if value in (None, "") else _path(value)


def _auth(value: Any) -> bool:
    # Off only when spelled out: a typo must not silently disable auth.
    if value in ("on", True):
        return True
    if value in ("off", False):
        return False
    raise ValueError("expected 'on' or 'off'")


def _optional_listen(value: Any) -> str | None:
    return None if value in (None, "") else _listen(value)


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _log_level(value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")
    return value.lower()


def _positive_float(value: Any) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError("expected a positive number")
    return number


def _non_negative_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number >= 0")
    number = float(value)
    if not 0 <= number < float("inf"):
        raise ValueError("expected a number >= 0")
    return number


def _non_negative_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected an integer >= 0")
    number = int(value)
    if number < 0:
        raise ValueError("expected an integer >= 0")
    return number


def _positive_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a positive integer")
    number = int(value)
    if number < 1:
        raise ValueError("expected a positive integer")
    return number


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    data_dir: Path
    database_url: str | None
    listen: str
    region: str
    peer_ttl_s: float
    db_pool_size: int
    advertise: str | None
    auth: bool
    auth_secret_file: Path | None
    tls_cert_file: Path | None
    tls_key_file: Path | None
    tls_client_ca_file: Path | None
    peer_tls_ca_file: Path | None
    peer_tls_cert_file: Path | None
    peer_tls_key_file: Path | None
    lease_s: float
    poll_interval_s: float
    heartbeat_s: float
    default_timeout_ms: int
    balance: float
    drain_grace_s: float
    job_retention_s: float
    cache_max_bytes: int
    max_inline_output: int
    wasm_workers: int
    max_running_jobs: int
    max_output_bytes: int
    max_output_files: int
    max_job_timeout_s: float
    queue_timeout_s: float
    max_store_bytes: int
    podman_socket: str | None
    gpu_devices: tuple[str, ...]
    capabilities: tuple[LocalCapability, ...]
    metrics_listen: str | None
    log_level: str

    @property
    def embedded_database(self) -> bool:
        return self.database_url is None

    @property
    def secret_path(self) -> Path:
        return self.auth_secret_file or self.data_dir / "auth.secret"

    @property
    def token_path(self) -> Path:
        return self.data_dir / "client.token"

    @property
    def operator_token_path(self) -> Path:
        return self.data_dir / "operator.token"


# key -> (parser, default factory, help)
FIELDS: dict[str, tuple[Callable[[Any], Any], Callable[[], Any], str]] = {
    "data_dir": (_path, _default_data_dir, "state directory (peer id, store, embedded db)"),
    "database_url": (
        _optional_str,
        lambda: None,
        "PostgreSQL URL; empty = embedded server in the data dir",
    ),
    "listen": (_listen, lambda: "127.0.0.1:50051", "gRPC listen address HOST:PORT"),
    "region": (_str, lambda: "local", "region this peer serves"),
    "peer_ttl_s": (
        _positive_float,
        lambda: 15.0,
        "seconds without a heartbeat before a peer counts as down",
    ),
    "db_pool_size": (_positive_int, lambda: 10, "maximum PostgreSQL connections"),
    "advertise": (
        _optional_listen,
        lambda: None,
        "HOST:PORT other peers dial (default: the listen address)",
    ),
    "auth": (_auth, lambda: True, "'on' (default) or 'off': bearer JWT on every call"),
    "auth_secret_file": (
        _optional_path,
        lambda: None,
        "HS256 secret shared by the peers (default: DATA_DIR/auth.secret)",
    ),
    "tls_cert_file": (_optional_path, lambda: None, "server certificate (PEM); enables TLS"),
    "tls_key_file": (_optional_path, lambda: None, "server private key (PEM)"),
    "tls_client_ca_file": (
        _optional_path,
        lambda: None,
        "CA for client certificates; enables mTLS",
    ),
    "peer_tls_ca_file": (_optional_path, lambda: None, "CA to verify peers (enables TLS to peers)"),
    "peer_tls_cert_file": (_optional_path, lambda: None, "client certificate for peer links"),
    "peer_tls_key_file": (_optional_path, lambda: None, "client key for peer links"),
    "lease_s": (_positive_float, lambda: 10.0, "job lease; renewed every lease/3"),
    "poll_interval_s": (_positive_float, lambda: 1.0, "queue poll interval (backstop)"),
    "heartbeat_s": (_positive_float, lambda: 3.0, "peer heartbeat interval"),
    "default_timeout_ms": (_positive_int, lambda: 60_000, "job timeout when none is given"),
    "balance": (_positive_float, lambda: 1.25, "bounded-load factor c (>= 1)"),
    "drain_grace_s": (_positive_float, lambda: 30.0, "SIGTERM: time to finish running jobs"),
    "job_retention_s": (
        _non_negative_float,
        lambda: 7 * 24 * 3600.0,
        "seconds a finished job (and its events) is kept; 0 = forever",
    ),
    "cache_max_bytes": (_positive_int, lambda: 10 * 1024**3, "object cache size bound"),
    "max_inline_output": (
        _positive_int,
        lambda: 1024 * 1024,
        "stdout up to this size is stored inline; more becomes an object",
    ),
    "max_running_jobs": (
        _positive_int,
        lambda: 32,
        "jobs this peer runs at once over all capabilities (more stay queued here)",
    ),
    "max_output_bytes": (
        _positive_int,
        lambda: 1024**3,
        "bytes a guest may leave in /output, bounded while it runs",
    ),
    "max_output_files": (
        _positive_int,
        lambda: 1000,
        "files a guest may leave in /output, bounded while it runs",
    ),
    "max_job_timeout_s": (
        _positive_float,
        lambda: 3600.0,
        "ceiling on any job's timeout; a capability's timeout_ms may only lower it",
    ),
    "queue_timeout_s": (
        _positive_float,
        lambda: DEFAULT_QUEUE_TIMEOUT_MS / 1000,
        "seconds a job may wait queued for a peer before it fails; a job's queue_timeout_ms "
        "overrides it",
    ),
    "max_store_bytes": (
        _non_negative_int,
        lambda: 0,
        "bytes the built-in store may hold on this peer (0 = until the disk is full)",
    ),
    "wasm_workers": (
        _non_negative_int,
        lambda: 0,
        "WASM worker processes (0 = one per core, at most 8, plus one)",
    ),
    "podman_socket": (
        _optional_str,
        lambda: None,
        "Podman API socket for container capabilities (default /run/podman/podman.sock)",
    ),
    "gpu_devices": (
        _cdi_devices,
        lambda: ("nvidia.com/gpu=all",),
        "CDI devices a container of a capability with a `gpu` resource gets",
    ),
    "capabilities": (
        parse_capabilities,
        example_capabilities,
        "capability tables (default: the example guest modules)",
    ),
    "metrics_listen": (
        _optional_listen,
        lambda: "127.0.0.1:9464",
        "Prometheus /metrics HTTP address HOST:PORT; empty = no metrics server",
    ),
    "log_level": (_log_level, lambda: "info", "debug, info, warning, error or critical"),
}
assert set(FIELDS) == {f.name for f in dataclasses.fields(Settings)}


def _apply(values: dict[str, Any], source: Mapping[str, Any], origin: str) -> None:
    for key, raw in source.items():
        if key not in FIELDS:
            raise ConfigError(f"unknown setting {key!r} in {origin}")
        parser = FIELDS[key][0]
        try:
            values[key] = parser(raw)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"bad value for {key!r} in {origin}: {raw!r} ({exc})") from exc


def load(
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Resolve the settings; raise ConfigError on an unknown key, a bad value or bad TOML.

    `config_file` None means the default path if it exists; a path given
    explicitly must exist. Overrides whose value is None are ignored (unset flags).
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {key: spec[1]() for key, spec in FIELDS.items()}

    explicit = config_file is not None or bool(environ.get("ANVIL_CONFIG"))
    path = config_file or Path(environ.get("ANVIL_CONFIG") or DEFAULT_CONFIG_FILE)
    if path.exists():
        try:
            data = tomllib.loads(path.read_text("utf-8"))
        except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        _apply(values, data, str(path))
    elif explicit:
        raise ConfigError(f"config file {path} does not exist")

    env_values = {
        name[len(ENV_PREFIX) :].lower(): value
        for name, value in environ.items()
        if name.startswith(ENV_PREFIX) and name not in IGNORED_ENV
    }
    _apply(values, env_values, "the environment (ANVIL_*)")
    _apply(values, {k: v for k, v in (overrides or {}).items() if v is not None}, "flags")
    if (values["tls_cert_file"] is None) != (values["tls_key_file"] is None):
        raise ConfigError("tls_cert_file and tls_key_file must be set together")
    if values["tls_client_ca_file"] is not None and values["tls_cert_file"] is None:
        raise ConfigError("tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file")
    if values["max_inline_output"] > MAX_INLINE_OUTPUT:
        raise ConfigError(
            f"bad value for 'max_inline_output': {values['max_inline_output']} "
            f"(the registry keeps at most {MAX_INLINE_OUTPUT} bytes inline)"
        )
    if not 0.001 <= values["queue_timeout_s"] <= MAX_QUEUE_TIMEOUT_MS / 1000:
        raise ConfigError(
            f"bad value for 'queue_timeout_s': {values['queue_timeout_s']} "
            f"(must be between 0.001 and {MAX_QUEUE_TIMEOUT_MS // 1000} seconds)"
        )
    if values["balance"] < 1:
        raise ConfigError(f"bad value for 'balance': {values['balance']} (must be >= 1)")
    return Settings(**values)


# ANVIL_* variables that are not settings: the config path itself, and
# variables read by other parts (client token, test fixtures).
IGNORED_ENV = frozenset(
    {"ANVIL_CONFIG", "ANVIL_TOKEN", "ANVIL_TEST_DATABASE_URL", "ANVIL_HRW_VECTORS"}
)
