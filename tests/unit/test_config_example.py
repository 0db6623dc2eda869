"""systemd/config.example.toml: loads, documents every setting, and its examples are valid."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from daemon import config
from daemon.exceptions import ConfigError

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "systemd"
EXAMPLE = SYSTEMD_DIR / "config.example.toml"
# `#key = value` (no space after '#') is an example setting that is off; so is
# a `#[capabilities."..."]` table header. "# text" is documentation.
COMMENTED_SETTING = re.compile(r"^#(?=\[|[A-Za-z_][A-Za-z0-9_]* = )")


def uncommented(text: str) -> str:
    return "\n".join(COMMENTED_SETTING.sub("", line) for line in text.splitlines()) + "\n"


def setting_lines(text: str) -> dict[str, int]:
    """Top-level key -> index of its (possibly commented) line; tables by their name."""
    found: dict[str, int] = {}
    for index, line in enumerate(text.splitlines()):
        match = re.match(r"^#?\[?([A-Za-z_][A-Za-z0-9_]*)[ .=\]]", line)
        if match and (line.startswith("[") or line.startswith("#[") or " = " in line):
            found.setdefault(match.group(1), index)
    return found


def test_the_example_loads_as_it_is() -> None:
    settings = config.load(config_file=EXAMPLE, environ={})
    assert settings.data_dir == Path("/var/lib/anvil-compute")
    # No capability table is switched on: the packaged examples apply.
    assert {c.name for c in settings.capabilities} == {
        c.name for c in config.example_capabilities()
    }


def test_every_setting_is_in_the_example_with_a_comment_above_it() -> None:
    text = EXAMPLE.read_text()
    lines = text.splitlines()
    found = setting_lines(text)
    missing = sorted(set(config.FIELDS) - set(found))
    assert not missing, f"config.example.toml does not document {missing}"
    for key in config.FIELDS:
        above = lines[found[key] - 1]
        assert above.startswith("# "), f"{key}: no comment right above its line"


def test_every_example_value_is_valid_when_switched_on(tmp_path: Path) -> None:
    """Uncommenting every `#key = value` gives a file that sets every key and loads."""
    on = tmp_path / "all-on.toml"
    on.write_text(uncommented(EXAMPLE.read_text()))
    assert set(tomllib.loads(on.read_text())) == set(config.FIELDS)
    settings = config.load(config_file=on, environ={})
    assert settings.database_url is not None
    assert settings.tls_client_ca_file is not None
    assert {c.kind for c in settings.capabilities} == {"wasm", "podman"}


def test_the_example_matches_the_unit() -> None:
    """data_dir is the unit's StateDirectory, and the unit reads the documented path."""
    unit = (SYSTEMD_DIR / "anvil-compute.service").read_text()
    settings = config.load(config_file=EXAMPLE, environ={})
    state = re.search(r"^StateDirectory=(\S+)$", unit, re.M)
    assert state is not None
    assert settings.data_dir == Path("/var/lib") / state.group(1)
    assert f"--config {config.DEFAULT_CONFIG_FILE}" in unit


@pytest.mark.parametrize(
    ("line", "key"),
    [("metrics_listen = 'nowhere'", "metrics_listen"), ("log_level = 'loud'", "log_level")],
)
def test_new_settings_refuse_bad_values(tmp_path: Path, line: str, key: str) -> None:
    file = tmp_path / "bad.toml"
    file.write_text(line + "\n")
    with pytest.raises(ConfigError, match=f"bad value for '{key}'"):
        config.load(config_file=file, environ={})


def test_metrics_can_be_turned_off_and_log_level_set_from_the_environment() -> None:
    settings = config.load(environ={"ANVIL_METRICS_LISTEN": "", "ANVIL_LOG_LEVEL": "WARNING"})
    assert settings.metrics_listen is None
    assert settings.log_level == "warning"
    assert config.load(environ={}).metrics_listen == "127.0.0.1:9464"
