"""The capabilities this peer offers, from its config (`[capabilities."name"]` tables).

```toml
[capabilities."text:wordcount"]
wasm = "/opt/anvil/text-wordcount.wasm"   # a path on this peer, an object ref,
                                          # or builtin:text-wordcount (an example)
sha256 = "…"                              # optional: expected module digest
max_concurrency = 4
resources = { memory_mib = "512" }
timeout_ms = 30000                        # default and ceiling of a job's timeout
fuel = 10_000_000_000                     # per-run limits (0 = executor default)
memory_mib = 256

[capabilities."demo:busybox-wc"]
podman_image = "sha256:…"                 # pinned by digest, never pulled
podman_archive = "anvil://images/busybox.oci.tar?sha256=…"  # optional: `podman load`ed
command = ["wc", "-w"]                    # from this object when the image is missing
```

With no `capabilities` table, a peer offers the example guest modules shipped
with the package (`guest_modules/dist`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from daemon import resources as resources_mod
from daemon.exceptions import ConfigError, InvalidArgument
from daemon.registry.models import validate_capability
from daemon.storage.refs import parse_ref

EXAMPLE_MODULES: dict[str, str] = {
    "text:wordcount": "text-wordcount.wasm",
    "data:csv-aggregate": "data-csv-aggregate.wasm",
    "image:resize": "image-resize.wasm",
    "inference:digits": "inference-digits.wasm",
}

_KEYS = frozenset(
    {
        "wasm",
        "sha256",
        "podman_image",
        "podman_archive",
        "command",
        "max_concurrency",
        "resources",
        "timeout_ms",
        "fuel",
        "memory_mib",
        "cpu_millis",
        "pids",
    }
)


@dataclass(frozen=True, kw_only=True, slots=True)
class CapabilityLimits:
    """Per-run limits; 0 means the executor's default."""

    timeout_ms: int = 0
    fuel: int = 0
    memory_mib: int = 0
    cpu_millis: int = 0
    pids: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class LocalCapability:
    name: str
    kind: str  # "wasm" | "podman"
    module: str = ""  # wasm: path or object ref
    module_sha256: str = ""
    image: str = ""  # podman: image pinned by digest
    image_archive: str = ""  # podman: object ref of an image archive to load if missing
    command: tuple[str, ...] = ()
    max_concurrency: int = 1
    resources: Mapping[str, str] = field(default_factory=dict)
    limits: CapabilityLimits = field(default_factory=CapabilityLimits)

    def timeout_ms(self, job_ms: int, *, default_ms: int, ceiling_ms: int) -> int:
        """One attempt's timeout: the job's own, never above this capability's (or,
        when it sets none, the operator's `ceiling_ms`); the capability's (else
        `default_ms`) when the job gives none. The capability's value is thus both
        the default and a ceiling a job may only lower."""
        ceiling = min(self.limits.timeout_ms or ceiling_ms, ceiling_ms)
        wanted = job_ms or self.limits.timeout_ms or default_ms
        return min(wanted, ceiling)

    def executor_message(self) -> dict[str, Any]:
        """The executor description registered for other peers and operators to see."""
        limits = {
            k: v
            for k, v in (
                ("timeout_ms", self.limits.timeout_ms),
                ("fuel", self.limits.fuel),
                ("memory_mib", self.limits.memory_mib),
                ("cpu_millis", self.limits.cpu_millis),
                ("pids", self.limits.pids),
            )
            if v
        }
        if self.kind == "wasm":
            body: dict[str, Any] = {"module_ref": self.module}
            if self.module_sha256:
                body["module_sha256"] = self.module_sha256
        else:
            body = {"image": self.image, "command": list(self.command)}
        if limits:
            # uint64 fields travel as strings in protobuf's JSON mapping.
            body["limits"] = {
                k: str(v) if k in {"timeout_ms", "fuel"} else v for k, v in limits.items()
            }
        return {self.kind: body}


