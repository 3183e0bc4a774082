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

    def feed(self, data: Buffer) -> bytes:
        """Add ``data`` (any chunking) and return the requests it completes, in order, as
        one bytes of whole 464-byte requests (``b""`` for none).

        One object for a read's requests, not one each: the handler's fast path checks
        a whole read against the requests it knows without cutting it (issue #16); who
        needs them one by one cuts them with :func:`split_packets`.
        """
        size = PACKET_SIZE
        buf = self._buf
        n = len(data)
        if not buf and type(data) is bytes and n % size == 0:
            return data  # whole requests only, nothing held: the read as it came
        start = 0
        head = b""
        if buf:
            need = size - len(buf)
            if n < need:
                buf += data
                return b""
            buf += data[:need]
            head = bytes(buf)
            buf.clear()
            start = need
        stop = start + (n - start) // size * size
        body = bytes(memoryview(data)[start:stop]) if stop > start else b""
        if stop < n:
            buf += data[stop:]
        return head + body if head else body


def split_packets(data: bytes) -> list[bytes]:
    """The 464-byte requests in ``data`` (whole requests, as :meth:`PacketStream.feed`
    returns them), one bytes each."""
    size = PACKET_SIZE
    return [data[i : i + size] for i in range(0, len(data), size)]
