"""Configuration loading: defaults, validation with file/key/reason, --check-config."""

import subprocess
import sys
from pathlib import Path

import pytest

from vmpower.config import Config, config_to_toml, load_config
from vmpower.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vmpowerd.toml"
    path.write_text(text)
    return path


def test_defaults_are_the_documented_ones() -> None:
    config = Config()
    assert config.libvirt.uri == "qemu:///system"
    assert str(config.channels.dir) == "/tmp/powermonitor"
    assert str(config.cpufreq.sysfs_root) == "/sys"
    assert config.cpufreq.reserved_cpus == frozenset()
    assert str(config.state.dir) == "/var/lib/vmpower"
    assert str(config.control.socket) == "/run/vmpower/control.sock"


def test_shipped_file_loads_and_equals_the_defaults() -> None:
    assert load_config(REPO / "config" / "vmpowerd.toml") == Config()


def test_values_are_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[libvirt]
uri = "test:///default"
[cpufreq]
reserved_cpus = "0-1,8"
sysfs_root = "sim"
[channels]
fifo_cpus = [2, 3]
""",
    )
    config = load_config(path)
    assert config.libvirt.uri == "test:///default"
    assert config.cpufreq.reserved_cpus == {0, 1, 8}
    assert config.cpufreq.sysfs_root == tmp_path / "sim"  # relative to the file
    assert config.channels.fifo_cpus == {2, 3}


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[libvirt]\nuri = 3\n", "libvirt.uri", "must be a string"),
        ("[libvirt]\nurl = 'x'\n", "libvirt.url", "unknown key"),
        ("[libvrt]\nuri = 'x'\n", "libvrt", "unknown section"),
        ("[cpufreq]\nreserved_cpus = '0-a'\n", "cpufreq.reserved_cpus", "bad item"),
        ("[cpufreq]\nreserved_cpus = '3-1'\n", "cpufreq.reserved_cpus", "descending"),
        ("[channels]\nrate_per_s = -1\n", "channels.rate_per_s", "must be ≥"),
        ("[channels]\nburst = 1.5\n", "channels.burst", "must be an integer"),
        ("[libvirt]\ntrack_all = 'yes'\n", "libvirt.track_all", "true or false"),
        ("[log]\nlevel = 'loud'\n", "log.level", "must be one of"),
    ],
)
def test_bad_values_name_file_key_and_reason(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key
    assert reason in info.value.reason
    assert str(path) in str(info.value)


def test_broken_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[libvirt\n"))
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml")


def test_effective_config_round_trips(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[cpufreq]\nreserved_cpus = '0,2-3'\n"))
    again = load_config(write(tmp_path, config_to_toml(config)))
    assert again == config


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmpower.daemon", "--check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_names_a_typod_key_and_exits_2(tmp_path: Path) -> None:
    result = run_check(write(tmp_path, "[cpufreq]\nreserved_cpu = '0'\n"))
    assert result.returncode == 2
    assert "cpufreq.reserved_cpu" in result.stderr
    assert "unknown key" in result.stderr


def test_check_config_prints_the_effective_config(tmp_path: Path) -> None:
    result = run_check(write(tmp_path, "[cpufreq]\nreserved_cpus = '0-1'\n"))
    assert result.returncode == 0, result.stderr
    assert 'reserved_cpus = "0-1"' in result.stdout
    assert 'uri = "qemu:///system"' in result.stdout
