"""vmpowerd under hostile load (issue #11): one function per case, ``run()`` collects them.

Each case starts a real ``vmpowerd`` subprocess on its own private world (libvirt's
test:/// driver on a small node XML, a simulated acpi-cpufreq tree, its own state dir
and control socket), drives the attack, and reports what it cost. Every process and
temporary file is gone when a case returns.

* ``refusal_flood``: one guest sends requests that are all refused (a host CPU its
  VM is not pinned to, plus a spoofed VM name and an unknown unit) as fast as the daemon
  takes them, for ``FLOOD_S`` seconds; reported: requests sent per second and what the
  daemon's log grew by per second (issue #11 point 1: < 1 kB/s at 100 000 refused
  requests/s, with the default log level and summary interval).
* ``control_hog``: a control client writes ``list_vms`` lines as fast as the daemon
  takes them and never reads its replies, while the guest keeps one request in flight;
  reported: the guest's round trip p50/p99 idle against hogged (rounds alternate) and
  the daemon's RSS (issue #11 point 2: hogged p99 within 2x of idle, RSS bounded).
* ``fifo_brace_flood``: writer processes flood a JSON FIFO with ``{``, with quotes and
  deep nesting, with ``{}`` while the guest keeps one request in flight; reported: the
  guest's round trip p50/p99 idle against flooded, per pattern, and the bytes/s the
  daemon took from the FIFO (issue #11 point 5: no writer adds more than 1 ms a turn).
"""

from __future__ import annotations

import json
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench import libvirtd as libvirtd_helper
from bench.bench_agent import memory_mib, stop_process
from vmpower import control
from vmpower.cpufreq.simulate import build_tree
from vmpower.devtools import ChannelHost, make_request, wait_for
from vmpower.protocol import Command, CoreType, Unit

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
FLOOD_S = 12.0  # more than one default summary interval (10 s)
GUEST = "guest1"  # vCPUs 0 and 1 pinned to host CPUs 2 and 3


@dataclass(frozen=True)
class World:
    root: Path
    channel: Path
    config: Path
    control_socket: Path
    log: Path


def make_world(root: Path, log_settings: str = "") -> World:
    """One running VM with one power channel, a simulated tree, a config file."""
    channels_dir = root / "channels"
    channels_dir.mkdir(mode=0o755)
    sysfs_root = root / "sysfs"
    build_tree(sysfs_root, "acpi-cpufreq", 8, turbo=True)
    channel = channels_dir / f"{GUEST}.0"
    node_xml = root / "node.xml"
    node_xml.write_text(
        f"""<node>
  <cpu><mhz>2400</mhz><model>x86_64</model><active>8</active><nodes>1</nodes>
    <sockets>1</sockets><cores>8</cores><threads>1</threads></cpu>
  <memory>16777216</memory>
  <domain type='test'>
    <name>{GUEST}</name>
    <uuid>6a1c5a0e-00b0-4c1e-9a5e-00000000aa01</uuid>
    <memory unit='KiB'>1048576</memory>
    <vcpu placement='static'>2</vcpu>
    <cputune><vcpupin vcpu='0' cpuset='2'/><vcpupin vcpu='1' cpuset='3'/></cputune>
    <os><type arch='x86_64'>hvm</type></os>
    <devices><channel type='unix'><source mode='bind' path='{channel}'/>
      <target type='virtio' name='virtio.serial.port.poweragent.0'/></channel></devices>
  </domain>
</node>
"""
    )
    q = json.dumps  # a JSON string is a valid TOML basic string
    config = root / "vmpowerd.toml"
    control_socket = root / "control.sock"
    config.write_text(
        f"""[libvirt]
uri = {q(f"test://{node_xml}")}
[channels]
dir = {q(str(channels_dir))}
[cpufreq]
sysfs_root = {q(str(sysfs_root))}
[state]
dir = {q(str(root / "state"))}
[control]
socket = {q(str(control_socket))}
[log]
{log_settings}
"""
    )
    return World(root, channel, config, control_socket, root / "vmpowerd.log")


