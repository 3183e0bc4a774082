"""The JSON messages host processes write into the FIFOs ``/tmp/powermonitor/fifo<N>``.

This module owns ``docs/protocol.md``'s "FIFO JSON messages": the message types
(:class:`FifoInstruction`, :class:`FifoPolicy`), their validation
(:func:`parse_json_message`) and :class:`JsonStream`, which cuts a FIFO's byte stream
into objects and parses each once. Enum names, hour and MAC rules come from
:mod:`vmpower.protocol.codec`, so the JSON and the binary packet agree.

Standard library only and no I/O. Every malformed message is reported as
:class:`vmpower.errors.ProtocolError`, whose ``reason`` names the key that was wrong.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Literal, TypeVar, Union

from vmpower.errors import ProtocolError
from vmpower.protocol.codec import (
    MAC_PATTERN,
    NUM_HOURS,
    NUM_VFID,
    SLOTS,
    Buffer,
    PolicyType,
    Unit,
    Workload,
)

if TYPE_CHECKING:  # typing.TypeGuard is 3.10+; the guest tool runs on python3 >= 3.9
    from typing import TypeGuard

MAX_JSON_MESSAGE_BYTES = 64 * 1024  # larger messages are dropped and the stream resyncs


@dataclass(frozen=True, **SLOTS)
class FifoInstruction:
    """``{"instruction": {"command": "power", "unit": "<UNIT>"}}`` for the FIFO's CPU."""

    unit: Unit


PolicyCommand = Literal["create", "destroy"]


@dataclass(frozen=True, **SLOTS)
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


FifoMessage = Union[FifoInstruction, FifoPolicy]  # noqa: UP007 (python 3.9: see codec.SLOTS)

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
        if not isinstance(mac, str) or not MAC_PATTERN.fullmatch(mac):
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
        # What each policy reads (docs/protocol.md, Policies): without it there is nothing to do.
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


# Built once: json.loads(text, object_pairs_hook=...) builds a decoder per call, which
# was most of the cost of a tiny message such as ``{}`` (issue #11 point 5).
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys)


def _parse_raw(raw: bytes) -> FifoMessage | ProtocolError:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return ProtocolError(f"message is not UTF-8 (bad byte at {exc.start})")
    try:
        obj = _DECODER.decode(text)
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
# The scanner skips with the regex engine's C loops, never one Python step per byte: a
# FIFO writer must not be able to slow the monitor thread down with cheap bytes (issue
# #11 point 5: 4.4 MB/s of '{' once cost guests 27 ms a round trip). Possessive
# quantifiers: nothing is ever backtracked, so each match is linear in what it consumes.
# A whole JSON string (RFC 8259 section 7: a backslash escapes the next byte).
_STRING = rb'"(?:[^"\\]++|\\.)*+"'


def _compile(pattern: bytes, flags: int = 0) -> re.Pattern[bytes]:
    """Possessive quantifiers are Python 3.11+. Before it (only the guest tool runs
    there, and it never scans a FIFO) the pattern without them matches the same."""
    if sys.version_info < (3, 11):  # noqa: UP036 (the guest tool: python >= 3.9)
        pattern = pattern.replace(b"++", b"+").replace(b"*+", b"*")
    return re.compile(pattern, flags)


# Inside an object, outside strings: everything before the next '}' that is not in a
# string ('{' included, whole strings skipped); it stops early at a string the window cuts.
_TO_CLOSE = _compile(rb'(?:[^}"]++|' + _STRING + rb")*+", re.DOTALL)
_STRINGS = _compile(_STRING, re.DOTALL)
# The rest of a string: up to its closing quote, a backslash the window cuts, or the end.
_STRING_REST = _compile(rb'(?:[^"\\]++|\\.)*+', re.DOTALL)
_CLOSE_RUN = _compile(rb"\}++")
_QUOTE = 0x22


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
        """Follow strings and nesting over buf[pos:limit]; (new pos, whether depth hit 0).

        Each Python step consumes a whole run: the bytes before the next '}' outside a
        string (their '{' counted at C speed), a run of '}', or the rest of a string. The
        worst case is one step per '}' (``{}{}{}...``), which costs less than the parse
        each ``{}`` at the top level gets anyway; the per-turn byte budget of the FIFO
        (``channels.FIFO_READ_BYTES``) bounds both.
        """
        depth = self._depth
        in_string = self._in_string
        if self._escape and pos < limit:
            pos += 1  # the byte after a backslash is never a quote that ends the string
            self._escape = False
        while pos < limit:
            if in_string:
                j = _STRING_REST.match(buf, pos, limit).end()  # type: ignore[union-attr]
                if j == limit:
                    pos = limit
                elif buf[j] == _QUOTE:
                    in_string = False
                    pos = j + 1
                else:  # a backslash as the window's last byte escapes the next one
                    self._escape = True
                    pos = limit
                continue
            j = _TO_CLOSE.match(buf, pos, limit).end()  # type: ignore[union-attr]
            if j > pos:
                opens = buf.count(b"{", pos, j)
                if opens and buf.find(b'"', pos, j) >= 0:  # minus the braces inside strings
                    opens = _STRINGS.sub(b"", buf[pos:j]).count(b"{")
                depth += opens
                pos = j
            if pos == limit:
                break
            if buf[pos] == _QUOTE:  # a string the window cuts: follow it in string state
                in_string = True
                pos += 1
                continue
            run = _CLOSE_RUN.match(buf, pos, limit).end() - pos  # type: ignore[union-attr]
            if run >= depth:
                self._depth, self._in_string = 0, False
                return pos + depth, True
            depth -= run
            pos += run
        self._depth, self._in_string = depth, in_string
        return pos, False
