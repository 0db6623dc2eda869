"""What a deployed registry row becomes on a peer, `builtin:` modules, and slots that
follow the capabilities as they come and go. Pure."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon import config
from daemon.capability_config import (
    CapabilityLimits,
    LocalCapability,
    examples_dir,
    from_registered,
    parse_capability,
)
from daemon.exceptions import ConfigError, InvalidArgument
from daemon.jobs.slots import Slots


@pytest.mark.parametrize(
    "cap",
    [
        LocalCapability(
            name="text:grep",
            kind="wasm",
            module="anvil://modules/x.wasm?sha256=" + "a" * 64,
            module_sha256="a" * 64,
            max_concurrency=3,
            resources={"memory_mib": "512"},
            limits=CapabilityLimits(timeout_ms=5000, fuel=10**9, memory_mib=64),
        ),
        LocalCapability(
            name="demo:wc",
            kind="podman",
            image="sha256:" + "b" * 64,
            command=("wc", "-w"),
            limits=CapabilityLimits(cpu_millis=500, pids=16),
        ),
    ],
)
def test_a_registered_executor_reads_back_as_the_capability(cap: LocalCapability) -> None:
    back = from_registered(
        cap.name,
        cap.executor_message(),
        max_concurrency=cap.max_concurrency,
        resources=cap.resources,
    )
    assert back == cap


def test_an_executor_of_neither_kind_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="neither wasm nor podman"):
        from_registered("x:y", {}, max_concurrency=1, resources={})
    with pytest.raises(InvalidArgument, match="bad limits"):
        from_registered(
            "x:y",
            {"wasm": {"module_ref": "m", "limits": {"fuel": "lots"}}},
            max_concurrency=1,
            resources={},
        )


def test_builtin_names_the_shipped_example_modules(tmp_path: Path) -> None:
    cap = parse_capability("text:count", {"wasm": "builtin:text-wordcount"})
    assert Path(cap.module) == examples_dir() / "text-wordcount.wasm"
    assert Path(cap.module).is_file()
    with pytest.raises(ConfigError, match=r"no builtin module .nope.*builtin:text-wordcount"):
        parse_capability("text:count", {"wasm": "builtin:nope"})
    # One table of its own does not lose the examples that a config names.
    (tmp_path / "c.toml").write_text(
        '[capabilities."mine:x"]\nwasm = "/opt/x.wasm"\n'
        '[capabilities."text:wordcount"]\nwasm = "builtin:text-wordcount"\n'
    )
    names = {c.name for c in config.load(config_file=tmp_path / "c.toml", environ={}).capabilities}
    assert names == {"mine:x", "text:wordcount"}


def test_slots_follow_capabilities_that_come_and_go() -> None:
    slots = Slots({"wasm": 3}, {"a": "wasm"})
    assert slots.free_for("a") == 3  # alone: every slot
    slots.take("a")
    slots.set_kinds({"a": "wasm", "b": "wasm"})  # b deployed: a keeps one for b
    assert (slots.free_for("a"), slots.free_for("b")) == (1, 2)
    slots.set_kinds({"b": "wasm"})  # a undeployed while its run goes on
    assert slots.free_for("b") == 2
    slots.give_back("a")
    assert slots.free_for("b") == 3
