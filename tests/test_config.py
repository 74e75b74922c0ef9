"""Configuration: defaults, file, environment, validation with clear messages;
gunicorn started with the same validated settings; the loader the proxy and
the scaler share (jobcloud_config)."""
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

from jobcloud_config import SettingError, layered
from proxy import live
from proxy.config import load_config
from proxy.errors import ConfigError


def test_defaults_are_valid_and_documented_port():
    cfg = load_config(env={})
    assert cfg.bind == "127.0.0.1:3000"
    assert cfg.max_script_bytes == 1024 * 1024
    assert cfg.max_dataset_bytes == 2 * 1024 ** 3
    assert cfg.url == "http://127.0.0.1:3000"


def test_environment_overrides_file_which_overrides_defaults(tmp_path):
    conf = tmp_path / "proxy.toml"
    conf.write_text('[proxy]\nmax_cpus = 4.0\nimages = ["a/b", "c/d"]\ndefault_image = "a/b"\n'
                    'page_size = 20\n')
    cfg = load_config(env={"JOBCLOUD_CONFIG": str(conf), "JOBCLOUD_PAGE_SIZE": "30"})
    assert cfg.max_cpus == 4.0
    assert cfg.images == ("a/b", "c/d")
    assert cfg.page_size == 30


def test_list_from_environment_is_comma_separated():
    cfg = load_config(env={"JOBCLOUD_IMAGES": "x/one, x/two", "JOBCLOUD_DEFAULT_IMAGE": "x/two"})
    assert cfg.images == ("x/one", "x/two")


@pytest.mark.parametrize("env, message", [
    ({"JOBCLOUD_MAX_CPUS": "lots"}, "max_cpus"),
    ({"JOBCLOUD_PAGE_SIZE": "0"}, "page_size"),
    ({"JOBCLOUD_DEFAULT_IMAGE": "evil/image"}, "default_image"),
    ({"JOBCLOUD_LEASE_TIMEOUT_S": "5", "JOBCLOUD_HEARTBEAT_INTERVAL_S": "10"}, "lease_timeout_s"),
    ({"JOBCLOUD_BIND": "nowhere"}, "bind"),
    ({"JOBCLOUD_DATABASE_URL": "mysql://x"}, "database_url"),
    ({"JOBCLOUD_MAX_SCRIPT_BYTES": "1.5"}, "max_script_bytes"),
    ({"JOBCLOUD_METRICS_TOKEN": "too-short"}, "metrics_token must be empty or 32 to 256"),
    ({"JOBCLOUD_METRICS_TOKEN": "a" * 20 + " " + "b" * 20}, "metrics_token"),
    ({"JOBCLOUD_METRICS_TOKEN": "x" * 257}, "metrics_token"),
    ({"JOBCLOUD_MAX_PARENT_JOBS": "0"}, "max_parent_jobs"),
    ({"JOBCLOUD_MAX_PARENT_JOBS": "50", "JOBCLOUD_MAX_DEPENDENCY_EDGES": "49"},
     "max_dependency_edges must be between max_parent_jobs"),
])
def test_bad_values_name_the_setting(env, message):
    with pytest.raises(ConfigError) as err:
        load_config(env=env)
    assert message in err.value.detail


def test_unknown_setting_in_file_is_refused(tmp_path):
    conf = tmp_path / "proxy.toml"
    conf.write_text("[proxy]\nmax_cpu = 4\n")
    with pytest.raises(ConfigError, match="unknown setting.*max_cpu"):
        load_config(env={"JOBCLOUD_CONFIG": str(conf)})


def test_unreadable_or_invalid_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(env={"JOBCLOUD_CONFIG": str(tmp_path / "missing.toml")})
    bad = tmp_path / "bad.toml"
    bad.write_text("[proxy\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(env={"JOBCLOUD_CONFIG": str(bad)})


# ------------------------------------------------------------ gunicorn's settings

def _gunicorn_settings(env: dict) -> subprocess.CompletedProcess:
    """Load proxy/gunicorn_conf.py as gunicorn does (--print-config: load, print, exit)."""
    return subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "python:proxy.gunicorn_conf", "--print-config",
         "proxy:create_app()"],
        env={**_clean_env(), **env}, capture_output=True, text=True, timeout=60)


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("JOBCLOUD_")}


def _printed(out: str, name: str) -> str:
    return re.search(rf"^{name}\s+= (.*)$", out, re.MULTILINE).group(1)


