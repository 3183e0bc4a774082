"""The guest-channel codecs against DPDK's own bytes, and the stream framers."""

from __future__ import annotations

import dataclasses
import itertools
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmpower import protocol as P
from vmpower.errors import ProtocolError

# DPDK 22.11 guest captures (docs/protocol.md, "Test vectors").
_VECTOR_NAME = "dpdk-22.11-guest.json"
_VECTOR_PLACES = (Path(__file__).parent / "data" / _VECTOR_NAME,)
PADDING = (range(153, 156), range(445, 448), range(457, 464))
PADDING_BYTES = frozenset(i for r in PADDING for i in r)
NAME_FIELD = range(16, 48)
HYPOTHESIS = settings(deadline=None, max_examples=150)


def _load_vectors() -> dict[str, Any]:
    for place in _VECTOR_PLACES:
        if place.is_file():
            return json.loads(place.read_text())  # type: ignore[no-any-return]
    raise FileNotFoundError(f"test vectors {_VECTOR_NAME} not found in {_VECTOR_PLACES}")


VECTORS = _load_vectors()
CAPTURES = VECTORS["captures"]
CAPTURE_IDS = [f"lcore{c['lcore']}-{c['what'][:40]}" for c in CAPTURES]


def _capture(what: str, lcore: int = 0) -> bytes:
    for c in CAPTURES:
        if c["lcore"] == lcore and c["what"].startswith(what):
            return bytes.fromhex(c["hex"])
    raise KeyError(what)


# ---------------------------------------------------------------------------------------
# Layout


def test_sizes_match_the_spec_and_the_capture_file() -> None:
    assert struct.calcsize(P.PACKET_FORMAT) == P.PACKET_SIZE == VECTORS["packet_size"] == 464
    assert struct.calcsize(P.FREQ_LIST_FORMAT) == P.FREQ_LIST_SIZE == 88
    assert struct.calcsize(P.CAPS_LIST_FORMAT) == P.CAPS_LIST_SIZE == 184
    assert VECTORS["freq_list_reply_size"] == 88 and VECTORS["caps_list_reply_size"] == 184


def test_packet_layout_is_byte_identical_to_the_spec_format() -> None:
    # Distinct values in every field, packed with the spec's own struct format: both
    # layouts must put every byte in the same place.
    p = P.Packet(
        resource_id=0x0102030405060708,
        unit=0x11121314,
        command=0x21222324,
        vm_name="abc",
        vfid=tuple(0x3000 + i for i in range(10)),
        nb_mac_to_monitor=-5,
        min_packet_thresh=41,
        avg_max_packet_thresh=42,
        max_max_packet_thresh=43,
        vcpu_to_control=tuple(range(50, 58)),
        num_vcpu=59,
        busy_hours=tuple(range(100, 124)),
        quiet_hours=tuple(range(200, 224)),
        hours_to_use_traffic_profile=tuple(range(-24, 0)),
        core_type=1,
        workload=-7,
        policy_to_use=0x7FFFFFFF,
        turbo_status=1,
    )
    spec = struct.Struct("<QII32s10QiIII8sB3x72i?3xii?7x")
    expected = spec.pack(
        p.resource_id,
        p.unit,
        p.command,
        b"abc",
        *p.vfid,
        p.nb_mac_to_monitor,
        41,
        42,
        43,
        bytes(p.vcpu_to_control),
        59,
        *p.busy_hours,
        *p.quiet_hours,
        *p.hours_to_use_traffic_profile,
        True,
        -7,
        0x7FFFFFFF,
        True,
    )
    assert P.encode_packet(p) == expected


# ---------------------------------------------------------------------------------------
# DPDK's captured bytes


@pytest.mark.parametrize("capture", CAPTURES, ids=CAPTURE_IDS)
def test_every_capture_decodes_to_its_documented_fields(capture: dict[str, Any]) -> None:
    raw = bytes.fromhex(capture["hex"])
    decoded = dataclasses.asdict(P.decode_packet(raw))
    for key, value in capture["fields"].items():
        got = decoded[key]
        assert (list(got) if isinstance(got, tuple) else got) == value, key


@pytest.mark.parametrize("capture", CAPTURES, ids=CAPTURE_IDS)
def test_reencoding_a_capture_zeroes_padding_and_keeps_every_field(
    capture: dict[str, Any],
) -> None:
    raw = bytes.fromhex(capture["hex"])
    packet = P.decode_packet(raw)
    again = P.encode_packet(packet)
    assert len(again) == 464
    assert all(again[i] == 0 for i in PADDING_BYTES)
    name_end = 16 + raw[16:48].index(0)
    for i in range(464):
        if i not in PADDING_BYTES and not name_end <= i < 48:
            assert again[i] == raw[i], f"byte {i}"
    assert P.decode_packet(again) == packet


