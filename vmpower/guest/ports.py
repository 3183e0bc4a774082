"""Finding the guest's power ports and choosing which one carries a request.

QEMU gives the guest one virtio-serial port per power channel; the host names them
``virtio.serial.port.poweragent.<n>`` (docs/protocol.md, "Transport"). The kernel exposes
each port as ``/sys/class/virtio-ports/vport<D>p<P>`` whose ``name`` attribute holds
that name, with the device node ``/dev/vport<D>p<P>``; udev adds the link
``/dev/virtio-ports/<name>``. Discovery asks udev (``pyudev``) when it is importable
and the real ``/sys`` is meant, and reads the sysfs attributes otherwise (a minimal
guest without pyudev, or a test's fake tree under ``sysfs_root``).

Which port for which vCPU: port ``n`` serves vCPU ``n``, as DPDK's guest library
opens port ``n`` for lcore ``n``. A vCPU without a port of its own, and every policy,
goes through the *first* port (the lowest index found, or the first ``--device``):
the host identifies the VM by the channel and the vCPU by ``resource_id``, so any of
the VM's ports can carry any of its requests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from vmpower.errors import VmpowerError

PORT_PREFIX = "virtio.serial.port.poweragent."
_PORT_NAME = re.compile(re.escape(PORT_PREFIX) + r"(\d+)")
_BY_NAME = "virtio-ports"  # udev's directory of links named after the port


class PortError(VmpowerError):
    """No usable power port: none found, cannot open, or the host end is gone."""


@dataclass(frozen=True)
class PortInfo:
    """One power port: its channel index (None if its name does not say), name, node."""

    index: int | None
    name: str
    device: Path

    def describe(self) -> str:
        where = f"port {self.index}" if self.index is not None else "port"
        return f"{where} {self.device}"


def port_index(name: str) -> int | None:
    """The ``<n>`` of ``virtio.serial.port.poweragent.<n>``; None for any other name."""
    match = _PORT_NAME.fullmatch(name.strip())
    return int(match.group(1)) if match else None


def _device_node(name: str, devname: str, dev_root: Path) -> Path:
    # Prefer udev's stable link; the kernel's vportNpM name depends on probe order.
    link = dev_root / _BY_NAME / name
    if link.exists():
        return link
    return dev_root / devname


def _devname(port_dir: Path) -> str:
    """DEVNAME from the port's uevent (what udev uses), else the directory's name."""
    try:
        for line in (port_dir / "uevent").read_text().splitlines():
            key, _, value = line.partition("=")
            if key == "DEVNAME" and value:
                return value
    except OSError:
        pass
    return port_dir.name


def _scan_sysfs(sysfs_root: Path) -> list[tuple[str, str]]:
    """(port name, device name) of every virtio port under ``sysfs_root``."""
    found = []
    for name_file in sorted((sysfs_root / "class" / "virtio-ports").glob("*/name")):
        try:
            name = name_file.read_text().strip()
        except OSError:
            continue  # a port unplugged while we looked
        found.append((name, _devname(name_file.parent)))
    return found


def _scan_udev() -> list[tuple[str, str]] | None:
    """(port name, device name) from udev; None when pyudev is not installed."""
    try:
        import pyudev  # type: ignore[import-untyped]
    except ImportError:
        return None
    found = []
    for device in pyudev.Context().list_devices(subsystem="virtio-ports"):
        raw = device.attributes.get("name")
        if raw is None:
            continue
        name = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        node = device.device_node or device.sys_name
        found.append((name.strip(), Path(node).name))
    return found


def discover(
    sysfs_root: Path = Path("/sys"), dev_root: Path = Path("/dev"), use_udev: bool = True
) -> list[PortInfo]:
    """The guest's power ports, lowest index first.

    udev is asked only for the real ``/sys`` (it knows no other tree); ports whose name
    is not a power-agent name (the QEMU guest agent's, a console) are left out.
    """
    found = _scan_udev() if use_udev and sysfs_root == Path("/sys") else None
    if found is None:
        found = _scan_sysfs(sysfs_root)
    ports: list[tuple[int, PortInfo]] = []
    for name, devname in found:
        index = port_index(name)
        if index is not None:
            ports.append((index, PortInfo(index, name, _device_node(name, devname, dev_root))))
    return [port for _, port in sorted(ports, key=lambda item: item[0])]


def port_from_arg(spec: str) -> PortInfo:
    """A port named on the command line: ``PATH`` or ``N=PATH``.

    Without ``N=`` the index comes from a power-agent name in the path
    (``/dev/virtio-ports/virtio.serial.port.poweragent.1``), else it stays unknown
    and the port serves the vCPUs that have no port of their own.
    """
    head, sep, tail = spec.partition("=")
    if sep and head.isascii() and head.isdigit():
        if not tail:
            raise PortError(f"--device {spec!r}: no path after {head}=")
        return PortInfo(int(head), Path(tail).name, Path(tail))
    if not spec:
        raise PortError("--device: empty path")
    path = Path(spec)
    return PortInfo(port_index(path.name), path.name, path)


def port_for_vcpu(ports: list[PortInfo], vcpu: int) -> PortInfo:
    """Port ``vcpu`` when the guest has it, else the first port."""
    if not ports:
        raise PortError("no power port")
    for port in ports:
        if port.index == vcpu:
            return port
    return ports[0]
