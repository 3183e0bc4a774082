"""vmpowerd configuration: TOML (``tomllib``) into frozen dataclasses.

Every key has a type and a default; unknown sections or keys, wrong types, bad CPU
lists and out-of-range numbers raise ``ConfigError`` naming the file, the key
(``section.key``) and the reason. Every problem of a file is reported, not only the
first: several raise ``ConfigProblems`` (a ``ConfigError``), one line each.
Choices (``log.level``) are accepted in any case.

``default_config_path()``: where vmpowerd and vmpower look without ``--config``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from vmpower.cpuset import format_cpu_list, parse_cpu_list
from vmpower.errors import ConfigError, CpuListError

CpuSet = frozenset[int]

DEFAULT_CONFIG_PATH = Path("/etc/vmpower/vmpowerd.toml")
CONFIG_ENV = "VMPOWER_CONFIG"  # another default path (tests, a second instance)


def default_config_path() -> Path:
    """The file read without ``--config``: $VMPOWER_CONFIG, else DEFAULT_CONFIG_PATH."""
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH


class ConfigProblems(ConfigError):
    """Every problem found in one configuration, each a ``ConfigError`` (one line each)."""

    def __init__(self, problems: list[ConfigError], partial: Config | None = None) -> None:
        first = problems[0]
        super().__init__(first.file, first.key, first.reason)
        self.problems = list(problems)
        # The configuration without the bad keys (their defaults instead): what the
        # start-up checks still look at, so that one run reports every problem.
        self.partial = partial
        self.args = ("\n".join(str(p) for p in self.problems),)

    def __str__(self) -> str:
        return str(self.args[0])


def config_problems(exc: ConfigError) -> list[ConfigError]:
    """The one or several problems an exception from this module stands for."""
    return exc.problems if isinstance(exc, ConfigProblems) else [exc]


def _cpus(default: str = "", doc: str = "") -> Any:
    return field(default=parse_cpu_list(default), metadata={"kind": "cpus", "doc": doc})


def _opt(default: Any, doc: str, *, minimum: float | None = None, choices: tuple = ()) -> Any:
    meta: dict[str, Any] = {"doc": doc}
    if minimum is not None:
        meta["min"] = minimum
    if choices:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class LibvirtConfig:
    uri: str = _opt("qemu:///system", "libvirt connection URI")
    reconnect_min_s: float = _opt(0.5, "first retry delay after libvirtd is lost", minimum=0.01)
    reconnect_max_s: float = _opt(30.0, "longest retry delay (backoff doubles)", minimum=0.01)
    map_refresh_s: float = _opt(
        1.0, "vCPU→pCPU map older than this is re-read in the background", minimum=0.0
    )
    track_all: bool = _opt(True, "serve every domain libvirt knows (else only add_vm'd ones)")


@dataclass(frozen=True)
class ChannelsConfig:
    dir: Path = _opt(Path("/tmp/powermonitor"), "directory of channel sockets and FIFOs")
    qemu_user: str = _opt(
        "libvirt-qemu", "user QEMU runs as: may own channels.dir and the sockets in it"
    )
    fifo_cpus: CpuSet = _cpus("", "host CPUs that get a JSON FIFO fifo<N> for host processes")
    rate_per_s: float = _opt(
        100000.0, "requests per second one channel may send (token bucket)", minimum=0.001
    )
    burst: int = _opt(4096, "token bucket depth: requests a channel may send at once", minimum=1)
    send_queue_max: int = _opt(
        4096, "replies queued per channel before the oldest are dropped", minimum=1
    )


@dataclass(frozen=True)
class CpufreqConfig:
    sysfs_root: Path = _opt(Path("/sys"), "root of sysfs (a simulated tree for tests)")
    reserved_cpus: CpuSet = _cpus("", 'host CPUs vmpower never touches, e.g. "0-1,8"')


@dataclass(frozen=True)
class StateConfig:
    dir: Path = _opt(Path("/var/lib/vmpower"), "restore journal and instance lock")


@dataclass(frozen=True)
class ControlConfig:
    socket: Path = _opt(Path("/run/vmpower/control.sock"), "admin API socket (JSON lines)")
    mode: int = _opt(0o660, "permission bits of the control socket", minimum=0)
    group: str = _opt("", "group owning the control socket (empty: the daemon's)")


@dataclass(frozen=True)
class PoliciesConfig:
    period_s: float = _opt(0.1, "how often policies are evaluated", minimum=0.001)
    branch_period_s: float = _opt(0.001, "BRANCH_RATIO sampling period", minimum=0.0001)
    branch_threshold: float = _opt(0.1, "BRANCH_RATIO miss ratio (percent) above which: max")
    msr_root: Path = _opt(Path("/dev/cpu"), "root of the msr device files (<root>/<n>/msr)")
    timezone: str = _opt("", "time zone of TIME policies' hours (empty: local time)")


@dataclass(frozen=True)
class TelemetryConfig:
    proc_root: Path = _opt(Path("/proc"), "procfs root for CPU utilisation")
    powercap_root: Path = _opt(
        Path("/sys/class/powercap"), "powercap root for intel-rapl energy counters"
    )
    access_dir: Path = _opt(Path("/etc/vmpower/access"), "access lists: signals/controls per group")
    shm_dir: Path = _opt(Path("/dev/shm"), "where batch buffers are created")
    start_timeout_s: float = _opt(
        10.0, "how long start_batch waits for the batch server to be ready", minimum=0.1
    )
    max_sessions: int = _opt(64, "batch sessions (servers) running at once", minimum=1)


@dataclass(frozen=True)
class LogConfig:
    level: str = _opt("info", "log level", choices=("debug", "info", "warning", "error"))
    summary_interval_s: float = _opt(
        10.0, "what repeats is logged as one summary line per interval", minimum=0.01
    )


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = field(
        default="",
        metadata={
            "kind": "listen",
            "doc": 'Prometheus endpoint host:port, e.g. "127.0.0.1:9814" (empty: off)',
        },
    )
    energy_period_s: float = _opt(
        1.0, "per-VM energy accounting period (intel-rapl, vCPU times)", minimum=0.1
    )


@dataclass(frozen=True)
class Config:
    libvirt: LibvirtConfig = field(default_factory=LibvirtConfig)
    channels: ChannelsConfig = field(default_factory=ChannelsConfig)
    cpufreq: CpufreqConfig = field(default_factory=CpufreqConfig)
    state: StateConfig = field(default_factory=StateConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    policies: PoliciesConfig = field(default_factory=PoliciesConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def parse_listen(text: str) -> tuple[str, int] | None:
    """``metrics.listen``: "host:port" or "[v6]:port" → (host, port); "" → None (off).

    Any address is allowed (a fleet's Prometheus scrapes from elsewhere); the unit file
    lets only loopback through until a drop-in opens more (config/vmpowerd.service).
    Raises ValueError with the reason.
    """
    if text == "":
        return None
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep or ":" not in host:
            raise ValueError(f'an IPv6 address is written "[::1]:9814", got {text!r}')
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f'must be "host:port" like "127.0.0.1:9814", got {text!r}')
        if ":" in host:
            raise ValueError(f'an IPv6 address goes in brackets: "[{host}]:{port_text}"')
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{host!r} is not an IPv4 address or a host name")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port must be 1-65535, got {port_text!r}")
    return host, int(port_text)


_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})")


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML file; raises ConfigError naming file, key and reason."""
    file = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(file, None, "no such file") from None
    except OSError as exc:
        raise ConfigError(file, None, f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, None, f"not valid TOML: {exc}") from None
    return config_from_dict(data, file, base=Path(file).resolve().parent)


def config_from_dict(
    data: dict[str, Any], file: str = "<config>", base: Path | None = None
) -> Config:
    """Build a Config from parsed TOML; relative paths resolve against ``base``."""
    sections: dict[str, Any] = {}
    problems: list[ConfigError] = []
    section_types = get_type_hints(Config)
    for name, value in data.items():
        if name not in section_types:
            known = ", ".join(section_types)
            problems.append(ConfigError(file, name, f"unknown section (known: {known})"))
        elif not isinstance(value, dict):
            problems.append(ConfigError(file, name, "must be a table ([section])"))
        else:
            sections[name] = _build_section(section_types[name], name, value, file, base, problems)
    if problems:
        raise ConfigProblems(problems, Config(**sections))
    return Config(**sections)


def _build_section(
    cls: type,
    section: str,
    values: dict[str, Any],
    file: str,
    base: Path | None,
    problems: list[ConfigError],
) -> Any:
    """The section's dataclass; each bad key is added to ``problems`` (and left out)."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, raw in values.items():
        dotted = f"{section}.{key}"
        if key not in fields:
            known = ", ".join(fields)
            problems.append(
                ConfigError(file, dotted, f"unknown key (known in [{section}]: {known})")
            )
            continue
        try:
            kwargs[key] = _convert(hints[key], fields[key].metadata, raw, dotted, file, base)
        except ConfigError as exc:
            problems.append(exc)
    return cls(**kwargs)


def _convert(hint: Any, meta: Any, raw: Any, dotted: str, file: str, base: Path | None) -> Any:
    if meta.get("kind") == "listen":
        if not isinstance(raw, str):
            raise ConfigError(file, dotted, f'must be a "host:port" string, got {raw!r}')
        try:
            parse_listen(raw)
        except ValueError as exc:
            raise ConfigError(file, dotted, str(exc)) from None
        return raw
    if meta.get("kind") == "cpus":
        if isinstance(raw, list) and all(
            isinstance(x, int) and not isinstance(x, bool) for x in raw
        ):
            raw = ",".join(str(x) for x in raw)
        if not isinstance(raw, str):
            raise ConfigError(file, dotted, f'must be a CPU list string like "0-3,8", got {raw!r}')
        try:
            return parse_cpu_list(raw)
        except CpuListError as exc:
            raise ConfigError(file, dotted, str(exc)) from None
    if hint is bool:
        if not isinstance(raw, bool):
            raise ConfigError(file, dotted, f"must be true or false, got {raw!r}")
        return raw
    if hint is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(file, dotted, f"must be an integer, got {raw!r}")
        value: Any = raw
    elif hint is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ConfigError(file, dotted, f"must be a number, got {raw!r}")
        value = float(raw)
    elif hint is str:
        if not isinstance(raw, str):
            raise ConfigError(file, dotted, f"must be a string, got {raw!r}")
        value = raw
        if "choices" in meta:
            value = raw.lower()  # "INFO", "Debug": levels in any case
    elif hint is Path:
        if not isinstance(raw, str) or not raw:
            raise ConfigError(file, dotted, f"must be a non-empty path string, got {raw!r}")
        value = Path(raw)
        if base is not None and not value.is_absolute():
            value = base / value
    else:  # pragma: no cover - a field type this loader does not know is a programming error
        raise TypeError(f"unsupported config type {hint!r} for {dotted}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(file, dotted, f"must be ≥ {meta['min']}, got {raw!r}")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(file, dotted, f"must be one of {', '.join(meta['choices'])}, got {raw!r}")
    return value


def config_to_toml(config: Config) -> str:
    """The effective configuration as TOML text (what --check-config prints)."""
    lines: list[str] = []
    for section in dataclasses.fields(config):
        lines.append(f"[{section.name}]")
        sec = getattr(config, section.name)
        for f in dataclasses.fields(sec):
            value = getattr(sec, f.name)
            if f.metadata.get("kind") == "cpus":
                text = f'"{format_cpu_list(value)}"'
            elif isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, Path | str):
                text = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
            elif f.name == "mode":
                text = oct(value).replace("0o", "0o")
            else:
                text = repr(value)
            lines.append(f"{f.name} = {text}  # {f.metadata.get('doc', '')}")
        lines.append("")
    return "\n".join(lines)