def test_connect_probe_garbage_does_not_break_decoding() -> None:
    raw = _capture("CONNECT probe")
    # DPDK leaves the probe uninitialised: garbage in the header, vm_name (after a NUL),
    # the hours, the turbo byte and the tail padding.
    assert raw[457] != 0 and any(raw[17:48])
    packet = P.decode_packet(raw)
    assert packet.command_enum is P.Command.CONNECT
    assert packet.vm_name == ""
    assert P.peek_header(raw)[2] == P.Command.CONNECT
    again = P.encode_packet(packet)
    assert again[457:] == bytes(7) and again[16:48] == bytes(32)
    # The guest never reads a reply to its probe: even a refusal sends nothing.
    assert P.nack_reply(raw) == b""


@pytest.mark.parametrize(
    ("what", "unit"),
    [
        ("rte_power_freq_up", P.Unit.SCALE_UP),
        ("rte_power_freq_down", P.Unit.SCALE_DOWN),
        ("rte_power_freq_max", P.Unit.SCALE_MAX),
        ("rte_power_freq_min", P.Unit.SCALE_MIN),
        ("rte_power_freq_enable_turbo", P.Unit.ENABLE_TURBO),
        ("rte_power_freq_disable_turbo", P.Unit.DISABLE_TURBO),
    ],
)
@pytest.mark.parametrize("lcore", [0, 3])
def test_dpdk_power_calls_map_to_units_and_resource_is_the_lcore(
    what: str, unit: P.Unit, lcore: int
) -> None:
    raw = _capture(what, lcore)
    packet = P.decode_packet(raw)
    assert (packet.command_enum, packet.unit_enum, packet.resource_id) == (
        P.Command.CPU_POWER,
        unit,
        lcore,
    )
    assert P.peek_header(raw) == (lcore, unit, P.Command.CPU_POWER)
    assert P.peek_routing(raw) == (lcore, unit, P.Command.CPU_POWER, b"", P.CoreType.VIRTUAL)


def test_time_policy_capture_reads_as_a_policy() -> None:
    packet = P.decode_packet(_capture("PKT_POLICY TIME"))
    assert packet.command_enum is P.Command.PKT_POLICY
    assert packet.policy_enum is P.PolicyType.TIME
    assert packet.core_type_enum is P.CoreType.VIRTUAL
    assert packet.control_list == (0, 1)
    assert packet.busy_hours[:3] == (17, 18, 19)
    # DPDK stores the MAC through a union with the u64: first MAC byte lowest.
    assert packet.macs == ("f0:f0:e0:e0:e0:e0",)
    assert P.mac_to_vfid("f0:f0:e0:e0:e0:e0") == packet.vfid[0]
    assert P.peek_routing(_capture("PKT_POLICY TIME"))[3] == b"vm1"


def test_workload_policy_capture_names_a_physical_core() -> None:
    packet = P.decode_packet(_capture("PKT_POLICY WORKLOAD"))
    assert packet.policy_enum is P.PolicyType.WORKLOAD
    assert packet.workload_enum is P.Workload.HIGH
    assert packet.core_type_enum is P.CoreType.PHYSICAL
    assert packet.control_list == (3,)


def test_unknown_enum_values_survive_decoding_for_the_handler_to_nack() -> None:
    raw = bytearray(P.encode_packet(P.Packet(command=1, unit=3)))
    raw[8:12] = (99).to_bytes(4, "little")
    raw[12:16] = (5).to_bytes(4, "little")
    raw[444] = 7  # a C bool that is neither 0 nor 1
    raw[448:452] = (9).to_bytes(4, "little", signed=True)
    raw[452:456] = (-1).to_bytes(4, "little", signed=True)
    packet = P.decode_packet(bytes(raw))
    assert (packet.unit, packet.command, packet.core_type) == (99, 5, 7)
    assert (packet.workload, packet.policy_to_use) == (9, -1)
    assert packet.unit_enum is None and packet.command_enum is None
    assert packet.core_type_enum is None and packet.workload_enum is None
    assert packet.policy_enum is None
    assert P.peek_routing(bytes(raw))[4] == 7


def test_num_vcpu_and_nb_mac_beyond_their_arrays_are_clamped() -> None:
    packet = P.Packet(num_vcpu=200, nb_mac_to_monitor=-3, vcpu_to_control=tuple(range(8)))
    assert packet.control_list == tuple(range(8))
    assert packet.macs == ()
    assert len(P.Packet(nb_mac_to_monitor=99).macs) == 10


# ---------------------------------------------------------------------------------------
# Hypothesis round trips

