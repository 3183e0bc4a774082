"""What a running VM's live domain XML says: its power channels, NICs and vCPU pins;
and the channels directory.

Pure parsing and a directory scan, no libvirt call: the session hands in the XML text
libvirt returned, the host's CPU count and the directory it was configured with.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import stat
import xml.etree.ElementTree as ET
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path

from vmpower.cpuset import MAX_CPUS, parse_cpu_list
from vmpower.hypervisor.model import ChannelInfo

log = logging.getLogger(__name__)

# The guest side of a power channel is /dev/virtio-ports/virtio.serial.port.poweragent.<n>
# (docs/protocol.md, "Transport"); <n> is the guest lcore the port serves.
_PORT_NAME = re.compile(r"virtio\.serial\.port\.poweragent\.(\d+)")
# Host-side socket names in the channels directory: "<vm>.<n>", split at the LAST dot because
# VM names may contain dots (docs/protocol.md, "Transport", vmpower rule).
_SOCKET_NAME = re.compile(r"(.+)\.(\d+)")


# DPDK's vm_power_manager serves channels 0..63 of a VM (channel_manager.h:
# CHANNEL_CMDS_MAX_VM_CHANNELS; add_all_channels skips "<vm>.<n>" with a larger n).
MAX_DIR_CHANNELS = 64
# More look-ups than this in one ChannelsDir: one listing of the directory is cheaper than
# probing each VM's candidates (64 stat calls each).
_PROBED_VMS_MAX = 8


class ChannelsDir:
    """The sockets ``<vm>.<n>`` of the channels directory, looked up per VM on demand.

    ``get(vm, default)`` gives ``{n: path}``. A few VMs (``add_vm``, one VM re-read) are
    served by stat calls on their own candidates ``<vm>.0`` … ``<vm>.63`` only: the
    directory is not read, whatever its size (issue #16: reading and stat-ing 4000 VMs'
    sockets for one ``add_vm`` took 68 ms). Past a few VMs (reading every domain at
    start), the directory is listed once instead, its file types taken from the listing.
    Either way a socket's owner and type are checked again before each connect (trust).
    """

    def __init__(self, channels_dir: Path) -> None:
        self.channels_dir = channels_dir
        self._probed: dict[str, dict[int, str]] = {}
        self._listed: dict[str, dict[int, str]] | None = None

    def get(self, vm: str, default: dict[int, str] | None = None) -> dict[int, str]:
        if self._listed is None and len(self._probed) >= _PROBED_VMS_MAX:
            self._listed = self._list()
        if self._listed is not None:
            found = self._listed.get(vm)
        else:
            found = self._probed.get(vm)
            if found is None:
                found = self._probed[vm] = self._probe(vm)
        if found:
            return found
        return {} if default is None else default

    def _probe(self, vm: str) -> dict[int, str]:
        return probe_channels(self.channels_dir, vm)

    def _list(self) -> dict[str, dict[int, str]]:
        found: dict[str, dict[int, str]] = {}
        try:
            entries = list(os.scandir(self.channels_dir))
        except OSError:
            return found  # no directory yet: no channel there
        for entry in entries:
            match = _SOCKET_NAME.fullmatch(entry.name)
            if match is None:
                continue  # e.g. the host FIFOs fifo<N>: not VM channels
            index = int(match.group(2))
            if index >= MAX_DIR_CHANNELS:
                continue
            # The listing's file type (d_type): no stat call per entry. Regular files and
            # directories are out; anything else is a candidate whose type the connect
            # checks (trust.socket_problem) before anything is sent to it.
            try:
                if entry.is_dir() or entry.is_file():
                    continue
            except OSError:
                continue
            found.setdefault(match.group(1), {})[index] = entry.path
        return found


def probe_channels(
    channels_dir: str | os.PathLike[str], vm: str, names: AbstractSet[str] | None = None
) -> dict[int, str]:
    """``vm``'s sockets ``{n: path}`` among its candidates ``<vm>.0`` … ``<vm>.63``.

    ``names``: the directory's names when they are known (the directory's index,
    channels_index); a candidate not among them is not asked of the kernel.
    """
    found: dict[int, str] = {}
    if "/" in vm or vm in (".", ".."):
        return found  # not a name in this directory
    try:
        dir_fd = os.open(channels_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return found  # no directory yet: no channel there
    try:
        # Relative to the directory (no walk of its path each time), and access(2)
        # first: most candidates are absent, and a failed stat costs an exception
        # each. What exists is stat-ed (following a link, as before: the connect's
        # trust check refuses links) for its type.
        for index in range(MAX_DIR_CHANNELS):
            name = f"{vm}.{index}"
            if names is not None:
                if name not in names:
                    continue
            elif not os.access(name, os.F_OK, dir_fd=dir_fd, follow_symlinks=False):
                continue
            try:
                if stat.S_ISSOCK(os.stat(name, dir_fd=dir_fd).st_mode):
                    found[index] = os.path.join(channels_dir, name)
            except OSError:
                continue
    finally:
        os.close(dir_fd)
    return found


def scan_channels_dir(channels_dir: Path) -> ChannelsDir:
    """The channels directory's sockets, looked up per VM on demand (``ChannelsDir``)."""
    return ChannelsDir(channels_dir)


