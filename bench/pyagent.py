"""pyagent: bench/c/cagent.c's per-request work in plain Python, the Python floor.

The agent and guest benches run it beside vmpowerd and the C agent so that their
figures say how much of vmpowerd's distance to C is the interpreter's (this program
against ``cagent``) and how much is vmpowerd's own work per request and per turn (its
rate limit, map freshness, restore journal, all-or-nothing changes, logs, counters,
loop figures: vmpowerd against this program). Like ``cagent``: connect to each channel
socket as the client, wait in epoll, and per readable channel read towards one whole
464-byte packet; for a whole one, one sysfs write (``pwrite`` of the target kHz into
the CPU's ``scaling_setspeed``, kept open) and the 464-byte reply with command ACK.
SCALE_UP writes --high-khz, SCALE_DOWN --low-khz; anything else gets a NACK. No checks,
no batching: nothing vmpowerd must do beyond that is done.

Usage: python bench/pyagent.py --sysfs-root ROOT --high-khz F --low-khz F PATH:CPU...
It runs until killed (SIGTERM); a channel the peer closes is dropped.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import struct
import time

from vmpower.protocol import PACKET_SIZE, Command, ReplyCode, Unit

# The protocol's values as plain ints and bytes, looked up once (as cagent.c's #defines)
CPU_POWER = int(Command.CPU_POWER)
SCALE_UP, SCALE_DOWN = int(Unit.SCALE_UP), int(Unit.SCALE_DOWN)
ACK, NACK = struct.pack("<I", ReplyCode.ACK), struct.pack("<I", ReplyCode.NACK)
UNIT_AND_COMMAND = struct.Struct("<II")  # at offset 8: unit, then command
CONNECT_TRIES = 100  # 10 s: the socket is bound before the agent starts


def connect(path: str) -> socket.socket:
    for _ in range(CONNECT_TRIES):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            time.sleep(0.1)
    raise SystemExit(f"pyagent: cannot connect to {path}")


def drop(
    epoll: select.epoll, channels: dict[int, tuple[socket.socket, int, bytearray]], fd: int
) -> None:
    """Forget a channel whose peer hung up or went away."""
    epoll.unregister(fd)
    channels.pop(fd)[0].close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sysfs-root", required=True)
    parser.add_argument("--high-khz", type=int, required=True)
    parser.add_argument("--low-khz", type=int, required=True)
    parser.add_argument("channels", nargs="+", metavar="PATH:CPU")
    args = parser.parse_args()
    text_of = {SCALE_UP: str(args.high_khz).encode(), SCALE_DOWN: str(args.low_khz).encode()}
    setspeed: dict[int, int] = {}
    channels: dict[int, tuple[socket.socket, int, bytearray]] = {}
    epoll = select.epoll()
    for spec in args.channels:
        path, cpu_text = spec.rsplit(":", 1)
        cpu = int(cpu_text)
        if cpu not in setspeed:
            setspeed[cpu] = os.open(
                f"{args.sysfs_root}/devices/system/cpu/cpu{cpu}/cpufreq/scaling_setspeed",
                os.O_WRONLY,
            )
        sock = connect(path)
        channels[sock.fileno()] = (sock, setspeed[cpu], bytearray())
        epoll.register(sock.fileno(), select.EPOLLIN)
    while True:
        for fd, _ in epoll.poll():
            sock, setspeed_fd, pending = channels[fd]
            try:
                data = sock.recv(PACKET_SIZE - len(pending))
            except OSError:  # reset by the peer: dropped, as a hang-up
                data = b""
            if not data:
                drop(epoll, channels, fd)
                continue
            pending += data
            if len(pending) < PACKET_SIZE:
                continue
            packet = bytearray(pending)
            pending.clear()
            unit, command = UNIT_AND_COMMAND.unpack_from(packet, 8)
            text = text_of.get(unit) if command == CPU_POWER else None
            ok = text is not None and os.pwrite(setspeed_fd, text, 0) == len(text)
            packet[12:16] = ACK if ok else NACK
            try:
                sock.sendall(packet)
            except OSError:  # the peer went away: its channel is dropped
                drop(epoll, channels, fd)


if __name__ == "__main__":
    main()
