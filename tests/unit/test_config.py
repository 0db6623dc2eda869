from pathlib import Path

import pytest

from daemon import config
from daemon.exceptions import ConfigError


def test_defaults_then_file_then_env_then_flags(tmp_path: Path) -> None:
    file = tmp_path / "config.toml"
    file.write_text('region = "eu-1"\nlisten = "0.0.0.0:9000"\ndb_pool_size = 4\n')
    env = {"ANVIL_LISTEN": "127.0.0.1:9001", "ANVIL_TOKEN": "not-a-setting"}
    settings = config.load(config_file=file, environ=env, overrides={"db_pool_size": 7})
    assert settings.region == "eu-1"
    assert settings.listen == "127.0.0.1:9001"
    assert settings.db_pool_size == 7
    assert settings.database_url is None and settings.embedded_database


def test_unknown_key_is_named(tmp_path: Path) -> None:
    file = tmp_path / "config.toml"
    file.write_text("regoin = 'eu-1'\n")
    with pytest.raises(ConfigError, match="unknown setting 'regoin'"):
        config.load(config_file=file, environ={})
    with pytest.raises(ConfigError, match=r"unknown setting .bogus. in the environment"):
        config.load(environ={"ANVIL_BOGUS": "1"})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("listen", "nowhere"),
        ("peer_ttl_s", "-1"),
        ("db_pool_size", "0"),
        ("region", ""),
        ("job_retention_s", "-1"),
        ("job_retention_s", "inf"),
        ("job_retention_s", "nan"),
    ],
)
def test_bad_values_are_named(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"bad value for '{key}'"):
        config.load(environ={f"ANVIL_{key.upper()}": value})


def test_broken_or_missing_explicit_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("region = \n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        config.load(config_file=broken, environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(config_file=tmp_path / "missing.toml", environ={})


def test_inline_output_cannot_exceed_what_the_registry_keeps() -> None:
    with pytest.raises(ConfigError, match="max_inline_output"):
        config.load(environ={"ANVIL_MAX_INLINE_OUTPUT": str(5 * 1024 * 1024)})


def test_job_retention_defaults_to_a_week_and_zero_keeps_jobs() -> None:
    assert config.load(environ={}).job_retention_s == 7 * 24 * 3600
    assert config.load(environ={"ANVIL_JOB_RETENTION_S": "0"}).job_retention_s == 0


@pytest.mark.parametrize("value", ["0", "-5", "0.0004", "nan", "inf", str(31 * 24 * 3600)])
def test_queue_timeout_defaults_to_a_day_and_must_be_positive_and_bounded(value: str) -> None:
    assert config.load(environ={}).queue_timeout_s == 24 * 3600
    assert config.load(environ={"ANVIL_QUEUE_TIMEOUT_S": "90"}).queue_timeout_s == 90
    with pytest.raises(ConfigError, match="bad value for 'queue_timeout_s'"):
        config.load(environ={"ANVIL_QUEUE_TIMEOUT_S": value})


def test_gpu_devices_from_toml_lists_or_comma_separated_env() -> None:
    assert config.load(environ={}).gpu_devices == ("nvidia.com/gpu=all",)
    two = config.load(environ={"ANVIL_GPU_DEVICES": "nvidia.com/gpu=0, nvidia.com/gpu=1"})
    assert two.gpu_devices == ("nvidia.com/gpu=0", "nvidia.com/gpu=1")
    for bad in ("", "gpu", "nvidia.com/gpu=", "nvidia.com/gpu"):
        with pytest.raises(ConfigError, match="bad value for 'gpu_devices'"):
            config.load(environ={"ANVIL_GPU_DEVICES": bad})
