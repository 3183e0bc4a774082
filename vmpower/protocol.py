"""The guest-channel wire protocol: binary codecs, stream framers and the FIFOs' JSON.

This module owns every byte layout of the spec's PROTOCOL.md (shared/spec): the
464-byte request (echoed back as ACK/NACK), the 88-byte FREQ_LIST and the 184-byte
CAPS_LIST replies, the framing of a channel's byte stream into whole requests, and
the JSON objects host processes write into ``/tmp/powermonitor/fifo<N>``. It is the
layout DPDK's librte_power (``kvm_vm`` guest driver, ``guest_cli``) uses on x86-64,
so an unmodified DPDK guest can talk to vmpower.

Standard library only and no I/O: the guest tool imports it in a minimal guest.

Two speeds on purpose. :class:`Packet` / :func:`decode_packet` / :func:`encode_packet`
give every field, for policy installs and tests. The request handler's hot path
(CPU_POWER, >350 000 requests/s in one process) never decodes a whole packet: it
uses :func:`peek_routing` and :func:`echo_reply`, which read and copy through
precompiled :class:`struct.Struct` objects. ``bench/bench_protocol.py`` measures both.

Every malformed input is reported as :class:`vmpower.errors.ProtocolError`, whose
``reason`` says what was wrong (for the JSON: which key).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal, Self, TypeGuard, TypeVar

from vmpower.errors import ProtocolError

# A byte buffer: what sockets and FIFOs hand us.
Buffer = bytes | bytearray | memoryview


# ---------------------------------------------------------------------------------------
# Constants (values are DPDK's rte_power_guest_channel.h; the C enums are int32)


class Command(IntEnum):
    """``command`` of a guest request."""

    CPU_POWER = 1
    CONNECT = 2  # RTE_POWER_CPU_POWER_CONNECT: the probe rte_power_init sends; no reply
    PKT_POLICY = 3
    PKT_POLICY_REMOVE = 4
    QUERY_FREQ_LIST = 7
    QUERY_FREQ = 8
    QUERY_CAPS_LIST = 9
    QUERY_CAPS = 10


class ReplyCode(IntEnum):
    """``command`` of a host reply. NACK (2) shares its value with CONNECT."""

    ACK = 1
    NACK = 2
    FREQ_LIST = 3
    CAPS_LIST = 4


class Unit(IntEnum):
    """``unit`` of a CPU_POWER request (also the JSON instruction's ``unit`` names)."""

    SCALE_UP = 1
    SCALE_DOWN = 2
    SCALE_MAX = 3
    SCALE_MIN = 4
    ENABLE_TURBO = 5
    DISABLE_TURBO = 6


class PolicyType(IntEnum):
    """``policy_to_use`` of a PKT_POLICY request (also the JSON ``policy_type``)."""

    TRAFFIC = 0
    TIME = 1
    WORKLOAD = 2
    BRANCH_RATIO = 3


class Workload(IntEnum):
    """``workload`` of a WORKLOAD policy."""

    HIGH = 0
    MEDIUM = 1
    LOW = 2


class CoreType(IntEnum):
    """``core_type``: whether ``resource_id`` / ``vcpu_to_control`` name vCPUs or host CPUs."""

    VIRTUAL = 0
    PHYSICAL = 1


PACKET_SIZE = 464
FREQ_LIST_SIZE = 88
CAPS_LIST_SIZE = 184
MAX_VCPU_PER_VM = 8  # RTE_POWER_MAX_VCPU_PER_VM: length of the reply arrays
VM_NAME_SIZE = 32  # char vm_name[32]
MAX_VM_NAME_BYTES = VM_NAME_SIZE - 1  # the guest strlcpy()s it: a C string keeps its NUL
NUM_VFID = 10  # RTE_POWER_MAX_VFS
NUM_HOURS = 24
MAX_JSON_MESSAGE_BYTES = 64 * 1024

# Reply size the guest reads for each request command (rule 2: a refusal has the same
# size). CONNECT gets nothing: the guest library never reads a reply to its probe.
# A command not listed here gets a 464-byte NACK.
REPLY_SIZE: dict[int, int] = {
    Command.CPU_POWER: PACKET_SIZE,
    Command.CONNECT: 0,
    Command.PKT_POLICY: PACKET_SIZE,
    Command.PKT_POLICY_REMOVE: PACKET_SIZE,
    Command.QUERY_FREQ_LIST: FREQ_LIST_SIZE,
    Command.QUERY_FREQ: FREQ_LIST_SIZE,
    Command.QUERY_CAPS_LIST: CAPS_LIST_SIZE,
    Command.QUERY_CAPS: CAPS_LIST_SIZE,
}

# The spec's formats. PACKET_FORMAT spells the spec's '<QII32s10QiIII8sB3x72i?3xii?7x'
# with the same offsets but reads vcpu_to_control as 8 ints, the three hour arrays
# separately, and the two C bools (core_type, turbo status) as raw bytes: '?' would turn
# any non-zero byte into True, hiding a core_type of 7 that the handler must NACK.
PACKET_FORMAT = "<QII32s10QiIII8BB3x24i24i24iB3xiiB7x"
FREQ_LIST_FORMAT = "<QII32s8IB7x"
CAPS_LIST_FORMAT = "<QII32s8Q8QB7x"

_PACKET = struct.Struct(PACKET_FORMAT)
_FREQ_LIST = struct.Struct(FREQ_LIST_FORMAT)
_CAPS_LIST = struct.Struct(CAPS_LIST_FORMAT)
# Fast paths. _ECHO cuts a request into its field runs around the three padding holes
# (153-155, 445-447, 457-463), so unpack+pack copies the fields and zeroes the padding.
_HEADER = struct.Struct("<QII")
_ROUTING = struct.Struct("<QII32s396xB")  # ... vm_name, skip to core_type at 444
_REPLY_HEAD = struct.Struct("<QII32s")  # the 48 bytes every message starts with
_ECHO = struct.Struct("<12sI32s105s3x289s3x9s7x")

_ZERO8: tuple[int, ...] = (0,) * MAX_VCPU_PER_VM
_ZERO10: tuple[int, ...] = (0,) * NUM_VFID
_ZERO24: tuple[int, ...] = (0,) * NUM_HOURS
_FREQ_TAIL = bytes(FREQ_LIST_SIZE - _REPLY_HEAD.size)
_CAPS_TAIL = bytes(CAPS_LIST_SIZE - _REPLY_HEAD.size)

_COMMANDS = {m.value: m for m in Command}
_UNITS = {m.value: m for m in Unit}
_POLICIES = {m.value: m for m in PolicyType}
_WORKLOADS = {m.value: m for m in Workload}
_CORE_TYPES = {m.value: m for m in CoreType}

_RANGES = {"Q": (0, 2**64 - 1), "I": (0, 2**32 - 1), "i": (-(2**31), 2**31 - 1), "B": (0, 255)}
_CTYPES = {"Q": "u64", "I": "u32", "i": "i32", "B": "u8"}


# ---------------------------------------------------------------------------------------
# Helpers shared by the codecs


def _short(buf: Buffer, offset: int, size: int, what: str) -> ProtocolError:
    have = len(buf) - offset
    return ProtocolError(f"short {what}: {max(have, 0)} bytes at offset {offset}, need {size}")


def _name_from_field(raw: bytes) -> str:
    # C string semantics (the reference host strcmp()s it): the name ends at the first
    # NUL; bytes after it are the guest's stack garbage. surrogateescape keeps any byte
    # sequence, so decoding never fails and re-encoding gives the same bytes back.
    return raw.partition(b"\0")[0].decode("utf-8", "surrogateescape")


def _name_to_field(name: str | bytes) -> bytes:
    """The bytes of a vm_name to pack (struct's '32s' NUL-pads them); refuses what can't fit."""
    if isinstance(name, str):
        try:
            raw = name.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise ProtocolError(f"vm_name: {name!r} is not encodable as UTF-8") from None
    elif isinstance(name, bytes | bytearray):
        raw = bytes(name)
    else:
        raise ProtocolError(f"vm_name: must be str or bytes, not {type(name).__name__}")
    if b"\0" in raw:
        raise ProtocolError(f"vm_name: {name!r} contains a NUL byte")
    if len(raw) > MAX_VM_NAME_BYTES:
        raise ProtocolError(
            f"vm_name: {len(raw)} bytes, at most {MAX_VM_NAME_BYTES} fit (char[32] keeps its NUL)"
        )
    return raw


def _check_lengths(obj: object, specs: Sequence[tuple[str, str, int]]) -> None:
    """Refuse an array field of the wrong length (two wrong ones could still add up to
    the item count struct.pack expects, shifting every value after them)."""
    for name, _code, count in specs:
        if count:
            value = getattr(obj, name)
            if not isinstance(value, tuple | list):
                raise ProtocolError(f"{name}: must be {count} values, not {type(value).__name__}")
            if len(value) != count:
                raise ProtocolError(f"{name}: must be {count} values, got {len(value)}")


def _explain(obj: object, specs: Sequence[tuple[str, str, int]]) -> ProtocolError:
    """The error naming the first field of ``obj`` that its C type can't hold.

    ``specs`` lists (field, struct code, count); count 0 is a scalar, otherwise a tuple
    of exactly that length. Only called once struct.pack has refused, so it costs nothing
    on the good path.
    """
    _check_lengths(obj, specs)
    for name, code, count in specs:
        value = getattr(obj, name)
        values = (value,) if count == 0 else value
        lo, hi = _RANGES[code]
        for v in values:
            if not isinstance(v, int) or not lo <= v <= hi:
                return ProtocolError(f"{name}: {v!r} does not fit a {_CTYPES[code]}")
    return ProtocolError(f"cannot encode {obj!r}")


# ---------------------------------------------------------------------------------------
# The 464-byte request / ACK / NACK


@dataclass(frozen=True, slots=True)
class Packet:
    """Every field of the 464-byte request, as raw integers.

    command, unit, core_type, workload and policy_to_use stay plain ints so a value the
    enums don't know survives decoding and the handler can NACK it; the ``*_enum``
    properties give the enum member or None. ``vm_name`` is the C string (up to the first
    NUL), decoded UTF-8 with surrogateescape so any bytes round-trip.
    """

    resource_id: int = 0
    unit: int = 0
    command: int = 0
    vm_name: str = ""
    vfid: tuple[int, ...] = _ZERO10
    nb_mac_to_monitor: int = 0
    min_packet_thresh: int = 0
    avg_max_packet_thresh: int = 0
    max_max_packet_thresh: int = 0
    vcpu_to_control: tuple[int, ...] = _ZERO8
    num_vcpu: int = 0
    busy_hours: tuple[int, ...] = _ZERO24
    quiet_hours: tuple[int, ...] = _ZERO24
    hours_to_use_traffic_profile: tuple[int, ...] = _ZERO24
    core_type: int = 0
    workload: int = 0
    policy_to_use: int = 0
    turbo_status: int = 0

    @property
    def command_enum(self) -> Command | None:
        return _COMMANDS.get(self.command)

    @property
    def unit_enum(self) -> Unit | None:
        return _UNITS.get(self.unit)

    @property
    def core_type_enum(self) -> CoreType | None:
        return _CORE_TYPES.get(self.core_type)

    @property
    def workload_enum(self) -> Workload | None:
        return _WORKLOADS.get(self.workload)

    @property
    def policy_enum(self) -> PolicyType | None:
        return _POLICIES.get(self.policy_to_use)

    @property
    def control_list(self) -> tuple[int, ...]:
        """The ``num_vcpu`` first entries of vcpu_to_control (at most 8, the array's size)."""
        return self.vcpu_to_control[: max(0, min(self.num_vcpu, MAX_VCPU_PER_VM))]

    @property
    def macs(self) -> tuple[str, ...]:
        """The ``nb_mac_to_monitor`` first vfid entries as MAC strings (at most 10)."""
        count = max(0, min(self.nb_mac_to_monitor, NUM_VFID))
        return tuple(vfid_to_mac(v) for v in self.vfid[:count])


_PACKET_FIELDS: tuple[tuple[str, str, int], ...] = (
    ("resource_id", "Q", 0),
    ("unit", "I", 0),
    ("command", "I", 0),
    ("vfid", "Q", NUM_VFID),
    ("nb_mac_to_monitor", "i", 0),
    ("min_packet_thresh", "I", 0),
    ("avg_max_packet_thresh", "I", 0),
    ("max_max_packet_thresh", "I", 0),
    ("vcpu_to_control", "B", MAX_VCPU_PER_VM),
    ("num_vcpu", "B", 0),
    ("busy_hours", "i", NUM_HOURS),
    ("quiet_hours", "i", NUM_HOURS),
    ("hours_to_use_traffic_profile", "i", NUM_HOURS),
    ("core_type", "B", 0),
    ("workload", "i", 0),
    ("policy_to_use", "i", 0),
    ("turbo_status", "B", 0),
)


_PACKET_LENGTHS = (NUM_VFID, MAX_VCPU_PER_VM, NUM_HOURS, NUM_HOURS, NUM_HOURS)


def decode_packet(buf: Buffer, offset: int = 0) -> Packet:
    """Decode the 464-byte request at ``offset``; never fails on garbage field values.

    Only the length is checked: DPDK's CONNECT probe leaves every field but ``command``
    uninitialised, and judging values is the handler's job.
    """
    if offset < 0 or len(buf) - offset < PACKET_SIZE:
        raise _short(buf, offset, PACKET_SIZE, "packet")
    v = _PACKET.unpack_from(buf, offset)
    return Packet(
        v[0],
        v[1],
        v[2],
        _name_from_field(v[3]),
        v[4:14],
        v[14],
        v[15],
        v[16],
        v[17],
        v[18:26],
        v[26],
        v[27:51],
        v[51:75],
        v[75:99],
        v[99],
        v[100],
        v[101],
        v[102],
    )


def encode_packet(p: Packet) -> bytes:
    """The 464 bytes of ``p``: vm_name NUL-padded, every padding byte zero."""
    name = _name_to_field(p.vm_name)
    try:
        lengths: tuple[int, ...] | None = (
            len(p.vfid),
            len(p.vcpu_to_control),
            len(p.busy_hours),
            len(p.quiet_hours),
            len(p.hours_to_use_traffic_profile),
        )
    except TypeError:
        lengths = None
    if lengths != _PACKET_LENGTHS:
        _check_lengths(p, _PACKET_FIELDS)
    try:
        return _PACKET.pack(
            p.resource_id,
            p.unit,
            p.command,
            name,
            *p.vfid,
            p.nb_mac_to_monitor,
            p.min_packet_thresh,
            p.avg_max_packet_thresh,
            p.max_max_packet_thresh,
            *p.vcpu_to_control,
            p.num_vcpu,
            *p.busy_hours,
            *p.quiet_hours,
            *p.hours_to_use_traffic_profile,
            p.core_type,
            p.workload,
            p.policy_to_use,
            p.turbo_status,
        )
    except (struct.error, TypeError):
        raise _explain(p, _PACKET_FIELDS) from None


# ---------------------------------------------------------------------------------------
# Replies to queries


@dataclass(frozen=True, slots=True)
class FreqListReply:
    """The 88-byte answer to QUERY_FREQ_LIST / QUERY_FREQ (command FREQ_LIST, or NACK)."""

    resource_id: int = 0
    unit: int = 0
    command: int = ReplyCode.FREQ_LIST.value
    vm_name: str = ""
    freq_list_khz: tuple[int, ...] = _ZERO8
    num_vcpu: int = 0

    def encode(self) -> bytes:
        """The 88 bytes: vm_name NUL-padded, padding zero."""
        name = _name_to_field(self.vm_name)
        _check_lengths(self, _FREQ_FIELDS)
        try:
            return _FREQ_LIST.pack(
                self.resource_id, self.unit, self.command, name, *self.freq_list_khz, self.num_vcpu
            )
        except (struct.error, TypeError):
            raise _explain(self, _FREQ_FIELDS) from None

    @classmethod
    def decode(cls, buf: Buffer, offset: int = 0) -> Self:
        """The reply at ``offset`` (the guest tool's side); values are not judged."""
        if offset < 0 or len(buf) - offset < FREQ_LIST_SIZE:
            raise _short(buf, offset, FREQ_LIST_SIZE, "FREQ_LIST reply")
        v = _FREQ_LIST.unpack_from(buf, offset)
        return cls(v[0], v[1], v[2], _name_from_field(v[3]), v[4:12], v[12])


_FREQ_FIELDS: tuple[tuple[str, str, int], ...] = (
    ("resource_id", "Q", 0),
    ("unit", "I", 0),
    ("command", "I", 0),
    ("freq_list_khz", "I", MAX_VCPU_PER_VM),
    ("num_vcpu", "B", 0),
)


@dataclass(frozen=True, slots=True)
class CapsListReply:
    """The 184-byte answer to QUERY_CAPS_LIST / QUERY_CAPS (command CAPS_LIST, or NACK)."""

    resource_id: int = 0
    unit: int = 0
    command: int = ReplyCode.CAPS_LIST.value
    vm_name: str = ""
    turbo: tuple[int, ...] = _ZERO8
    priority: tuple[int, ...] = _ZERO8
    num_vcpu: int = 0

    def encode(self) -> bytes:
        """The 184 bytes: vm_name NUL-padded, padding zero."""
        name = _name_to_field(self.vm_name)
        _check_lengths(self, _CAPS_FIELDS)
        try:
            return _CAPS_LIST.pack(
                self.resource_id,
                self.unit,
                self.command,
                name,
                *self.turbo,
                *self.priority,
                self.num_vcpu,
            )
        except (struct.error, TypeError):
            raise _explain(self, _CAPS_FIELDS) from None

    @classmethod
    def decode(cls, buf: Buffer, offset: int = 0) -> Self:
        """The reply at ``offset`` (the guest tool's side); values are not judged."""
        if offset < 0 or len(buf) - offset < CAPS_LIST_SIZE:
            raise _short(buf, offset, CAPS_LIST_SIZE, "CAPS_LIST reply")
        v = _CAPS_LIST.unpack_from(buf, offset)
        return cls(v[0], v[1], v[2], _name_from_field(v[3]), v[4:12], v[12:20], v[20])


_CAPS_FIELDS: tuple[tuple[str, str, int], ...] = (
    ("resource_id", "Q", 0),
    ("unit", "I", 0),
    ("command", "I", 0),
    ("turbo", "Q", MAX_VCPU_PER_VM),
    ("priority", "Q", MAX_VCPU_PER_VM),
    ("num_vcpu", "B", 0),
)


# ---------------------------------------------------------------------------------------
# Fast paths for the request handler


def peek_header(buf: Buffer, offset: int = 0) -> tuple[int, int, int]:
    """(resource_id, unit, command) of the request at ``offset``, without decoding the rest."""
    try:
        return _HEADER.unpack_from(buf, offset)  # type: ignore[return-value]
    except struct.error:
        raise _short(buf, offset, _HEADER.size, "packet header") from None


def peek_routing(buf: Buffer, offset: int = 0) -> tuple[int, int, int, bytes, int]:
    """(resource_id, unit, command, vm_name bytes up to the first NUL, core_type)."""
    try:
        resource_id, unit, command, name, core_type = _ROUTING.unpack_from(buf, offset)
    except struct.error:
        raise _short(buf, offset, _ROUTING.size, "packet") from None
    return resource_id, unit, command, name.partition(b"\0")[0], core_type


def echo_reply(buf: Buffer, offset: int, code: int) -> bytes:
    """The 464-byte ACK/NACK echo of the request at ``offset``, with ``command = code``.

    Equal to ``encode_packet(replace(decode_packet(buf, offset), command=code))`` (padding
    zeroed, vm_name cut at its first NUL and NUL-padded) without decoding: the field runs
    are copied as they are. A vm_name filling all 32 bytes (no NUL), which encode_packet
    refuses, is echoed as the guest sent it.
    """
    try:
        head, _command, name, middle, hours, tail = _ECHO.unpack_from(buf, offset)
        return _ECHO.pack(head, code, name.partition(b"\0")[0], middle, hours, tail)
    except struct.error:
        if len(buf) - offset < PACKET_SIZE or offset < 0:
            raise _short(buf, offset, PACKET_SIZE, "packet") from None
        raise ProtocolError(f"reply code {code!r} does not fit a u32") from None


def encode_freq_list(
    resource_id: int,
    unit: int,
    vm_name: str | bytes,
    freqs_khz: Sequence[int],
    num_vcpu: int,
) -> bytes:
    """An 88-byte FREQ_LIST reply: ``freqs_khz`` (at most 8, zero-filled) for ``num_vcpu``.

    For QUERY_FREQ the guest reads ``freq_list[resource_id]`` (DPDK guest_cli), so put the
    one frequency at that index.
    """
    name = _name_to_field(vm_name)
    _check_reply_lists(num_vcpu, ("freqs_khz", freqs_khz))
    try:
        return _FREQ_LIST.pack(
            resource_id,
            unit,
            ReplyCode.FREQ_LIST,
            name,
            *freqs_khz,
            *_ZERO8[len(freqs_khz) :],
            num_vcpu,
        )
    except (struct.error, TypeError):
        reply = FreqListReply(
            resource_id, unit, ReplyCode.FREQ_LIST, "", _pad8(freqs_khz), num_vcpu
        )
        raise _explain(reply, _FREQ_FIELDS) from None


def encode_caps_list(
    resource_id: int,
    unit: int,
    vm_name: str | bytes,
    turbo: Sequence[int],
    priority: Sequence[int],
    num_vcpu: int,
) -> bytes:
    """A 184-byte CAPS_LIST reply: per-vCPU ``turbo`` and ``priority`` flags (0/1, at most 8)."""
    name = _name_to_field(vm_name)
    _check_reply_lists(num_vcpu, ("turbo", turbo), ("priority", priority))
    try:
        return _CAPS_LIST.pack(
            resource_id,
            unit,
            ReplyCode.CAPS_LIST,
            name,
            *turbo,
            *_ZERO8[len(turbo) :],
            *priority,
            *_ZERO8[len(priority) :],
            num_vcpu,
        )
    except (struct.error, TypeError):
        reply = CapsListReply(
            resource_id, unit, ReplyCode.CAPS_LIST, "", _pad8(turbo), _pad8(priority), num_vcpu
        )
        raise _explain(reply, _CAPS_FIELDS) from None


def _pad8(values: Sequence[int]) -> tuple[int, ...]:
    return (*values, *_ZERO8[len(values) :])


def _check_reply_lists(num_vcpu: int, *lists: tuple[str, Sequence[int]]) -> None:
    for name, values in lists:
        if len(values) > MAX_VCPU_PER_VM:
            raise ProtocolError(f"{name}: {len(values)} entries, at most {MAX_VCPU_PER_VM} fit")
    # The guest loops over num_vcpu entries of an 8-entry array: more would overrun it.
    if not isinstance(num_vcpu, int) or not 0 <= num_vcpu <= MAX_VCPU_PER_VM:
        raise ProtocolError(f"num_vcpu: {num_vcpu!r} is not 0-{MAX_VCPU_PER_VM}")


def _reply_head(buf: Buffer, offset: int) -> bytes:
    # resource_id, unit and vm_name of the request; command NACK.
    try:
        resource_id, unit, _command, name = _REPLY_HEAD.unpack_from(buf, offset)
    except struct.error:
        raise _short(buf, offset, _REPLY_HEAD.size, "packet") from None
    return _REPLY_HEAD.pack(resource_id, unit, ReplyCode.NACK, name.partition(b"\0")[0])


def nack_freq_list(buf: Buffer, offset: int = 0) -> bytes:
    """The 88-byte refusal of the query at ``offset`` (rule 2): command NACK, no entries."""
    return _reply_head(buf, offset) + _FREQ_TAIL


def nack_caps_list(buf: Buffer, offset: int = 0) -> bytes:
    """The 184-byte refusal of the query at ``offset`` (rule 2): command NACK, no entries."""
    return _reply_head(buf, offset) + _CAPS_TAIL


def nack_reply(buf: Buffer, offset: int = 0) -> bytes:
    """The refusal of the request at ``offset`` in the size its guest reads (rule 2).

    88 or 184 bytes for queries, nothing for CONNECT, a 464-byte NACK echo otherwise
    (unknown commands included).
    """
    _resource_id, _unit, command = peek_header(buf, offset)
    size = REPLY_SIZE.get(command, PACKET_SIZE)
    if size == PACKET_SIZE:
        return echo_reply(buf, offset, ReplyCode.NACK)
    if size == FREQ_LIST_SIZE:
        return nack_freq_list(buf, offset)
    if size == CAPS_LIST_SIZE:
        return nack_caps_list(buf, offset)
    return b""


# ---------------------------------------------------------------------------------------
# MAC addresses in vfid


def vfid_to_mac(vfid: int) -> str:
    """The MAC in a vfid: DPDK stores it through ``union { rte_ether_addr; uint64_t }``,
    so the first MAC byte is the u64's lowest byte (x86-64 is little-endian)."""
    return (vfid & 0xFFFF_FFFF_FFFF).to_bytes(8, "little")[:6].hex(":")


_MAC_RE = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")


def mac_to_vfid(mac: str) -> int:
    """The vfid value DPDK would send for ``mac`` (``"xx:xx:xx:xx:xx:xx"``)."""
    if not isinstance(mac, str) or not _MAC_RE.fullmatch(mac):
        raise ProtocolError(f"{mac!r} is not a MAC address xx:xx:xx:xx:xx:xx")
    return int.from_bytes(bytes.fromhex(mac.replace(":", "")), "little")


# ---------------------------------------------------------------------------------------
# Framing a channel's byte stream


class PacketStream:
    """Cuts a channel's byte stream into whole 464-byte requests (rule 1: a short read
    waits for the rest). Keeps at most 463 bytes between feeds."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete request held until the rest arrives."""
        return len(self._buf)

    def feed(self, data: Buffer) -> list[bytes]:
        """Add ``data`` (any chunking) and return the requests it completes, in order."""
        size = PACKET_SIZE
        buf = self._buf
        packets: list[bytes] = []
        n = len(data)
        start = 0
        if buf:
            need = size - len(buf)
            if n < need:
                buf += data
                return packets
            buf += data[:need]
            packets.append(bytes(buf))
            buf.clear()
            start = need
        whole = (n - start) // size * size
        stop = start + whole
        if whole:
            # Bulk path: no per-byte work; one copy at most (none for bytes), then one
            # slice per request.
            if type(data) is bytes:
                blob, base = data, start
            else:
                blob, base = bytes(memoryview(data)[start:stop]), 0
            packets += [blob[i : i + size] for i in range(base, base + whole, size)]
        if stop < n:
            buf += data[stop:]
        return packets


# ---------------------------------------------------------------------------------------
# JSON messages on the host FIFOs


@dataclass(frozen=True, slots=True)
class FifoInstruction:
    """``{"instruction": {"command": "power", "unit": "<UNIT>"}}`` for the FIFO's CPU."""

    unit: Unit


PolicyCommand = Literal["create", "destroy"]


@dataclass(frozen=True, slots=True)
class FifoPolicy:
    """``{"policy": {...}}``: create or destroy the FIFO owner's policy on the FIFO's CPU.

    Only the hours actually given are listed (no zero padding); MACs are lower case.
    """

    command: PolicyCommand
    policy_type: PolicyType | None = None
    workload: Workload | None = None
    busy_hours: tuple[int, ...] = ()
    quiet_hours: tuple[int, ...] = ()
    mac_list: tuple[str, ...] = ()
    avg_packet_thresh: int | None = None
    max_packet_thresh: int | None = None


FifoMessage = FifoInstruction | FifoPolicy

_U32_MAX = 2**32 - 1
_INSTRUCTION_KEYS = frozenset({"command", "unit"})
_POLICY_KEYS = frozenset(
    {
        "command",
        "policy_type",
        "workload",
        "busy_hours",
        "quiet_hours",
        "mac_list",
        "avg_packet_thresh",
        "max_packet_thresh",
    }
)


_E = TypeVar("_E", bound=IntEnum)


def _names(enum: type[IntEnum]) -> str:
    return ", ".join(m.name for m in enum)


def _reject_unknown(body: dict[str, object], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        listed = ", ".join(repr(k) for k in unknown)
        raise ProtocolError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {listed} "
            f"(allowed: {', '.join(sorted(allowed))})"
        )


def _enum_value(body: dict[str, object], key: str, enum: type[_E]) -> _E | None:
    if key not in body:
        return None
    value = body[key]
    if isinstance(value, str) and value in enum.__members__:
        return enum[value]
    raise ProtocolError(f"{key}: {value!r} is not one of {_names(enum)}")


def _hours(body: dict[str, object], key: str) -> tuple[int, ...]:
    value = body.get(key, [])
    if not isinstance(value, list):
        raise ProtocolError(f"{key}: must be a list of hours 0-23, not {value!r}")
    seen: list[int] = []
    for hour in value:
        if not _is_int(hour) or not 0 <= hour < NUM_HOURS:
            raise ProtocolError(f"{key}: {hour!r} is not an hour 0-23")
        if hour in seen:
            raise ProtocolError(f"{key}: hour {hour} given twice")
        seen.append(hour)
    return tuple(seen)


def _threshold(body: dict[str, object], key: str) -> int | None:
    if key not in body:
        return None
    value = body[key]
    # It becomes a u32 (traffic_policy.*_max_packet_thresh) in the reference's packet.
    if not _is_int(value) or not 0 <= value <= _U32_MAX:
        raise ProtocolError(f"{key}: {value!r} is not an integer 0-{_U32_MAX}")
    return value


def _is_int(value: object) -> TypeGuard[int]:
    # JSON true/false arrive as Python bools, which are ints: not a number here.
    return isinstance(value, int) and not isinstance(value, bool)


def _macs(body: dict[str, object]) -> tuple[str, ...]:
    value = body.get("mac_list", [])
    if not isinstance(value, list):
        raise ProtocolError(f"mac_list: must be a list of MAC addresses, not {value!r}")
    if len(value) > NUM_VFID:
        raise ProtocolError(f"mac_list: {len(value)} MACs, at most {NUM_VFID} fit (vfid[10])")
    macs: list[str] = []
    for mac in value:
        if not isinstance(mac, str) or not _MAC_RE.fullmatch(mac):
            raise ProtocolError(f"mac_list: {mac!r} is not a MAC address xx:xx:xx:xx:xx:xx")
        if mac.lower() in macs:
            raise ProtocolError(f"mac_list: {mac!r} given twice")
        macs.append(mac.lower())
    return tuple(macs)


def _parse_instruction(body: object) -> FifoInstruction:
    if not isinstance(body, dict):
        raise ProtocolError(f"instruction: must be an object, not {body!r}")
    _reject_unknown(body, _INSTRUCTION_KEYS, "instruction")
    if "command" not in body:
        raise ProtocolError('command: missing (an instruction\'s command is "power")')
    if body["command"] != "power":
        raise ProtocolError(f'command: {body["command"]!r} is not "power" in an instruction')
    unit = _enum_value(body, "unit", Unit)
    if unit is None:
        raise ProtocolError(f"unit: missing (one of {_names(Unit)})")
    return FifoInstruction(unit)


def _parse_policy(body: object) -> FifoPolicy:
    if not isinstance(body, dict):
        raise ProtocolError(f"policy: must be an object, not {body!r}")
    _reject_unknown(body, _POLICY_KEYS, "policy")
    command = body.get("command")
    if command not in ("create", "destroy"):
        if "command" not in body:
            raise ProtocolError('command: missing (a policy\'s command is "create" or "destroy")')
        raise ProtocolError(f'command: {command!r} is not "create" or "destroy" in a policy')
    policy_type = _enum_value(body, "policy_type", PolicyType)
    workload = _enum_value(body, "workload", Workload)
    busy = _hours(body, "busy_hours")
    quiet = _hours(body, "quiet_hours")
    for hour in quiet:
        if hour in busy:
            raise ProtocolError(f"quiet_hours: {hour} is also a busy hour")
    macs = _macs(body)
    avg = _threshold(body, "avg_packet_thresh")
    top = _threshold(body, "max_packet_thresh")
    if avg is not None and top is not None and avg > top:
        raise ProtocolError(f"avg_packet_thresh: {avg} is above max_packet_thresh {top}")
    if command == "create":
        # What each policy reads (PROTOCOL.md, Policies): without it there is nothing to do.
        if policy_type is None:
            raise ProtocolError(f"policy_type: missing (create needs one of {_names(PolicyType)})")
        if policy_type is PolicyType.WORKLOAD and workload is None:
            raise ProtocolError(f"workload: missing (a WORKLOAD policy needs {_names(Workload)})")
        if policy_type is PolicyType.TRAFFIC:
            for key, value in (("avg_packet_thresh", avg), ("max_packet_thresh", top)):
                if value is None:
                    raise ProtocolError(f"{key}: missing (a TRAFFIC policy needs both thresholds)")
    verb: PolicyCommand = "create" if command == "create" else "destroy"
    return FifoPolicy(verb, policy_type, workload, busy, quiet, macs, avg, top)


def parse_json_message(obj: dict[str, object]) -> FifoMessage:
    """Validate one decoded JSON object: ``{"instruction": {...}}`` or ``{"policy": {...}}``."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"a message must be a JSON object, not {type(obj).__name__}")
    keys = set(obj)
    if keys == {"instruction"}:
        return _parse_instruction(obj["instruction"])
    if keys == {"policy"}:
        return _parse_policy(obj["policy"])
    _reject_unknown(obj, frozenset({"instruction", "policy"}), "message")
    if not keys:
        raise ProtocolError('empty message: expected "instruction" or "policy"')
    raise ProtocolError('a message holds "instruction" or "policy", not both')


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj: dict[str, object] = {}
    for key, value in pairs:
        if key in obj:
            raise ProtocolError(f"{key}: key given twice")
        obj[key] = value
    return obj


def _parse_raw(raw: bytes) -> FifoMessage | ProtocolError:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return ProtocolError(f"message is not UTF-8 (bad byte at {exc.start})")
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        return parse_json_message(obj)
    except ProtocolError as exc:
        return exc
    except json.JSONDecodeError as exc:
        return ProtocolError(f"malformed JSON: {exc.msg} (line {exc.lineno} column {exc.colno})")
    except (ValueError, RecursionError) as exc:  # e.g. a 5000-digit integer, deep nesting
        return ProtocolError(f"malformed JSON: {exc}")


# Scanner states of JsonStream.
_TOP, _OBJECT, _SKIP = 0, 1, 2
# Bytes allowed between messages. JSON whitespace (RFC 8259 section 2), plus NUL: C
# writers often send the terminating NUL of their string along with it.
_SEPARATORS = b" \t\r\n\0"
_STRUCTURAL = re.compile(rb'[{}"]')
_IN_STRING = re.compile(rb'["\\]')


class JsonStream:
    """Cuts a FIFO's byte stream into JSON objects and parses each exactly once.

    A scanner tracks nesting and string state (so braces and escaped quotes inside
    strings don't end a message) and hands each complete top-level ``{...}`` to
    :func:`parse_json_message`. Results come back in stream order; a rejected message
    is a :class:`ProtocolError` item, so one bad message never hides the next one.

    An object still open after ``max_message_bytes`` is dropped (one error item); the
    scanner keeps following its nesting without storing it, so a well-formed oversize
    message is skipped whole, and the next top-level ``{`` starts a new message. If it
    is still open after a further ``max_message_bytes`` (a lost ``}``), the scanner
    gives up on it and resynchronises at the next ``{``. Every decision depends on
    stream positions only, never on how the bytes were chunked.
    """

    def __init__(self, max_message_bytes: int = MAX_JSON_MESSAGE_BYTES) -> None:
        if max_message_bytes < 2:
            raise ValueError("max_message_bytes must hold at least '{}'")
        self._max = max_message_bytes
        self._buf = bytearray()  # the open message from its '{' (state _OBJECT only)
        self._state = _TOP
        self._depth = 0
        self._in_string = False
        self._escape = False  # the previous byte was a backslash inside a string
        self._budget = 0  # bytes the open (or skipped) message may still take
        self._stray = False  # inside a run of non-JSON bytes, already reported

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held until the rest arrives."""
        return len(self._buf)

    def reset(self) -> ProtocolError | None:
        """Forget any partial message (the writer closed the FIFO); report one if there was."""
        lost = self._state != _TOP
        self._buf.clear()
        self._state, self._depth, self._in_string, self._escape = _TOP, 0, False, False
        self._stray = False
        return ProtocolError("message cut short: the writer closed the FIFO") if lost else None

    def feed(self, data: Buffer) -> list[FifoMessage | ProtocolError]:
        """Add ``data`` (any chunking) and return the messages it completes, in order."""
        out: list[FifoMessage | ProtocolError] = []
        buf = self._buf
        pos = len(buf)  # what is already buffered has been scanned
        buf += data
        end = len(buf)
        start = 0  # index of the open message's '{' in buf
        while pos < end:
            if self._state == _TOP:
                brace = buf.find(b"{", pos)
                stop = end if brace < 0 else brace
                if not self._stray and buf[pos:stop].strip(_SEPARATORS):
                    self._stray = True
                    out.append(ProtocolError("bytes outside a JSON object: skipped"))
                if brace < 0:
                    break
                self._stray = False
                self._state, self._depth, self._in_string, self._escape = _OBJECT, 1, False, False
                self._budget = self._max - 1
                start = brace
                pos = brace + 1
                continue
            limit = min(end, pos + self._budget)
            scanned_from = pos
            pos, closed = self._scan(buf, pos, limit)
            if closed:
                if self._state == _OBJECT:
                    out.append(_parse_raw(bytes(buf[start:pos])))
                self._state = _TOP
                continue
            self._budget -= pos - scanned_from
            if self._budget > 0:
                break  # end of data
            if self._state == _OBJECT:
                out.append(
                    ProtocolError(
                        f"message over {self._max} bytes without its closing '}}': dropped"
                    )
                )
                self._state = _SKIP
                self._budget = self._max
            else:  # a '}' was lost: stop following it, resync at the next '{'
                self._state = _TOP
                self._stray = True  # its remaining bytes are not reported again
        if self._state == _OBJECT:
            if start:
                del buf[:start]
        else:
            buf.clear()
        return out

    def _scan(self, buf: bytearray, pos: int, limit: int) -> tuple[int, bool]:
        """Follow strings and nesting over buf[pos:limit]; (new pos, whether depth hit 0)."""
        depth = self._depth
        in_string = self._in_string
        if self._escape and pos < limit:
            pos += 1  # the byte after a backslash is never a quote that ends the string
            self._escape = False
        while pos < limit:
            if in_string:
                m = _IN_STRING.search(buf, pos, limit)
                if m is None:
                    pos = limit
                    break
                j = m.start()
                if buf[j] == 0x5C:  # backslash (RFC 8259 section 7): skip the next byte
                    if j + 1 < limit:
                        pos = j + 2
                    else:
                        self._escape = True
                        pos = limit
                else:
                    in_string = False
                    pos = j + 1
            else:
                m = _STRUCTURAL.search(buf, pos, limit)
                if m is None:
                    pos = limit
                    break
                j = m.start()
                c = buf[j]
                pos = j + 1
                if c == 0x22:  # '"'
                    in_string = True
                elif c == 0x7B:  # '{'
                    depth += 1
                else:  # '}'
                    depth -= 1
                    if depth == 0:
                        self._depth, self._in_string = 0, False
                        return pos, True
        self._depth, self._in_string = depth, in_string
        return pos, False
