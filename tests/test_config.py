"""Configuration: defaults, file, environment, validation with clear messages."""
import pytest

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
