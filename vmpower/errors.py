"""The exception tree of vmpower: every error the agent raises on purpose."""

from __future__ import annotations


class VmpowerError(Exception):
    """Base of every error vmpower raises on purpose."""


class ConfigError(VmpowerError):
    """A configuration file is unreadable or holds a bad key or value."""

    def __init__(self, file: str, key: str | None, reason: str) -> None:
        self.file = file
        self.key = key
        self.reason = reason
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {reason}")


class CpuListError(VmpowerError, ValueError):
    """A CPU list string (``"0-3,8,^2"``) is malformed."""


class SysfsError(VmpowerError):
    """A sysfs file could not be read or written."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class CpufreqError(VmpowerError):
    """A cpufreq operation the kernel would refuse, or that this CPU cannot do."""


class UnsupportedError(CpufreqError):
    """The CPU's driver or mode does not offer this feature."""


class RestoreError(VmpowerError):
    """The restore journal could not be written or read."""


class ProtocolError(VmpowerError):
    """Malformed input on a power channel; ``reason`` says what was wrong."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class HypervisorError(VmpowerError):
    """libvirt refused, or the VM is unknown or gone."""


class UnknownVmError(HypervisorError):
    """No VM of that name is known."""


class ControlError(VmpowerError):
    """A control-socket request was refused; the message is shown to the operator."""


class BarrierError(VmpowerError):
    """The inter-process barrier was misused (role unset, already destroyed)."""


class TelemetryError(VmpowerError):
    """A telemetry request (signal, control, batch) was refused or failed."""
