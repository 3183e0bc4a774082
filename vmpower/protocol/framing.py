"""Framing of a guest channel's byte stream into whole 464-byte requests.

A channel (virtio-serial socket) is a byte stream: a read may end mid-request or
hold many. :class:`PacketStream` buffers the rest ("Host rules" 1 of
``docs/protocol.md``: a short read waits for the rest) and hands back each complete
request as bytes for :mod:`vmpower.protocol.codec` to read. Standard library only.
"""

from __future__ import annotations

from vmpower.protocol.codec import PACKET_SIZE, Buffer


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
        n = len(data)
        if n == size and not buf and type(data) is bytes:
            return [data]  # one whole request, the latency case's read
        packets: list[bytes] = []
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
