"""The e2e guest's agent: runs the test's commands inside the VM, on a control port.

It owns the guest end of the test's own virtio-serial port (named by ``CONTROL_PORT``),
separate from the power channels under test. Lines of JSON both ways:

* guest → host ``{"hello": <uptime_s>, "boot": <boot id>}`` every ``HELLO_PERIOD_S``
  until a request arrives (and again after the host end disconnects), so a host that
  connects at any time learns the guest is up and which boot it talks to;
* host → guest ``{"id": n, "argv": [...], "timeout_s": t}``: run a program, reply
  ``{"id": n, "rc": .., "stdout": .., "stderr": .., "elapsed_s": ..}``;
* host → guest ``{"id": n, "rtt": {"device": path, "count": N, "vcpu": v}}``: N
  CPU_POWER/SCALE_MAX round trips on a power channel (vmpower's own codec), reply
  ``{"id": n, "acks": .., "samples_s": [...]}``; with ``"units": ["SCALE_UP",
  "SCALE_DOWN"]`` in the spec the requests take those units in turn (an agent that
  ACKs only one-step moves, like the bench's C agent, ACKs every one).

Runs on the guest's python3 (Debian's python3.11-minimal); standard library and
vmpower's guest-side modules only.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from typing import Any

CONTROL_PORT = "/dev/virtio-ports/org.vmpower.e2e.control"
HELLO_PERIOD_S = 0.5


def uptime_s() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def write_all(fd: int, data: bytes) -> None:
    # virtio_console takes at most 32 KiB a write (port_fops_write): a long reply (many
    # round-trip samples) needs several.
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def run_argv(request: dict[str, Any]) -> dict[str, Any]:
    start = time.monotonic()
    try:
        done = subprocess.run(
            request["argv"],
            capture_output=True,
            timeout=float(request.get("timeout_s", 60)),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {
            "rc": -1,
            "stdout": "",
            "stderr": f"{type(exc).__name__}: {exc}",
            "elapsed_s": time.monotonic() - start,
        }
    return {
        "rc": done.returncode,
        "stdout": done.stdout.decode(errors="replace"),
        "stderr": done.stderr.decode(errors="replace"),
        "elapsed_s": time.monotonic() - start,
    }


def read_exact(fd: int, size: int, timeout_s: float) -> bytes:
    deadline = time.monotonic() + timeout_s
    buf = b""
    while len(buf) < size:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"{len(buf)} of {size} reply bytes after {timeout_s} s")
        chunk = os.read(fd, size - len(buf))
        if not chunk:
            raise ConnectionError("power channel closed")
        buf += chunk
    return buf


def round_trips(spec: dict[str, Any]) -> dict[str, Any]:
    from vmpower import protocol

    # Encoded before the clock starts: only the channel's round trip is timed.
    requests = [
        protocol.encode_packet(
            protocol.Packet(
                command=int(protocol.Command.CPU_POWER),
                unit=int(protocol.Unit[name]),
                resource_id=int(spec.get("vcpu", 0)),
            )
        )
        for name in spec.get("units", ["SCALE_MAX"])
    ]
    samples_s = []
    acks = 0
    fd = os.open(spec["device"], os.O_RDWR | os.O_CLOEXEC)
    try:
        for i in range(int(spec["count"])):
            request = requests[i % len(requests)]
            start = time.monotonic()
            os.write(fd, request)
            reply = read_exact(fd, protocol.PACKET_SIZE, 10.0)
            samples_s.append(time.monotonic() - start)
            acks += protocol.peek_header(reply)[2] == protocol.ReplyCode.ACK
    except (OSError, TimeoutError, ConnectionError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "samples_s": samples_s}
    finally:
        os.close(fd)
    return {"acks": acks, "samples_s": samples_s}


def console_line(request: object, reply: dict[str, Any]) -> str:
    if not isinstance(request, dict):
        return f"bad request: {reply.get('error')}"
    if "argv" in request:
        out = " | ".join(reply.get("stdout", "").strip().splitlines()[-3:])
        return f"$ {' '.join(map(str, request['argv']))} -> rc {reply.get('rc')}: {out}"
    if "rtt" in request:
        return f"round trips {request['rtt']}: acks {reply.get('acks')} {reply.get('error', '')}"
    return str(reply)


def handle(request: dict[str, Any]) -> dict[str, Any]:
    if "argv" in request:
        return run_argv(request)
    if "rtt" in request:
        return round_trips(request["rtt"])
    return {"error": f"unknown request {sorted(request)}"}


def main() -> int:
    sys.path.insert(0, "/opt/vmpower")
    fd = os.open(CONTROL_PORT, os.O_RDWR | os.O_CLOEXEC)
    me = boot_id()
    pending = b""
    next_hello = 0.0
    greeting = True
    while True:
        now = time.monotonic()
        if greeting and now >= next_hello:
            os.write(fd, (json.dumps({"hello": uptime_s(), "boot": me}) + "\n").encode())
            next_hello = now + HELLO_PERIOD_S
        wait_s = max(0.0, next_hello - now) if greeting else None
        if not select.select([fd], [], [], wait_s)[0]:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            # virtio_console reads 0 while no host is connected (port_fops_read); greet
            # again, the write blocks until a host connects (wait_port_writable).
            greeting = True
            pending = b""
            time.sleep(0.1)
            continue
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if not line.strip():
                continue
            greeting = False
            request: object = None
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise TypeError("a request is a JSON object")
                reply = handle(request)
                reply["id"] = request.get("id")
            except (ValueError, KeyError, TypeError) as exc:
                reply = {"id": None, "error": f"bad request: {exc}"}
            # stdout is the serial console: its log file records the guest's side.
            print(f"vmpower-e2e: {console_line(request, reply)}", flush=True)
            write_all(fd, (json.dumps(reply) + "\n").encode())


if __name__ == "__main__":
    sys.exit(main())
