"""The guest-channel wire protocol (``docs/protocol.md``): codecs, framing, FIFO JSON.

It is the protocol of DPDK's librte_power guest channel, so an unmodified DPDK guest
can talk to vmpower. One module owns each part:

- :mod:`vmpower.protocol.codec`: the binary messages ("Wire format"): the command,
  reply, unit, policy, workload and core-type enums, the sizes and struct formats,
  :class:`Packet` with :func:`decode_packet` / :func:`encode_packet`, the query
  replies, the hot-path helpers (:func:`peek_header`, :func:`peek_routing`,
  :func:`echo_reply`), the reply size of each command (:data:`REPLY_SIZE`,
  :func:`reply_size`) and the refusals (``nack_*``, "Host rules" 2), and the MAC
  addresses in ``vfid``;
- :mod:`vmpower.protocol.framing`: :class:`PacketStream`, which cuts a channel's byte
  stream into whole requests ("Host rules" 1), and :func:`split_packets`;
- :mod:`vmpower.protocol.fifo`: the JSON messages of the host FIFOs ("FIFO JSON
  messages"): :class:`FifoInstruction`, :class:`FifoPolicy`,
  :func:`parse_json_message` and :class:`JsonStream`.

Every name is re-exported here, so callers write ``from vmpower import protocol`` or
``from vmpower.protocol import Packet`` without knowing which module owns it.

Standard library only and no I/O: the guest tool (``vmpower.guest``) imports this
package and :mod:`vmpower.errors` and nothing else of vmpower. Every malformed input
is reported as :class:`vmpower.errors.ProtocolError`.
"""

from __future__ import annotations

from vmpower.errors import ProtocolError
from vmpower.protocol.codec import (
    CAPS_LIST_FORMAT,
    CAPS_LIST_SIZE,
    FREQ_LIST_FORMAT,
    FREQ_LIST_SIZE,
    MAC_PATTERN,
    MAX_VCPU_PER_VM,
    MAX_VM_NAME_BYTES,
    NUM_HOURS,
    NUM_VFID,
    PACKET_FORMAT,
    PACKET_SIZE,
    REPLY_SIZE,
    UNIT_BY_OP,
    VM_NAME_SIZE,
    Buffer,
    CapsListReply,
    Command,
    CoreType,
    FreqListReply,
    Packet,
    PolicyType,
    ReplyCode,
    Unit,
    Workload,
    decode_packet,
    echo_reply,
    encode_caps_list,
    encode_freq_list,
    encode_packet,
    mac_to_vfid,
    nack_caps_list,
    nack_freq_list,
    nack_reply,
    peek_header,
    peek_routing,
    reply_size,
    vfid_to_mac,
)
from vmpower.protocol.fifo import (
    MAX_JSON_MESSAGE_BYTES,
    FifoInstruction,
    FifoMessage,
    FifoPolicy,
    JsonStream,
    PolicyCommand,
    parse_json_message,
)
from vmpower.protocol.framing import PacketStream, split_packets

__all__ = [
    "CAPS_LIST_FORMAT",
    "CAPS_LIST_SIZE",
    "FREQ_LIST_FORMAT",
    "FREQ_LIST_SIZE",
    "MAC_PATTERN",
    "MAX_JSON_MESSAGE_BYTES",
    "MAX_VCPU_PER_VM",
    "MAX_VM_NAME_BYTES",
    "NUM_HOURS",
    "NUM_VFID",
    "PACKET_FORMAT",
    "PACKET_SIZE",
    "REPLY_SIZE",
    "UNIT_BY_OP",
    "VM_NAME_SIZE",
    "Buffer",
    "CapsListReply",
    "Command",
    "CoreType",
    "FifoInstruction",
    "FifoMessage",
    "FifoPolicy",
    "FreqListReply",
    "JsonStream",
    "Packet",
    "PacketStream",
    "PolicyCommand",
    "PolicyType",
    "ProtocolError",
    "ReplyCode",
    "Unit",
    "Workload",
    "decode_packet",
    "echo_reply",
    "encode_caps_list",
    "encode_freq_list",
    "encode_packet",
    "mac_to_vfid",
    "nack_caps_list",
    "nack_freq_list",
    "nack_reply",
    "parse_json_message",
    "peek_header",
    "peek_routing",
    "reply_size",
    "split_packets",
    "vfid_to_mac",
]