u8 = st.integers(0, 2**8 - 1)
u32 = st.integers(0, 2**32 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
u64 = st.integers(0, 2**64 - 1)
# Any bytes without NUL that fit char[32] with its terminator; surrogateescape keeps
# non-UTF-8 bytes.
vm_names = (
    st.binary(max_size=31)
    .filter(lambda b: b"\0" not in b)
    .map(lambda b: b.decode("utf-8", "surrogateescape"))
)


def _tuples(elements: st.SearchStrategy[int], n: int) -> st.SearchStrategy[tuple[int, ...]]:
    return st.lists(elements, min_size=n, max_size=n).map(tuple)


packets = st.builds(
    P.Packet,
    resource_id=u64,
    unit=u32,
    command=u32,
    vm_name=vm_names,
    vfid=_tuples(u64, 10),
    nb_mac_to_monitor=i32,
    min_packet_thresh=u32,
    avg_max_packet_thresh=u32,
    max_max_packet_thresh=u32,
    vcpu_to_control=_tuples(u8, 8),
    num_vcpu=u8,
    busy_hours=_tuples(i32, 24),
    quiet_hours=_tuples(i32, 24),
    hours_to_use_traffic_profile=_tuples(i32, 24),
    core_type=u8,
    workload=i32,
    policy_to_use=i32,
    turbo_status=u8,
)
freq_replies = st.builds(
    P.FreqListReply,
    resource_id=u64,
    unit=u32,
    command=u32,
    vm_name=vm_names,
    freq_list_khz=_tuples(u32, 8),
    num_vcpu=u8,
)
caps_replies = st.builds(
    P.CapsListReply,
    resource_id=u64,
    unit=u32,
    command=u32,
    vm_name=vm_names,
    turbo=_tuples(u64, 8),
    priority=_tuples(u64, 8),
    num_vcpu=u8,
)


@HYPOTHESIS
@given(packets)
def test_packet_round_trip(packet: P.Packet) -> None:
    raw = P.encode_packet(packet)
    assert len(raw) == 464 and all(raw[i] == 0 for i in PADDING_BYTES)
    assert P.decode_packet(raw) == packet
    assert P.decode_packet(b"\xff" * 5 + raw, 5) == packet


@HYPOTHESIS
@given(freq_replies)
def test_freq_list_reply_round_trip(reply: P.FreqListReply) -> None:
    raw = reply.encode()
    assert len(raw) == 88 and raw[81:] == bytes(7)
    assert P.FreqListReply.decode(raw) == reply


@HYPOTHESIS
@given(caps_replies)
def test_caps_list_reply_round_trip(reply: P.CapsListReply) -> None:
    raw = reply.encode()
    assert len(raw) == 184 and raw[177:] == bytes(7)
    assert P.CapsListReply.decode(b"\x01" + raw, 1) == reply


@HYPOTHESIS
@given(st.binary(min_size=464, max_size=464), st.sampled_from([1, 2]), u32)
def test_echo_reply_is_encode_of_decode_with_the_new_command(
    raw: bytes, code: int, junk: int
) -> None:
    # Arbitrary bytes: garbage padding, vm_name garbage after a NUL, odd bools.
    name = raw[16:48]
    if b"\0" not in name:  # a 32-byte name: encode refuses it, echo copies it
        with pytest.raises(ProtocolError):
            P.encode_packet(P.decode_packet(raw))
        assert P.echo_reply(raw, 0, code)[16:48] == name
        return
    expected = P.encode_packet(dataclasses.replace(P.decode_packet(raw), command=code))
    assert P.echo_reply(raw, 0, code) == expected
    # ...also from the middle of a larger buffer and from a memoryview
    big = junk.to_bytes(4, "little") + raw + b"\x99" * 10
    assert P.echo_reply(big, 4, code) == expected
    assert P.echo_reply(memoryview(big), 4, code) == expected


@HYPOTHESIS
@given(packets)
def test_peek_routing_agrees_with_decode(packet: P.Packet) -> None:
    raw = P.encode_packet(packet)
    assert P.peek_header(raw) == (packet.resource_id, packet.unit, packet.command)
    assert P.peek_routing(raw) == (
        packet.resource_id,
        packet.unit,
        packet.command,
        packet.vm_name.encode("utf-8", "surrogateescape"),
        packet.core_type,
    )


# ---------------------------------------------------------------------------------------
# Refusals: clear ProtocolError, never a crash


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"vm_name": "x" * 32}, "vm_name"),
        ({"vm_name": "é" * 16}, "vm_name"),  # 32 bytes of UTF-8
        ({"vm_name": "a\0b"}, "vm_name"),
        ({"vm_name": 5}, "vm_name"),
        ({"num_vcpu": 256}, "num_vcpu"),
        ({"resource_id": -1}, "resource_id"),
        ({"unit": 2**32}, "unit"),
        ({"workload": 2**31}, "workload"),
        ({"core_type": "1"}, "core_type"),
        ({"vfid": (0,) * 9}, "vfid"),
        ({"busy_hours": (0,) * 25, "quiet_hours": (0,) * 23}, "busy_hours"),
        ({"hours_to_use_traffic_profile": (0,) * 23 + (2**40,)}, "hours_to_use_traffic_profile"),
    ],
)
def test_encode_packet_refuses_what_does_not_fit_naming_the_field(
    change: dict[str, object], key: str
) -> None:
    with pytest.raises(ProtocolError) as info:
        P.encode_packet(dataclasses.replace(P.Packet(), **change))  # type: ignore[arg-type]
    assert info.value.reason.startswith(key)


