"""The guest's requests: option values parsed, packets built, replies recognised.

Owns the rules that turn ``vmpower-guest`` options into the 464-byte request of
docs/protocol.md (via :func:`vmpower.protocol.encode_packet`) and the checks that tell a
request's own reply from a stale one. Nothing here does I/O.

No defaults that surprise: DPDK's guest_cli starts from a filled-in policy (VM name
"ubuntu2", busy hours 3, 4 and 5 left over from its example, ...). Here a policy holds
exactly what the options say, and ``send_policy`` refuses to send one that lacks what
its type needs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from vmpower import protocol
from vmpower.errors import ProtocolError, VmpowerError
from vmpower.protocol import UNIT_BY_OP, Command, PolicyType, ReplyCode, Workload

VCPU_LIMIT = 2**64  # resource_id is a u64: vCPU numbers below this
_LIST_ITEM = re.compile(r"(\d+)(?:-(\d+))?")


class OptionError(VmpowerError):
    """A command-line value the guest tool cannot turn into a request (usage error)."""


def parse_number_list(text: str, what: str, limit: int) -> tuple[int, ...]:
    """``"0-2,5"`` → (0, 1, 2, 5): ascending, each below ``limit``, none twice."""
    values: list[int] = []
    for item in text.replace(" ", "").split(","):
        match = _LIST_ITEM.fullmatch(item)
        if match is None:
            raise OptionError(f"{what}: {item!r} is not a number or a range like 3-5")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise OptionError(f"{what}: range {item} runs backwards")
        if high >= limit:
            raise OptionError(f"{what}: {high} is out of range (0-{limit - 1})")
        for value in range(low, high + 1):
            if value in values:
                raise OptionError(f"{what}: {value} given twice")
            values.append(value)
    return tuple(sorted(values))


def parse_hours(text: str, what: str) -> tuple[int, ...]:
    hours = parse_number_list(text, what, protocol.NUM_HOURS)
    if hours == (0,):
        # The packet's 24 slots are zero-padded, so the host cannot tell hour 0 alone
        # from no hour (vmpower counts a 0 only before a non-zero hour).
        raise OptionError(
            f"{what}: hour 0 alone cannot be sent (the 24 slots are zero-padded); add another hour"
        )
    return hours


def parse_macs(text: str) -> tuple[str, ...]:
    """MAC addresses separated by ``,`` or ``;`` (DPDK's guest_cli uses ``;``)."""
    macs: list[str] = []
    for item in re.split(r"[,;]", text.replace(" ", "")):
        try:
            protocol.mac_to_vfid(item)
        except ProtocolError as exc:
            raise OptionError(f"--mac-list: {exc}") from None
        if item.lower() in macs:
            raise OptionError(f"--mac-list: {item} given twice")
        macs.append(item.lower())
    if len(macs) > protocol.NUM_VFID:
        raise OptionError(f"--mac-list: {len(macs)} MACs, at most {protocol.NUM_VFID} fit")
    return tuple(macs)


@dataclass(frozen=True)
class PolicyOptions:
    """What ``send_policy now`` sends: only what the options gave."""

    policy: PolicyType | None = None
    vcpus: tuple[int, ...] = ()
    busy_hours: tuple[int, ...] = ()
    quiet_hours: tuple[int, ...] = ()
    workload: Workload | None = None
    macs: tuple[str, ...] = ()
    min_packet_thresh: int | None = None
    avg_packet_thresh: int | None = None
    max_packet_thresh: int | None = None

    def missing(self) -> str | None:
        """What the policy still lacks to be sent, as the option to give; None if complete."""
        if self.policy is None:
            return "--policy TIME|TRAFFIC|WORKLOAD|BRANCH_RATIO"
        if not self.vcpus:
            return "--vcpu-list (the vCPUs the policy controls, e.g. 0-1)"
        if self.policy is PolicyType.TIME and not (self.busy_hours or self.quiet_hours):
            return "--busy-hours or --quiet-hours (a TIME policy needs hours)"
        if self.policy is PolicyType.WORKLOAD and self.workload is None:
            return "--workload HIGH|MEDIUM|LOW"
        if self.policy is PolicyType.TRAFFIC and (
            self.avg_packet_thresh is None or self.max_packet_thresh is None
        ):
            return "--avg-packet-thresh and --max-packet-thresh (packets/s for TRAFFIC)"
        return None

    def check(self) -> None:
        overlap = sorted(set(self.busy_hours) & set(self.quiet_hours))
        if overlap:
            raise OptionError(f"--quiet-hours: {overlap[0]} is also a busy hour")
        if len(self.vcpus) > protocol.MAX_VCPU_PER_VM:
            raise OptionError(
                f"--vcpu-list: {len(self.vcpus)} vCPUs, a policy holds at most"
                f" {protocol.MAX_VCPU_PER_VM}"
            )
        avg, top = self.avg_packet_thresh, self.max_packet_thresh
        if avg is not None and top is not None and avg > top:
            raise OptionError(f"--avg-packet-thresh: {avg} is above --max-packet-thresh {top}")


def _hours24(hours: tuple[int, ...]) -> tuple[int, ...]:
    return hours + (0,) * (protocol.NUM_HOURS - len(hours))


def _encode(packet: protocol.Packet) -> bytes:
    try:
        return protocol.encode_packet(packet)
    except ProtocolError as exc:
        raise OptionError(str(exc)) from None


def check_vm_name(vm_name: str) -> None:
    """Refuse a --vm-name that cannot fit the packet's char[32]."""
    try:
        protocol.encode_packet(protocol.Packet(vm_name=vm_name))
    except ProtocolError as exc:
        raise OptionError(f"--vm-name: {exc.reason.removeprefix('vm_name: ')}") from None


def power_request(vcpu: int, op: str, vm_name: str) -> bytes:
    """CPU_POWER for a vCPU of this VM (core_type VIRTUAL)."""
    return _encode(
        protocol.Packet(
            resource_id=vcpu, unit=UNIT_BY_OP[op], command=Command.CPU_POWER, vm_name=vm_name
        )
    )


def query_request(command: Command, vcpu: int, vm_name: str) -> bytes:
    return _encode(protocol.Packet(resource_id=vcpu, command=command, vm_name=vm_name))


def policy_request(options: PolicyOptions, vm_name: str) -> bytes:
    """PKT_POLICY from the options; OptionError names what is missing."""
    missing = options.missing()
    if missing:
        raise OptionError(f"send_policy needs {missing}")
    options.check()
    assert options.policy is not None
    vcpus = options.vcpus + (0,) * (protocol.MAX_VCPU_PER_VM - len(options.vcpus))
    vfid = tuple(protocol.mac_to_vfid(m) for m in options.macs)
    return _encode(
        protocol.Packet(
            command=Command.PKT_POLICY,
            vm_name=vm_name,
            vfid=vfid + (0,) * (protocol.NUM_VFID - len(vfid)),
            nb_mac_to_monitor=len(vfid),
            min_packet_thresh=options.min_packet_thresh or 0,
            avg_max_packet_thresh=options.avg_packet_thresh or 0,
            max_max_packet_thresh=options.max_packet_thresh or 0,
            vcpu_to_control=vcpus,
            num_vcpu=len(options.vcpus),
            busy_hours=_hours24(options.busy_hours),
            quiet_hours=_hours24(options.quiet_hours),
            workload=int(options.workload) if options.workload is not None else 0,
            policy_to_use=int(options.policy),
        )
    )


def remove_policy_request(vm_name: str) -> bytes:
    return _encode(protocol.Packet(command=Command.PKT_POLICY_REMOVE, vm_name=vm_name))


# ---------------------------------------------------------------------------------------
# Telling a request's own reply from a stale one


def reply_code(reply: bytes) -> int:
    return protocol.peek_header(reply)[2]


def echo_of(request: bytes) -> Callable[[bytes], bool]:
    """ACK/NACK of ``request``: the host echoes every field but ``command`` (rule 2)."""

    def accept(reply: bytes) -> bool:
        return (
            reply[:12] == request[:12]
            and reply[16:] == request[16:]
            and reply_code(reply) in (ReplyCode.ACK, ReplyCode.NACK)
        )

    return accept


def _sane_count(reply: bytes, offset: int) -> bool:
    return reply[offset] <= protocol.MAX_VCPU_PER_VM


def freq_list_reply(reply: bytes) -> bool:
    # DPDK's host fills only command, num_vcpu and the list (the rest is its stack):
    # the code is all that can be checked against any host.
    return reply_code(reply) in (ReplyCode.FREQ_LIST, ReplyCode.NACK) and _sane_count(reply, 80)


def caps_list_reply(reply: bytes) -> bool:
    if reply_code(reply) not in (ReplyCode.CAPS_LIST, ReplyCode.NACK):
        return False
    if not _sane_count(reply, 176):
        return False
    caps = protocol.CapsListReply.decode(reply)
    return all(v in (0, 1) for v in caps.turbo + caps.priority)