@dataclass(frozen=True)
class DomainXml:
    """What a live domain XML says. ``vcpu_pcpus`` is None where the XML cannot say
    (not a running domain's, placement='auto', unreadable): libvirt's API is asked."""

    channels: tuple[ChannelInfo, ...]
    nics: tuple[str, ...]
    vcpu_pcpus: tuple[frozenset[int], ...] | None


def parse_domain(name: str, xml: str, dir_sockets: dict[int, str], host_cpus: int) -> DomainXml:
    """Channels (merged with the directory's ``dir_sockets``), NICs and vCPU pins of a
    running domain, from its live XML (``virDomainGetXMLDesc``)."""
    try:
        root: ET.Element | None = ET.fromstring(xml)
    except ET.ParseError as exc:
        log.warning(
            "VM %s: unreadable domain XML (%s); only the channels directory used", name, exc
        )
        root = None
    channels, nics = _devices(name, root, dir_sockets)
    pcpus = None if root is None else vcpu_pins(root, host_cpus)
    return DomainXml(channels, nics, pcpus)


def pins_from_xml(xml: str, host_cpus: int) -> tuple[frozenset[int], ...] | None:
    """``vcpu_pins`` of a live XML text (a map re-read: no channels wanted); None where
    it cannot say, unreadable XML included."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    return vcpu_pins(root, host_cpus)


def vcpu_pins(root: ET.Element, host_cpus: int) -> tuple[frozenset[int], ...] | None:
    """Each online vCPU's host CPUs, as ``virDomainGetVcpuPinInfo`` gives them, from a
    running domain's live XML; None when the XML cannot say.

    libvirt answers that call from the same definition it formats the live XML from
    (virDomainDefGetVcpuPinInfoHelper): a vCPU's own ``<vcpupin>``, else the
    ``<vcpu cpuset=...>`` default, else every host CPU, each cut to the host's CPUs.
    The exception is ``placement='auto'``: numad's advice is kept outside the XML, so
    only the API knows it. The Python bindings size the answer by ``virDomainGetInfo``'s
    vCPU count, which is the XML's ``current`` (the first ``current`` vCPUs).

    Reading the pins here saves three round trips to libvirtd per VM (the bindings'
    vcpuPinInfo also asks for the host CPU map and the domain info): issue #16.
    """
    if root.get("id") is None:
        return None  # an inactive definition (the VM stopped meanwhile): no live pins
    vcpu = root.find("vcpu")
    if vcpu is None or vcpu.get("placement", "static") != "static":
        return None
    try:
        maximum = int((vcpu.text or "").strip())
        current = int(vcpu.get("current", maximum))
        default = every_cpu(host_cpus)
        cpuset = vcpu.get("cpuset")
        if cpuset is not None:
            default = host_cpu_set(cpuset, host_cpus)
        pins: dict[int, frozenset[int]] = {}
        # find/findall of a plain tag run in ElementTree's C code; a path ("./a/b")
        # goes through ElementPath's Python (a fifth of a domain's parse, issue #16).
        for cputune in root.findall("cputune"):
            for pin in cputune.findall("vcpupin"):
                pins[int(pin.get("vcpu", ""))] = host_cpu_set(pin.get("cpuset", ""), host_cpus)
    except ValueError:  # CpuListError is one
        return None  # not what libvirt writes: let its API answer
    if not 0 < current <= maximum <= MAX_CPUS:
        return None
    return tuple(pins.get(index, default) for index in range(current))


@functools.lru_cache(maxsize=1024)
def host_cpu_set(cpuset: str, host_cpus: int) -> frozenset[int]:
    """A ``cpuset`` attribute's CPUs on the host (CpuListError when it is no CPU list).

    Cached: across VMs the same few pin sets repeat (a host of 256 CPUs pinned one
    vCPU to a CPU has 256), and a hit costs a tenth of a parse; the VMs then share
    one set each."""
    return parse_cpu_list(cpuset) & every_cpu(host_cpus)


@functools.lru_cache(maxsize=4)
def every_cpu(host_cpus: int) -> frozenset[int]:
    """Every host CPU, ``range(host_cpus)``: one set per host size, not one per VM read
    (256 CPUs: 9 us each time)."""
    return frozenset(range(host_cpus))


def _devices(
    name: str, root: ET.Element | None, dir_sockets: dict[int, str]
) -> tuple[tuple[ChannelInfo, ...], tuple[str, ...]]:
    """Power channels and NICs from a domain's live XML, channels merged with the dir scan.

    ``dir_sockets`` is this VM's entry of ``scan_channels_dir()``. A channel the XML lists
    wins over a socket of the same index or path found only in the directory. NICs are
    named as ``virDomainInterfaceStats`` takes them.
    """
    by_index: dict[int, ChannelInfo] = {}
    nics: list[str] = []
    devices = () if root is None else root.findall("devices")  # plain tags: C (vcpu_pins)
    for device_list in devices:
        for channel in device_list.findall("channel"):
            target, source = channel.find("target"), channel.find("source")
            if channel.get("type") != "unix" or target is None or source is None:
                continue
            match = _PORT_NAME.fullmatch(target.get("name", ""))
            if target.get("type") != "virtio" or match is None:
                continue
            path = source.get("path")
            # QEMU must be the socket's server (mode='bind', libvirt's default): the agent
            # is the client (docs/protocol.md, "Transport").
            if not path or source.get("mode", "bind") != "bind":
                continue
            index = int(match.group(1))
            if index in by_index:
                log.warning(
                    "VM %s lists power channel %d twice; using %s",
                    name,
                    index,
                    by_index[index].path,
                )
                continue
            by_index[index] = ChannelInfo(name, index, path, "xml")
        for nic in device_list.findall("interface"):
            target, mac = nic.find("target"), nic.find("mac")
            # interfaceStats takes the host-side device name, or the MAC address for NICs
            # that have none (vhost-user).
            if target is not None and target.get("dev"):
                nics.append(target.get("dev", ""))
            elif mac is not None and mac.get("address"):
                nics.append(mac.get("address", ""))
    xml_paths = {c.path for c in by_index.values()}
    for index, path in dir_sockets.items():
        if index not in by_index and path not in xml_paths:
            by_index[index] = ChannelInfo(name, index, path, "dir")
    return tuple(by_index[i] for i in sorted(by_index)), tuple(nics)