def test_a_31_byte_vm_name_is_the_longest_that_fits() -> None:
    raw = P.encode_packet(P.Packet(vm_name="n" * 31))
    assert raw[16:48] == b"n" * 31 + b"\0"


@pytest.mark.parametrize(
    "call",
    [
        lambda b: P.decode_packet(b),
        lambda b: P.decode_packet(b + bytes(464), -1),
        lambda b: P.peek_routing(b[:444]),
        lambda b: P.peek_header(b[:15]),
        lambda b: P.echo_reply(b, 0, 1),
        lambda b: P.nack_freq_list(b[:40]),
        lambda b: P.nack_reply(b[:10]),
        lambda b: P.FreqListReply.decode(b[:87]),
        lambda b: P.CapsListReply.decode(b[:183]),
    ],
)
def test_short_buffers_are_protocol_errors(call: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        call(bytes(463))
    assert "short" in info.value.reason


def test_echo_reply_refuses_a_code_that_is_no_u32() -> None:
    with pytest.raises(ProtocolError):
        P.echo_reply(bytes(464), 0, -1)


# ---------------------------------------------------------------------------------------
# Query replies


def test_freq_list_reply_echoes_the_request_and_pads_the_list() -> None:
    raw = P.encode_freq_list(3, 0, b"vm1", [2_400_000, 1_200_000], 2)
    assert len(raw) == 88
    assert P.FreqListReply.decode(raw) == P.FreqListReply(
        3, 0, P.ReplyCode.FREQ_LIST, "vm1", (2_400_000, 1_200_000, 0, 0, 0, 0, 0, 0), 2
    )
    assert P.encode_freq_list(3, 0, "vm1", [2_400_000, 1_200_000], 2) == raw


def test_caps_list_reply_carries_turbo_and_priority_per_vcpu() -> None:
    raw = P.encode_caps_list(0, 0, "vm1", [1, 0, 1], [0, 1, 0], 3)
    assert len(raw) == 184
    reply = P.CapsListReply.decode(raw)
    assert reply.command == P.ReplyCode.CAPS_LIST
    assert reply.turbo == (1, 0, 1, 0, 0, 0, 0, 0)
    assert reply.priority == (0, 1, 0, 0, 0, 0, 0, 0)
    assert reply.num_vcpu == 3


@pytest.mark.parametrize(
    ("call", "key"),
    [
        (lambda: P.encode_freq_list(0, 0, "vm1", [1] * 9, 8), "freqs_khz"),
        (lambda: P.encode_freq_list(0, 0, "vm1", [1], 9), "num_vcpu"),
        (lambda: P.encode_freq_list(0, 0, "vm1", [-1], 1), "freq_list_khz"),
        (lambda: P.encode_freq_list(0, 0, "v" * 40, [1], 1), "vm_name"),
        (lambda: P.encode_caps_list(0, 0, "vm1", [1], [1] * 9, 1), "priority"),
        (lambda: P.encode_caps_list(0, 0, "vm1", [1], [1], -1), "num_vcpu"),
        (lambda: P.encode_caps_list(-5, 0, "vm1", [1], [1], 1), "resource_id"),
        (lambda: P.FreqListReply(freq_list_khz=(0,) * 7).encode(), "freq_list_khz"),
        (lambda: P.FreqListReply(num_vcpu=300).encode(), "num_vcpu"),
        (lambda: P.CapsListReply(turbo=(0,) * 9, priority=(0,) * 7).encode(), "turbo"),
        (lambda: P.CapsListReply(vm_name="x" * 32).encode(), "vm_name"),
    ],
)
def test_reply_encoders_refuse_naming_the_field(call: Any, key: str) -> None:
    with pytest.raises(ProtocolError) as info:
        call()
    assert info.value.reason.startswith(key)


def test_refused_queries_get_a_nack_of_the_size_the_guest_reads() -> None:
    for what, size in [
        ("QUERY_FREQ_LIST", 88),
        ("QUERY_FREQ ", 88),
        ("QUERY_CAPS_LIST", 184),
        ("QUERY_CAPS ", 184),
    ]:
        request = _capture(what, lcore=3)
        nack = P.nack_reply(request)
        assert len(nack) == size, what
        cls = P.FreqListReply if size == 88 else P.CapsListReply
        reply = cls.decode(nack)
        assert reply.command == P.ReplyCode.NACK
        assert (reply.resource_id, reply.vm_name, reply.num_vcpu) == (
            P.decode_packet(request).resource_id,
            "vm1",
            0,
        )
        assert nack[48:] == bytes(size - 48)
    assert P.nack_freq_list(_capture("QUERY_FREQ ")) == P.nack_reply(_capture("QUERY_FREQ "))
    assert P.nack_caps_list(_capture("QUERY_CAPS ")) == P.nack_reply(_capture("QUERY_CAPS "))


def test_other_and_unknown_commands_get_a_464_byte_nack_echo() -> None:
    for what in ("rte_power_freq_max", "PKT_POLICY TIME", "PKT_POLICY_REMOVE"):
        request = _capture(what)
        assert P.nack_reply(request) == P.echo_reply(request, 0, P.ReplyCode.NACK)
    unknown = P.encode_packet(P.Packet(command=42, unit=3, vm_name="vm1"))
    nack = P.nack_reply(unknown)
    assert len(nack) == 464
    assert P.decode_packet(nack) == P.Packet(command=2, unit=3, vm_name="vm1")


def test_mac_helpers_refuse_malformed_macs() -> None:
    assert P.vfid_to_mac(P.mac_to_vfid("00:1B:21:aa:bb:cc")) == "00:1b:21:aa:bb:cc"
    for bad in ("00:1b:21:aa:bb", "00-1b-21-aa-bb-cc", "zz:1b:21:aa:bb:cc", 7):
        with pytest.raises(ProtocolError):
            P.mac_to_vfid(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# PacketStream


def _stream_of_packets(count: int) -> tuple[list[bytes], bytes]:
    items = [
        P.encode_packet(P.Packet(resource_id=i, unit=1 + i % 6, command=1, vm_name=f"vm{i}"))
        for i in range(count)
    ]
    return items, b"".join(items)


def test_packet_stream_one_byte_at_a_time() -> None:
    items, blob = _stream_of_packets(3)
    stream = P.PacketStream()
    out = b""
    for i in range(len(blob)):
        out += stream.feed(blob[i : i + 1])
        assert stream.pending == (i + 1) % 464
    assert P.split_packets(out) == items


@HYPOTHESIS
@given(st.integers(0, 12), st.lists(st.integers(0, 464 * 12), max_size=30), st.integers(0, 463))
def test_packet_stream_any_split_yields_the_whole_read(
    count: int, cuts: list[int], tail: int
) -> None:
    items, blob = _stream_of_packets(count)
    blob += b"\x07" * tail  # the start of a request still on its way
    whole = P.PacketStream()
    read = whole.feed(blob)
    assert P.split_packets(read) == items and whole.pending == tail
    assert type(read) is bytes
    points = sorted({0, len(blob), *(c for c in cuts if c <= len(blob))})
    chunked = P.PacketStream()
    out = b""
    for kind, (a, b) in enumerate(itertools.pairwise(points)):
        piece = blob[a:b]
        # sockets hand out bytes; recv_into gives bytearray/memoryview
        data: P.Buffer = (piece, bytearray(piece), memoryview(piece))[kind % 3]
        got = chunked.feed(data)
        assert type(got) is bytes and len(got) % 464 == 0
        out += got
    assert P.split_packets(out) == items and chunked.pending == tail
    assert all(type(p) is bytes for p in P.split_packets(out))


def test_packet_stream_many_packets_in_one_feed_after_a_partial() -> None:
    items, blob = _stream_of_packets(50)
    stream = P.PacketStream()
    assert stream.feed(blob[:100]) == b""
    assert P.split_packets(stream.feed(memoryview(blob)[100:])) == items
    assert stream.pending == 0
    assert stream.feed(b"") == b""


def test_a_read_of_whole_packets_is_handed_on_as_it_came() -> None:
    """The handler's fast path gets the read itself: no copy, no cut."""
    _, blob = _stream_of_packets(16)
    stream = P.PacketStream()
    assert stream.feed(blob) is blob


# ---------------------------------------------------------------------------------------
# JSON FIFO messages

SPEC_EXAMPLES = (
    b'{"instruction": {"command": "power", "unit": "SCALE_MAX"}}\n'
    b'{"policy": {"command": "create", "policy_type": "TIME", "busy_hours": [17,18,19],'
    b' "quiet_hours": [2,3,4]}}\n'
    b'{"policy": {"command": "create", "policy_type": "WORKLOAD", "workload": "HIGH"}}\n'
    b'{"policy": {"command": "destroy"}}'
)
SPEC_RESULTS = [
    P.FifoInstruction(P.Unit.SCALE_MAX),
    P.FifoPolicy("create", P.PolicyType.TIME, busy_hours=(17, 18, 19), quiet_hours=(2, 3, 4)),
    P.FifoPolicy("create", P.PolicyType.WORKLOAD, P.Workload.HIGH),
    P.FifoPolicy("destroy"),
]


def _norm(items: list[P.FifoMessage | ProtocolError]) -> list[object]:
    return [("error", i.reason) if isinstance(i, ProtocolError) else i for i in items]


def test_spec_examples_parse_each_exactly_once() -> None:
    stream = P.JsonStream()
    # The last object ends the data with no byte after it: the reference parses it twice.
    assert stream.feed(SPEC_EXAMPLES) == SPEC_RESULTS
    assert stream.feed(b"") == [] and stream.feed(b"\n\n") == []
    assert stream.pending == 0


def test_json_one_byte_at_a_time() -> None:
    stream = P.JsonStream()
    out: list[P.FifoMessage | ProtocolError] = []
    for i in range(len(SPEC_EXAMPLES)):
        out += stream.feed(SPEC_EXAMPLES[i : i + 1])
    assert out == SPEC_RESULTS


def test_braces_and_escaped_quotes_inside_strings_do_not_end_a_message() -> None:
    stream = P.JsonStream()
    tricky = (
        b'{"instruction": {"command": "power", "unit": "SCALE_UP", "x}\\"}{": 1}}'
        b'{"policy": {"command": "destroy", "mac_list": ["a\\\\"]}}'  # backslash, then '"'
        b'{"instruction": {"command": "power", "unit": "SCALE_DOWN"}}'
    )
    out = _norm(stream.feed(tricky))
    assert len(out) == 3
    assert out[0][0] == "error" and "'x}\"}{'" in out[0][1]  # type: ignore[index]
    assert out[1][0] == "error" and out[1][1].startswith("mac_list")  # type: ignore[index]
    assert out[2] == P.FifoInstruction(P.Unit.SCALE_DOWN)
    # A backslash at the end of one read escapes the first byte of the next.
    bytewise = P.JsonStream()
    assert _norm([m for i in range(len(tricky)) for m in bytewise.feed(tricky[i : i + 1])]) == out


def test_a_bad_value_rejects_that_message_alone() -> None:
    stream = P.JsonStream()
    out = stream.feed(
        b'{"instruction": {"command": "power", "unit": "SCALE_MIN"}}'
        b'{"policy": {"command": "create", "policy_type": "TIME", "busy_hours": [17, 25]}}'
        b'{"instruction": {"command": "power", "unit": "SCALE_MAX"}}'
    )
    assert _norm(out) == [
        P.FifoInstruction(P.Unit.SCALE_MIN),
        ("error", "busy_hours: 25 is not an hour 0-23"),
        P.FifoInstruction(P.Unit.SCALE_MAX),
    ]


@pytest.mark.parametrize(
    ("message", "start"),
    [
        ({"instruction": {"command": "power", "unit": "FAST"}}, "unit: 'FAST' is not one of"),
        ({"instruction": {"command": "power"}}, "unit: missing"),
        ({"instruction": {"unit": "SCALE_UP"}}, "command: missing"),
        ({"instruction": {"command": "create", "unit": "SCALE_UP"}}, "command: 'create'"),
        ({"instruction": {"command": "power", "unit": "SCALE_UP", "core": 3}}, "instruction:"),
        ({"instruction": "SCALE_UP"}, "instruction: must be an object"),
        ({"policy": {"command": "create", "policy_type": "TIME", "zz": 1, "aa": 2}}, "policy:"),
        ({"policy": {"command": "stop"}}, "command: 'stop'"),
        ({"policy": {"policy_type": "TIME"}}, "command: missing"),
        ({"policy": {"command": "create"}}, "policy_type: missing"),
        ({"policy": {"command": "create", "policy_type": "time"}}, "policy_type: 'time'"),
        ({"policy": {"command": "create", "policy_type": "WORKLOAD"}}, "workload: missing"),
        (
            {"policy": {"command": "create", "policy_type": "WORKLOAD", "workload": 0}},
            "workload: 0 is not one of",
        ),
        (
            {"policy": {"command": "create", "policy_type": "TIME", "busy_hours": 17}},
            "busy_hours: must be a list",
        ),
        (
            {"policy": {"command": "create", "policy_type": "TIME", "busy_hours": [True]}},
            "busy_hours: True is not an hour",
        ),
        (
            {"policy": {"command": "create", "policy_type": "TIME", "quiet_hours": [-1]}},
            "quiet_hours: -1 is not an hour 0-23",
        ),
        (
            {"policy": {"command": "create", "policy_type": "TIME", "quiet_hours": [2, 2]}},
            "quiet_hours: hour 2 given twice",
        ),
        (
            {
                "policy": {
                    "command": "create",
                    "policy_type": "TIME",
                    "busy_hours": [3],
                    "quiet_hours": [3],
                }
            },
            "quiet_hours: 3 is also a busy hour",
        ),
        (
            {"policy": {"command": "create", "policy_type": "TRAFFIC", "mac_list": ["x"]}},
            "mac_list: 'x' is not a MAC",
        ),
        (
            {"policy": {"command": "create", "policy_type": "TRAFFIC", "mac_list": "aa"}},
            "mac_list: must be a list",
        ),
        (
            {
                "policy": {
                    "command": "create",
                    "policy_type": "TRAFFIC",
                    "mac_list": [f"00:00:00:00:00:{i:02x}" for i in range(11)],
                }
            },
            "mac_list: 11 MACs",
        ),
        (
            {
                "policy": {
                    "command": "destroy",
                    "mac_list": ["00:00:00:00:00:0a", "00:00:00:00:00:0A"],
                }
            },
            "mac_list: '00:00:00:00:00:0A' given twice",
        ),
        (
            {"policy": {"command": "create", "policy_type": "TRAFFIC", "avg_packet_thresh": 1}},
            "max_packet_thresh: missing",
        ),
        (
            {
                "policy": {
                    "command": "create",
                    "policy_type": "TRAFFIC",
                    "avg_packet_thresh": 500,
                    "max_packet_thresh": 100,
                }
            },
            "avg_packet_thresh: 500 is above max_packet_thresh 100",
        ),
        (
            {"policy": {"command": "destroy", "max_packet_thresh": 2**32}},
            "max_packet_thresh: 4294967296 is not an integer",
        ),
        (
            {"policy": {"command": "destroy", "avg_packet_thresh": 1.5}},
            "avg_packet_thresh: 1.5 is not an integer",
        ),
        ({"command": "power", "unit": "SCALE_UP"}, "message: unknown keys 'command', 'unit'"),
        ({"instruction": {}, "policy": {}}, 'a message holds "instruction" or "policy"'),
        ({}, "empty message"),
    ],
)
def test_bad_messages_are_rejected_naming_the_key(message: dict[str, object], start: str) -> None:
    with pytest.raises(ProtocolError) as info:
        P.parse_json_message(message)
    assert info.value.reason.startswith(start), info.value.reason
    # the same through the stream
    out = P.JsonStream().feed(json.dumps(message).encode())
    assert len(out) == 1 and isinstance(out[0], ProtocolError)
    assert out[0].reason == info.value.reason


def test_parse_json_message_refuses_a_non_object() -> None:
    with pytest.raises(ProtocolError):
        P.parse_json_message([1, 2])  # type: ignore[arg-type]


def test_a_traffic_policy_keeps_its_values() -> None:
    message = {
        "policy": {
            "command": "create",
            "policy_type": "TRAFFIC",
            "mac_list": ["AA:BB:CC:00:11:22"],
            "avg_packet_thresh": 1_800_000,
            "max_packet_thresh": 2_000_000,
        }
    }
    assert P.parse_json_message(message) == P.FifoPolicy(
        "create",
        P.PolicyType.TRAFFIC,
        mac_list=("aa:bb:cc:00:11:22",),
        avg_packet_thresh=1_800_000,
        max_packet_thresh=2_000_000,
    )


@pytest.mark.parametrize(
    ("raw", "start"),
    [
        (
            b'{"instruction": {"command": "power", "unit": "SCALE_UP", "unit": "SCALE_MAX"}}',
            "unit: key given twice",
        ),
        (b'{"instruction": {"command": "power" "unit": "SCALE_UP"}}', "malformed JSON"),
        (b'{"instruction": {"command": "power", "unit": "SCALE_\xff"}}', "message is not UTF-8"),
        (
            b'{"policy": {"command": "destroy", "avg_packet_thresh": ' + b"9" * 5000 + b"}}",
            "malformed JSON",
        ),
        (b'{"a": ' + b"[" * 3000 + b"]" * 3000 + b"}", "malformed JSON"),
    ],
)
def test_undecodable_messages_are_errors_not_crashes(raw: bytes, start: str) -> None:
    stream = P.JsonStream()
    out = stream.feed(raw + b'{"instruction": {"command": "power", "unit": "SCALE_UP"}}')
    assert isinstance(out[0], ProtocolError) and out[0].reason.startswith(start), out[0]
    assert out[1:] == [P.FifoInstruction(P.Unit.SCALE_UP)]


def test_stray_bytes_are_reported_once_per_run_and_nul_separates_silently() -> None:
    stream = P.JsonStream()
    good = b'{"policy": {"command": "destroy"}}'
    out = _norm(stream.feed(b"junk ] " + good + b"\0\n\0" + good + b"}"))
    assert out == [
        ("error", "bytes outside a JSON object: skipped"),
        P.FifoPolicy("destroy"),
        P.FifoPolicy("destroy"),
        ("error", "bytes outside a JSON object: skipped"),
    ]
    assert stream.feed(b"more junk") == []  # the same run, already reported


def _instruction(unit: str = "SCALE_UP", pad: int = 0) -> bytes:
    return (
        b'{"instruction": {"command": "power", "unit": "'
        + unit.encode()
        + b'"}'
        + (b" " * pad)
        + b"}"
    )


def test_the_64_kib_limit_is_exact() -> None:
    base = len(_instruction("SCALE_MIN"))  # SCALE_MAX has the same length
    fits = _instruction("SCALE_MIN", 65536 - base)
    over = _instruction("SCALE_MAX", 65537 - base)
    assert (len(fits), len(over)) == (65536, 65537)
    stream = P.JsonStream()
    out = _norm(stream.feed(fits + over + _instruction("SCALE_DOWN")))
    assert out[0] == P.FifoInstruction(P.Unit.SCALE_MIN)
    assert out[1][0] == "error" and "dropped" in out[1][1]  # type: ignore[index]
    assert out[2:] == [P.FifoInstruction(P.Unit.SCALE_DOWN)]


def test_an_oversize_message_is_dropped_whole_and_the_stream_resyncs() -> None:
    stream = P.JsonStream(max_message_bytes=200)
    # Braces and quotes inside its strings after the cut must not start a message.
    big = (
        b'{"policy": {"command": "create", "mac_list": ["'
        + b"x" * 300
        + b'", "{\\"instruction\\": {}}"]}}'
    )
    out = stream.feed(big[:150])
    assert out == [] and stream.pending == 150
    out = _norm(stream.feed(big[150:] + b"\n" + _instruction()))
    assert out == [
        ("error", "message over 200 bytes without its closing '}': dropped"),
        P.FifoInstruction(P.Unit.SCALE_UP),
    ]
    assert stream.pending == 0


def test_a_lost_closing_brace_costs_at_most_two_limits_of_messages() -> None:
    stream = P.JsonStream(max_message_bytes=300)
    one = _instruction() + b"\n"
    out = stream.feed(b'{"instruction": {"command": "power"\n' + one * 40)
    messages = [i for i in out if not isinstance(i, ProtocolError)]
    errors = [i for i in out if isinstance(i, ProtocolError)]
    assert len(errors) == 1 and "dropped" in errors[0].reason
    lost = 40 - len(messages)
    assert 0 < lost * len(one) <= 2 * 300 + len(one)
    assert messages and all(m == P.FifoInstruction(P.Unit.SCALE_UP) for m in messages)
    assert stream.pending < 300


def test_reset_reports_a_message_cut_short() -> None:
    stream = P.JsonStream()
    assert stream.feed(b'{"policy": {"comm') == []
    error = stream.reset()
    assert isinstance(error, ProtocolError) and "cut short" in error.reason
    assert stream.reset() is None  # nothing pending any more
    # The rest of the cut message is stray bytes; the next message parses.
    out = _norm(stream.feed(b'and": "destroy"}}' + _instruction()))
    assert out == [
        ("error", "bytes outside a JSON object: skipped"),
        P.FifoInstruction(P.Unit.SCALE_UP),
    ]


# Pieces of FIFO traffic, good and bad, for the chunking equivalence.
JSON_PIECES = [
    _instruction("SCALE_UP"),
    _instruction("DISABLE_TURBO", 3),
    b'{"policy": {"command": "create", "policy_type": "TIME", "busy_hours": [1, 2]}}',
    b'{"policy": {"command": "destroy", "mac_list": ["a}{\\"b"]}}',
    b'{"policy": {"command": "create", "policy_type": "WORKLOAD", "workload": "LOW"}}',
    b'{"instruction": {"command": "power", "unit": "SCALE_\\u004dAX"}}',
    b'{"instruction": {"command": "power" "unit": 1}}',
    b'{"x": "\\\\"}',
    b'{"instruction": {"command": "power", "unit": "' + b"u" * 150 + b'"}}',  # oversize
    b"\n",
    b"  \t",
    b"\0",
    b"garbage",
    b"}",
]
GOOD_PIECES = {JSON_PIECES[i] for i in (0, 1, 2, 4, 5)}


@HYPOTHESIS
@given(
    st.lists(st.sampled_from(JSON_PIECES), max_size=14),
    st.lists(st.integers(0, 2000), max_size=20),
)
def test_json_stream_any_split_yields_the_whole_read(pieces: list[bytes], cuts: list[int]) -> None:
    blob = b"".join(pieces)
    whole = _norm(P.JsonStream(max_message_bytes=128).feed(blob))
    points = sorted({0, len(blob), *(c for c in cuts if c <= len(blob))})
    chunked = P.JsonStream(max_message_bytes=128)
    out: list[P.FifoMessage | ProtocolError] = []
    for a, b in itertools.pairwise(points):
        out += chunked.feed(blob[a:b])
    assert _norm(out) == whole
    bytewise = P.JsonStream(max_message_bytes=128)
    out = []
    for i in range(len(blob)):
        out += bytewise.feed(blob[i : i + 1])
    assert _norm(out) == whole
    # every good piece came out exactly once
    good = sum(1 for p in pieces if p in GOOD_PIECES)
    assert sum(1 for i in whole if not isinstance(i, tuple)) == good