def from_registered(
    name: str, executor: Mapping[str, Any], *, max_concurrency: int, resources: Mapping[str, str]
) -> LocalCapability:
    """The capability a deployed registry row describes (the inverse of
    `executor_message`). Raises InvalidArgument for an executor it cannot run."""
    for kind in ("wasm", "podman"):
        body = executor.get(kind)
        if isinstance(body, Mapping):
            break
    else:
        raise InvalidArgument(f"capability {name!r}: its executor names neither wasm nor podman")
    raw = body.get("limits") or {}
    try:
        limits = CapabilityLimits(
            **{f.name: int(raw.get(f.name, 0)) for f in fields(CapabilityLimits)}
        )
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"capability {name!r}: bad limits {dict(raw)!r}") from exc
    return LocalCapability(
        name=name,
        kind=kind,
        module=str(body.get("module_ref", "")),
        module_sha256=str(body.get("module_sha256", "")),
        image=str(body.get("image", "")),
        command=tuple(str(c) for c in body.get("command") or ()),
        max_concurrency=max_concurrency,
        resources=dict(resources),
        limits=limits,
    )


def _int(name: str, key: str, value: Any, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"capabilities.{name!r}.{key}: expected an integer >= {minimum}")
    return value


def parse_capability(name: str, table: Mapping[str, Any]) -> LocalCapability:
    """One `[capabilities."name"]` table; raise ConfigError naming the bad key."""
    try:
        validate_capability(name)
    except InvalidArgument as exc:
        raise ConfigError(f"capabilities: {exc}") from exc
    if not isinstance(table, Mapping):
        raise ConfigError(f"capabilities.{name!r} must be a table")
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r} in capabilities.{name!r}")
    has_wasm, has_podman = "wasm" in table, "podman_image" in table
    if has_wasm == has_podman:
        raise ConfigError(f"capabilities.{name!r}: set exactly one of 'wasm' or 'podman_image'")
    try:
        res = resources_mod.validate(table.get("resources", {}), field="resources")
    except InvalidArgument as exc:
        raise ConfigError(f"capabilities.{name!r}.{exc}") from exc
    archive = table.get("podman_archive", "")
    if archive:
        if not has_podman:
            raise ConfigError(f"capabilities.{name!r}.podman_archive: needs podman_image")
        try:
            parse_ref(str(archive))
        except InvalidArgument as exc:
            raise ConfigError(f"capabilities.{name!r}.podman_archive: {exc}") from exc
    command = table.get("command", [])
    if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
        raise ConfigError(f"capabilities.{name!r}.command: expected a list of strings")
    limits = CapabilityLimits(
        timeout_ms=_int(name, "timeout_ms", table.get("timeout_ms", 0)),
        fuel=_int(name, "fuel", table.get("fuel", 0)),
        memory_mib=_int(name, "memory_mib", table.get("memory_mib", 0)),
        cpu_millis=_int(name, "cpu_millis", table.get("cpu_millis", 0)),
        pids=_int(name, "pids", table.get("pids", 0)),
    )
    return LocalCapability(
        name=name,
        kind="wasm" if has_wasm else "podman",
        module=builtin_module(name, str(table.get("wasm", ""))),
        module_sha256=str(table.get("sha256", "")),
        image=str(table.get("podman_image", "")),
        image_archive=str(archive),
        command=tuple(command),
        max_concurrency=_int(name, "max_concurrency", table.get("max_concurrency", 2), minimum=1),
        resources=res,
        limits=limits,
    )


def parse_capabilities(value: Any) -> tuple[LocalCapability, ...]:
    if not isinstance(value, Mapping):
        raise ValueError("expected a table of capability tables")
    return tuple(parse_capability(name, table) for name, table in value.items())


BUILTIN_PREFIX = "builtin:"


def builtin_module(capability: str, module: str) -> str:
    """`builtin:text-wordcount` names an example module shipped with the package (its
    path); anything else is returned as it is. Raises ConfigError for an unknown one."""
    if not module.startswith(BUILTIN_PREFIX):
        return module
    name = module[len(BUILTIN_PREFIX) :]
    known = {file.removesuffix(".wasm"): file for file in EXAMPLE_MODULES.values()}
    if name not in known:
        raise ConfigError(
            f"capabilities.{capability!r}.wasm: no builtin module {name!r} "
            f"(there are {', '.join(BUILTIN_PREFIX + k for k in sorted(known))})"
        )
    return str(examples_dir() / known[name])


def examples_dir() -> Path:
    """Where the example guest modules are (the package's `daemon.guest_dist`)."""
    return Path(str(resources.files("daemon.guest_dist")))


def example_capabilities() -> tuple[LocalCapability, ...]:
    base = examples_dir()
    return tuple(
        LocalCapability(name=name, kind="wasm", module=str(base / file), max_concurrency=2)
        for name, file in EXAMPLE_MODULES.items()
        if (base / file).exists()
    )