@contextmanager
def running_daemon(world: World) -> Iterator[subprocess.Popen[bytes]]:
    """vmpowerd on ``world``, stopped (SIGTERM, then SIGKILL) whatever happens."""
    with open(world.log, "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmpower.daemon", "--config", str(world.config)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        started = wait_for(
            lambda: world.control_socket.exists() or proc.poll() is not None, START_TIMEOUT_S
        )
        if not started or proc.poll() is not None:
            raise RuntimeError(f"vmpowerd did not start:\n{world.log.read_text()[-3000:]}")
        yield proc
    finally:
        stop_process(proc)


def _channel_counters(world: World) -> dict:
    return control.request(world.control_socket, "show_vm", vm=GUEST)["channels"][0]


# -- cases --------------------------------------------------------------------------------


def refusal_flood(flood_s: float = FLOOD_S) -> dict:
    """A guest sending refused requests as fast as it can: requests/s and log bytes/s."""
    not_pinned = make_request(Command.CPU_POWER, Unit.SCALE_MAX, 5, core_type=CoreType.PHYSICAL)
    spoofed = make_request(Command.CPU_POWER, Unit.SCALE_MAX, 0, vm_name="other")
    bad_unit = make_request(Command.CPU_POWER, 99, 0)
    per_chunk = 100
    chunk = not_pinned * (per_chunk - 2) + spoofed + bad_unit
    root = Path(tempfile.mkdtemp(prefix="vmpower-bench-hostile-"))
    try:
        # The production defaults: log.level info, log.summary_interval_s 10.
        world = make_world(root)
        with ChannelHost(world.channel) as qemu, running_daemon(world):
            qemu.accept(START_TIMEOUT_S)
            assert qemu.conn is not None
            conn = qemu.conn
            stop = threading.Event()
            received = [0]

            def drain() -> None:  # the guest reads its NACKs
                conn.settimeout(0.2)
                while not stop.is_set():
                    try:
                        received[0] += len(conn.recv(1 << 20))
                    except TimeoutError:
                        continue
                    except OSError:
                        return

            reader = threading.Thread(target=drain, daemon=True)
            reader.start()
            log_before = world.log.stat().st_size
            sent = 0
            started = time.monotonic()
            try:
                while time.monotonic() - started < flood_s:
                    conn.sendall(chunk)
                    sent += per_chunk
                sent_s = time.monotonic() - started
                handled = wait_for(lambda: _channel_counters(world)["requests"] == sent, 60)
                handled_s = time.monotonic() - started
                counters = _channel_counters(world)
            finally:
                stop.set()
                reader.join(5)
            log_bytes = world.log.stat().st_size - log_before
        return {
            "flood_s": round(sent_s, 2),
            "requests_sent": sent,
            "requests_per_s": round(sent / sent_s),
            "all_handled": handled,
            "handled_within_s": round(handled_s, 2),
            "nacks": counters["nacks"],
            "rate_limited": counters["rate_limited"],
            "log_bytes": log_bytes,
            "log_bytes_per_s": round(log_bytes / handled_s, 1),
            "target_log_bytes_per_s_max": 1000,
            "log_lines": sum(
                1
                for line in world.log.read_text(errors="replace").splitlines()
                if "refused" in line
            ),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


HOG_ROUNDS = 3
HOG_IDLE_S = 2.0  # per round: the victim alone, then ...
HOG_S = 3.0  # ... with a new hog connected; with start and stop, about 20 s in all
HOG_LINE = b'{"cmd": "list_vms"}\n'


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def control_hog(rounds: int = HOG_ROUNDS) -> dict:
    """A control client pipelining list_vms and never reading (issue #11 point 2): the
    guest's round trip (one request in flight) idle against hogged, and the daemon's RSS.
    Target: hogged p99 within 2x of idle; RSS bounded (a few MiB over its start)."""
    packets = [make_request(Command.CPU_POWER, u, 0) for u in (Unit.SCALE_MAX, Unit.SCALE_MIN)]
    root = Path(tempfile.mkdtemp(prefix="vmpower-bench-hostile-"))
    idle: list[float] = []
    hogged: list[float] = []
    taken = [0]  # bytes of requests the daemon took from the hogs
    try:
        world = make_world(root)
        with ChannelHost(world.channel) as qemu, running_daemon(world) as proc:
            qemu.accept(START_TIMEOUT_S)

            def victim(seconds: float) -> tuple[list[float], float]:
                """Round trips (µs) for ``seconds``; the peak RSS seen meanwhile."""
                times: list[float] = []
                peak = memory_mib(proc.pid)["rss_mib"]
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    t0 = time.perf_counter()
                    qemu.request(packets[len(times) % 2], timeout_s=60)
                    times.append((time.perf_counter() - t0) * 1e6)
                    if len(times) % 200 == 0:
                        peak = max(peak, memory_mib(proc.pid)["rss_mib"])
                return times, max(peak, memory_mib(proc.pid)["rss_mib"])

            def push(hog: socket.socket, stop: threading.Event) -> None:
                chunk = HOG_LINE * 4096
                while not stop.is_set():
                    if select.select([], [hog], [], 0.1)[1]:
                        try:
                            taken[0] += hog.send(chunk)
                        except BlockingIOError:
                            pass

            control.request(world.control_socket, "list_vms")
            victim(1.0)  # warm up
            start_rss = peak_rss = memory_mib(proc.pid)["rss_mib"]
            # Rounds alternate idle and hogged (a new hog each round, closed after it), so
            # the shared machine's load weighs on both alike.
            for _ in range(rounds):
                idle += victim(HOG_IDLE_S)[0]
                stop = threading.Event()
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hog:
                    hog.connect(str(world.control_socket))
                    hog.setblocking(False)
                    pusher = threading.Thread(target=push, args=(hog, stop), daemon=True)
                    pusher.start()
                    try:
                        times, peak = victim(HOG_S)
                    finally:
                        stop.set()
                        pusher.join(10)
                hogged += times
                peak_rss = max(peak_rss, peak)
            status = control.request(world.control_socket, "status")
        idle_p99, hog_p99 = _percentile(idle, 0.99), _percentile(hogged, 0.99)
        return {
            "rounds": rounds,
            "idle": {
                "requests": len(idle),
                "p50_us": round(_percentile(idle, 0.5)),
                "p99_us": round(idle_p99),
            },
            "hogged": {
                "requests": len(hogged),
                "p50_us": round(_percentile(hogged, 0.5)),
                "p99_us": round(hog_p99),
                "max_us": round(max(hogged)),
            },
            "p99_ratio": round(hog_p99 / idle_p99, 2) if idle_p99 else None,
            "target_p99_ratio_max": 2.0,
            "hog_requests_taken": taken[0] // len(HOG_LINE),
            "daemon_rss_mib": {"start": round(start_rss, 1), "peak": round(peak_rss, 1)},
            "daemon_served_status_after": bool(status.get("version")),
            "loadavg_1m": float(Path("/proc/loadavg").read_text().split()[0]),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


STALL_IDLE_S = 8.0  # the victim with libvirtd running, then ...
STALL_S = 25.0  # ... with libvirtd SIGSTOPped (issue #11 point 4 names 60 s; 25 s shows it)


def libvirtd_stopped(stall_s: float = STALL_S) -> dict:
    """libvirtd SIGSTOPped (issue #11 point 4): a guest's round trip (one request in flight)
    before against during the stall, and how fast ``status`` answers meanwhile. vmpowerd
    reaches libvirt's test driver through a private libvirtd (``test+unix://``), so every
    libvirt call is an RPC that hangs while libvirtd is stopped. Target: p99 unchanged,
    status < 1 s and saying libvirt is unresponsive."""
    if libvirtd_helper.binary() is None:
        return {"skipped": "libvirtd is not installed"}
    if libvirtd_helper.answers():
        return {"skipped": "a libvirtd this bench did not start is running: not SIGSTOPping it"}
    packets = [make_request(Command.CPU_POWER, u, 0) for u in (Unit.SCALE_MAX, Unit.SCALE_MIN)]
    root = Path(tempfile.mkdtemp(prefix="vmpower-bench-hostile-"))
    libvirtd: subprocess.Popen[bytes] | None = None
    stopped = False
    try:
        libvirtd = libvirtd_helper.start(root)
        world = make_world(root)
        world.config.write_text(world.config.read_text().replace('"test://', '"test+unix://'))
        with ChannelHost(world.channel) as qemu, running_daemon(world):
            qemu.accept(START_TIMEOUT_S)

            def victim(seconds: float) -> tuple[list[float], list[float], dict]:
                """Round trips (µs) for ``seconds``; status calls (ms) every 0.5 s."""
                times: list[float] = []
                status_ms: list[float] = []
                side: dict = {}
                end = next_status = time.monotonic()
                end += seconds
                while time.monotonic() < end:
                    t0 = time.perf_counter()
                    qemu.request(packets[len(times) % 2], timeout_s=120)
                    times.append((time.perf_counter() - t0) * 1e6)
                    if time.monotonic() >= next_status:
                        next_status += 0.5
                        t0 = time.perf_counter()
                        side = control.request(world.control_socket, "status", 120)["libvirt"]
                        status_ms.append((time.perf_counter() - t0) * 1e3)
                return times, status_ms, side

            victim(1.0)  # warm up
            idle, idle_status, _ = victim(STALL_IDLE_S)
            libvirtd.send_signal(signal.SIGSTOP)
            stopped = True
            stalled, stalled_status, side = victim(stall_s)
            libvirtd.send_signal(signal.SIGCONT)
            stopped = False
            t0 = time.monotonic()
            resumed = wait_for(
                lambda: control.request(world.control_socket, "status")["libvirt"]["responsive"],
                60,
            )
            resumed_s = time.monotonic() - t0
        idle_p99, stall_p99 = _percentile(idle, 0.99), _percentile(stalled, 0.99)
        return {
            "stall_s": stall_s,
            "idle": {
                "requests": len(idle),
                "p50_us": round(_percentile(idle, 0.5)),
                "p99_us": round(idle_p99),
                "status_max_ms": round(max(idle_status), 1),
            },
            "libvirtd_stopped": {
                "requests": len(stalled),
                "p50_us": round(_percentile(stalled, 0.5)),
                "p99_us": round(stall_p99),
                "max_us": round(max(stalled)),
                "status_calls": len(stalled_status),
                "status_max_ms": round(max(stalled_status), 1),
                "status_libvirt_at_end": {
                    k: side.get(k) for k in ("connected", "responsive", "stalled_s")
                },
            },
            "p99_ratio": round(stall_p99 / idle_p99, 2) if idle_p99 else None,
            "responsive_again": bool(resumed),
            "responsive_again_within_s": round(resumed_s, 2),
            "loadavg_1m": float(Path("/proc/loadavg").read_text().split()[0]),
        }
    finally:
        if libvirtd is not None:
            if stopped:
                libvirtd.send_signal(signal.SIGCONT)
            stop_process(libvirtd)
        shutil.rmtree(root, ignore_errors=True)


FIFO_ROUNDS = 2
FIFO_IDLE_S = 2.0  # per round: the victim alone, then ...
FIFO_FLOOD_S = 3.0  # ... with writers flooding fifo6; for each pattern below
# What the flooding writers write (each pattern a writer process of its own).
FIFO_FLOODS = {
    "open_braces": [b"{"],  # the case: 4.4 MB/s of '{' cost 27 ms a round trip
    "quotes_and_nesting": [b'{"' + b'"' * 1000, b'{"a":' * 100 + b"[" * 100],
    "empty_objects": [b"{}"],  # one rejected message every 2 bytes: the costliest bytes
}
# A writer: writes its pattern as fast as the FIFO takes it until killed (SIGTERM), then
# prints how many bytes went in.
FIFO_WRITER = """
import os, select, signal, sys
path, pattern = sys.argv[1], bytes.fromhex(sys.argv[2])
chunk = pattern * (65536 // len(pattern) + 1)
fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
written = 0
signal.signal(signal.SIGTERM, lambda *_: (print(written, flush=True), os._exit(0)))
while True:
    try:
        written += os.write(fd, chunk[written % len(pattern):][:65536])
    except BlockingIOError:
        select.select([], [fd], [], 0.05)
"""


def fifo_brace_flood(rounds: int = FIFO_ROUNDS) -> dict:
    """Local writers flooding a JSON FIFO (issue #11 point 5): a guest's round trip (one
    request in flight) idle against flooded, per flood pattern, and how many bytes/s the
    daemon took from the FIFO. Target: no FIFO writer adds more than 1 ms to a loop turn,
    so the flooded p50 stays within 1 ms of idle."""
    packets = [make_request(Command.CPU_POWER, u, 0) for u in (Unit.SCALE_MAX, Unit.SCALE_MIN)]
    root = Path(tempfile.mkdtemp(prefix="vmpower-bench-hostile-"))
    idle: list[float] = []
    flooded: dict[str, list[float]] = {name: [] for name in FIFO_FLOODS}
    taken: dict[str, int] = dict.fromkeys(FIFO_FLOODS, 0)
    try:
        world = make_world(root)
        text = world.config.read_text().replace("[channels]\n", '[channels]\nfifo_cpus = "6"\n')
        world.config.write_text(text)
        fifo = world.channel.parent / "fifo6"
        with ChannelHost(world.channel) as qemu, running_daemon(world):
            qemu.accept(START_TIMEOUT_S)

            def victim(seconds: float) -> list[float]:
                times: list[float] = []
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    t0 = time.perf_counter()
                    qemu.request(packets[len(times) % 2], timeout_s=60)
                    times.append((time.perf_counter() - t0) * 1e6)
                return times

            victim(1.0)  # warm up
            for _ in range(rounds):
                for name, patterns in FIFO_FLOODS.items():
                    idle += victim(FIFO_IDLE_S)
                    writers = [
                        subprocess.Popen(
                            [sys.executable, "-c", FIFO_WRITER, str(fifo), p.hex()],
                            stdout=subprocess.PIPE,
                        )
                        for p in patterns
                    ]
                    try:
                        time.sleep(0.2)  # the FIFO is full
                        flooded[name] += victim(FIFO_FLOOD_S)
                    finally:
                        for writer in writers:
                            writer.terminate()
                        for writer in writers:
                            out = writer.communicate(timeout=STOP_TIMEOUT_S)[0]
                            taken[name] += int(out or 0)
                    # Whatever object the flood left open is abandoned after two limits.
                    with open(fifo, "wb") as f:
                        f.write(b" " * (2 * 64 * 1024))
        idle_p50 = _percentile(idle, 0.5)
        result: dict = {
            "rounds": rounds,
            "idle": {
                "requests": len(idle),
                "p50_us": round(idle_p50),
                "p99_us": round(_percentile(idle, 0.99)),
            },
        }
        for name, times in flooded.items():
            p50 = _percentile(times, 0.5)
            result[name] = {
                "requests": len(times),
                "p50_us": round(p50),
                "p99_us": round(_percentile(times, 0.99)),
                "max_us": round(max(times)),
                "p50_added_us": round(p50 - idle_p50),
                "fifo_bytes_per_s": round(taken[name] / (rounds * (FIFO_FLOOD_S + 0.2))),
            }
        result["target_p50_added_us_max"] = 1000
        result["loadavg_1m"] = float(Path("/proc/loadavg").read_text().split()[0])
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run() -> dict:
    return {
        "refusal_flood": refusal_flood(),
        "control_hog": control_hog(),
        "libvirtd_stopped": libvirtd_stopped(),
        "fifo_brace_flood": fifo_brace_flood(),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
