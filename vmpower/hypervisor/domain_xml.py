"""Where a VM's power channels and NICs are: its domain XML and the channels directory.

Pure parsing and a directory scan, no libvirt call: the registry hands in the XML text
libvirt returned and the directory it was configured with.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

from vmpower.hypervisor.model import ChannelInfo

log = logging.getLogger(__name__)

# The guest side of a power channel is /dev/virtio-ports/virtio.serial.port.poweragent.<n>
# (docs/protocol.md, "Transport"); <n> is the guest lcore the port serves.
_PORT_NAME = re.compile(r"virtio\.serial\.port\.poweragent\.(\d+)")
# Host-side socket names in the channels directory: "<vm>.<n>", split at the LAST dot because
# VM names may contain dots (docs/protocol.md, "Transport", vmpower rule).
_SOCKET_NAME = re.compile(r"(.+)\.(\d+)")


def scan_channels_dir(channels_dir: Path) -> dict[str, dict[int, str]]:
    """Sockets ``<vm>.<n>`` in the channels directory, as {vm: {n: path}}."""
    found: dict[str, dict[int, str]] = {}
    try:
        entries = list(os.scandir(channels_dir))
    except OSError:
        return found  # no directory yet: no channel there
    for entry in entries:
        match = _SOCKET_NAME.fullmatch(entry.name)
        if match is None:
            continue  # e.g. the host FIFOs fifo<N>: not VM channels
        try:
            if not stat.S_ISSOCK(os.stat(entry.path).st_mode):
                continue
        except OSError:
            continue
        found.setdefault(match.group(1), {})[int(match.group(2))] = entry.path
    return found


def parse_devices(
    name: str, xml: str, dir_sockets: dict[int, str]
) -> tuple[tuple[ChannelInfo, ...], tuple[str, ...]]:
    """Power channels and NICs from a domain's live XML, channels merged with the dir scan.

    ``dir_sockets`` is this VM's entry of ``scan_channels_dir()``. A channel the XML lists
    wins over a socket of the same index or path found only in the directory. NICs are
    named as ``virDomainInterfaceStats`` takes them.
    """
    by_index: dict[int, ChannelInfo] = {}
    nics: list[str] = []
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        log.warning(
            "VM %s: unreadable domain XML (%s); only the channels directory used", name, exc
        )
        root = None
    if root is not None:
        for channel in root.iterfind("./devices/channel"):
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
        for nic in root.iterfind("./devices/interface"):
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