def test_gunicorn_runs_the_validated_configs_connection_count(tmp_path):
    """One number: what gunicorn runs is config.gunicorn_connections, from the
    environment or from the config file, and so is what live.py caps streams by."""
    env = {"JOBCLOUD_GUNICORN_CONNECTIONS": "3", "JOBCLOUD_GUNICORN_WORKERS": "2",
           "JOBCLOUD_BIND": "127.0.0.1:3999", "JOBCLOUD_ACCESS_LOG": "/dev/null"}
    done = _gunicorn_settings(env)
    assert done.returncode == 0, done.stderr
    cfg = load_config(env=env)
    assert _printed(done.stdout, "worker_connections") == str(cfg.gunicorn_connections) == "3"
    assert _printed(done.stdout, "workers") == str(cfg.resolved_gunicorn_workers) == "2"
    assert _printed(done.stdout, "bind") == "['127.0.0.1:3999']"
    assert _printed(done.stdout, "accesslog") == "/dev/null"
    assert live.streams_per_process(cfg) == 1  # half of 3 connections, so some stay free

    conf = tmp_path / "proxy.toml"
    conf.write_text("[proxy]\ngunicorn_connections = 5\n")
    done = _gunicorn_settings({"JOBCLOUD_CONFIG": str(conf)})
    assert done.returncode == 0, done.stderr
    assert _printed(done.stdout, "worker_connections") == "5"
    assert load_config(env={"JOBCLOUD_CONFIG": str(conf)}).gunicorn_connections == 5


def test_gunicorn_defaults_are_the_configs():
    done = _gunicorn_settings({})
    assert done.returncode == 0, done.stderr
    cfg = load_config(env={})
    assert _printed(done.stdout, "worker_connections") == "2000" == str(cfg.gunicorn_connections)
    assert _printed(done.stdout, "worker_class") == "gevent"
    assert _printed(done.stdout, "workers") == str(max(4, (os.cpu_count() or 1) * 2))
    assert _printed(done.stdout, "bind") == "['127.0.0.1:3000']"
    assert _printed(done.stdout, "forwarded_allow_ips") == "[]"  # trust no forwarder
    assert _printed(done.stdout, "control_socket_disable") == "True"


@pytest.mark.parametrize("env, message", [
    ({"JOBCLOUD_GUNICORN_CONNECTIONS": "1"}, "gunicorn_connections must be between 2 and 100000"),
    ({"JOBCLOUD_GUNICORN_CONNECTIONS": "many"}, "setting gunicorn_connections: 'many' is not a valid int"),
    ({"JOBCLOUD_GUNICORN_WORKERS": "-1"}, "gunicorn_workers must be between"),
    ({"JOBCLOUD_FORWARDED_ALLOW_IPS": "proxy.example.org"}, "forwarded_allow_ips"),
])
def test_gunicorn_refuses_to_start_on_an_invalid_setting_in_one_line(env, message):
    done = _gunicorn_settings(env)
    assert done.returncode != 0
    assert f"jobcloud-proxy: invalid configuration: {message}" in done.stderr
    assert "Traceback" not in done.stderr


def test_forwarders_may_be_addresses_networks_or_any():
    cfg = load_config(env={"JOBCLOUD_FORWARDED_ALLOW_IPS": "127.0.0.1, 10.0.0.0/8,::1"})
    assert cfg.forwarded_allow_ips == "127.0.0.1, 10.0.0.0/8,::1"
    assert load_config(env={"JOBCLOUD_FORWARDED_ALLOW_IPS": "*"}).forwarded_allow_ips == "*"


# ------------------------------------------------- the loader the deployables share

@dataclass(frozen=True)
class Sample:
    count: int = 1
    ratio: float = 0.5
    names: tuple[str, ...] = ("a",)
    label: str = "x"
    slots: int | None = None
    enabled: bool = False


@pytest.mark.parametrize("field, value", [
    ("count", True), ("count", 2.5), ("count", "2.5"), ("ratio", True), ("ratio", "half"),
    ("enabled", "ture"), ("enabled", "2"), ("enabled", ""), ("enabled", 2),
])
def test_the_shared_loader_refuses_what_toml_would_let_through(field, value):
    with pytest.raises(SettingError, match=f"setting {field}: .* is not a valid"):
        layered(Sample, env={}, prefix="T_", overrides={field: value})


@pytest.mark.parametrize("value, expected", [
    ("on", True), ("Yes", True), ("1", True), (True, True), (1, True),
    ("off", False), ("NO", False), ("0", False), (False, False), (0, False),
])
def test_the_shared_loader_reads_switches_in_words_or_numbers(value, expected):
    assert layered(Sample, env={}, prefix="T_", overrides={"enabled": value})["enabled"] is expected


def test_the_shared_loader_layers_file_environment_and_overrides(tmp_path):
    conf = tmp_path / "t.toml"
    conf.write_text('[t]\ncount = 2\nnames = ["f"]\nlabel = "file"\n')
    values = layered(Sample, env={"T_COUNT": "3", "T_NAMES": "e1, e2", "T_SLOTS": ""},
                     prefix="T_", config_file=str(conf), section="t",
                     overrides={"count": 4, "label": None}, nullable={"slots": int})
    # The override wins, None is "not given", "" clears a nullable field.
    assert values == {"count": 4, "names": ("e1", "e2"), "label": "file", "slots": None}
    assert layered(Sample, env={"T_SLOTS": "6"}, prefix="T_", nullable={"slots": int}) == {"slots": 6}
    with pytest.raises(SettingError, match="unknown setting 'nope'"):
        layered(Sample, env={}, prefix="T_", overrides={"nope": 1})
    conf.write_text("[t]\nnope = 1\n")
    with pytest.raises(SettingError, match=r"unknown setting\(s\) nope"):
        layered(Sample, env={}, prefix="T_", config_file=str(conf), section="t")
