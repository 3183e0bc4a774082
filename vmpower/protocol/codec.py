"""Binary codecs of the guest-channel protocol: every byte layout of its messages.

This module owns the wire format of ``docs/protocol.md`` ("Wire format"): the
464-byte request (echoed back as ACK/NACK), the 88-byte FREQ_LIST and the 184-byte
CAPS_LIST replies, their enums and sizes, the reply size each request command gets
(:data:`REPLY_SIZE`, :func:`reply_size`; "Host rules" 2) and the MAC addresses DPDK
packs into ``vfid``. It is the layout DPDK's librte_power (``kvm_vm`` guest driver,
``guest_cli``) uses on x86-64, so an unmodified DPDK guest can talk to vmpower.
Cutting a byte stream into requests is :mod:`vmpower.protocol.framing`'s job.

Standard library only and no I/O: the guest tool imports it in a minimal guest.

Two speeds on purpose. :class:`Packet` / :func:`decode_packet` / :func:`encode_packet`
give every field, for policy installs and tests. The request handler's hot path
(CPU_POWER, >350 000 requests/s in one process) never decodes a whole packet: it
uses :func:`peek_routing` and :func:`echo_reply`, which read and copy through
precompiled :class:`struct.Struct` objects. ``bench/bench_protocol.py`` measures both.

Every malformed input is reported as :class:`vmpower.errors.ProtocolError`, whose
``reason`` says what was wrong.
"""

from __future__ import annotations

import re
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Union

from vmpower.errors import ProtocolError

if TYPE_CHECKING:
    from typing import Self

# The guest tool (vmpower-guest.pyz) runs this module on any python3 >= 3.9: no
# typing.Self, no ``X | Y`` type at run time and no dataclass slots before 3.10.
SLOTS: dict[str, bool] = {"slots": True} if sys.version_info >= (3, 10) else {}

# A byte buffer: what sockets and FIFOs hand us.
Buffer = Union[bytes, bytearray, memoryview]  # noqa: UP007 (python 3.9, see SLOTS)


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


# The moves by name, as the operator's shell, the admin API and the guest tool spell
# them (``set_cpu_freq <cpu> max``): the one table from a word to a Unit.
UNIT_BY_OP: dict[str, Unit] = {
    "up": Unit.SCALE_UP,
    "down": Unit.SCALE_DOWN,
    "min": Unit.SCALE_MIN,
    "max": Unit.SCALE_MAX,
    "enable_turbo": Unit.ENABLE_TURBO,
    "disable_turbo": Unit.DISABLE_TURBO,
}


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
    elif isinstance(name, (bytes, bytearray)):  # tuple, not X | Y: python 3.9
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
            if not isinstance(value, (tuple, list)):  # tuple, not X | Y: python 3.9
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


@dataclass(frozen=True, **SLOTS)
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


@dataclass(frozen=True, **SLOTS)
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


@dataclass(frozen=True, **SLOTS)
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


def reply_size(packet: Buffer, offset: int = 0) -> int:
    """The size of the reply the guest reads for the request at ``offset`` (rule 2).

    0 for CONNECT (no reply), 88 or 184 for queries, 464 otherwise (unknown commands
    included): :data:`REPLY_SIZE`, for ACK and NACK alike. Needs only the 16-byte header.
    """
    return REPLY_SIZE.get(peek_header(packet, offset)[2], PACKET_SIZE)


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
    size = reply_size(buf, offset)
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


# "xx:xx:xx:xx:xx:xx", any case: the one MAC syntax (vfid helpers and the FIFO JSON).
MAC_PATTERN = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")


def mac_to_vfid(mac: str) -> int:
    """The vfid value DPDK would send for ``mac`` (``"xx:xx:xx:xx:xx:xx"``)."""
    if not isinstance(mac, str) or not MAC_PATTERN.fullmatch(mac):
        raise ProtocolError(f"{mac!r} is not a MAC address xx:xx:xx:xx:xx:xx")
    return int.from_bytes(bytes.fromhex(mac.replace(":", "")), "little")
