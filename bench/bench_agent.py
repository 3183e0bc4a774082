"""The host agent under guest load: vmpowerd against two C agents (issue #16, "Latency").

A load generator (bench/c/loadgen.c) plays QEMU: it binds the 64 channel sockets of 8
VMs x 8 channels, the agent under test connects to them, then the generator drives
DPDK-format CPU_POWER requests and reads the replies:

* latency: one channel, one request in flight: p50/p99/max round trip, send → reply,
  with the agent's CPU µs per request (and read/write syscalls and context switches
  per request where /proc tells them);
* throughput: 64 channels, 16 requests in flight on each: replies per second, with the
  agent's CPU seconds over the measured window and its memory (VmRSS, VmHWM).

The same load runs against these agents:

* ``vmpower``: ``vmpowerd``, a real subprocess (libvirt's test:/// driver, a simulated
  acpi-cpufreq tree on tmpfs, the restore journal);
* ``cagent``: bench/c/cagent.c, DPDK's per-request work one packet at a time (read 464
  bytes, one sysfs write, one 464-byte reply): the latency reference;
* ``pyagent``: bench/pyagent.py, the same work in plain Python: the Python floor. Against
  ``cagent`` it is the interpreter's share of vmpowerd's distance to C; vmpowerd against
  it is the share of vmpowerd's own work (its checks, journal, logs and counters);
* ``cagent_batch_each``: bench/c/cagent_batch.c --write-each, a C agent that batches
  reads and replies (one read of every whole packet waiting on a channel, one write of
  all a channel's replies) and makes DPDK's sysfs write per request (throughput only);
* ``cagent_batch``: the same, its writes also coalesced to one per CPU per turn, as
  vmpowerd coalesces them: the tightest limit.

A last case, ``busy_cpu``, runs the latency load against ``vmpower`` and ``cagent`` with
a busy process (``yes``) on the agent's CPU, as a housekeeping CPU shared with a busy
job: how long a request waits when the agent gives its CPU away. vmpowerd's yield
after each turn's replies (``sched_yield``) made 10 % of them wait a whole slice of
the busy process there (p90 3.9 ms); the figures say whether that is back.

The issue's targets (``TARGETS``), reported as measured, met or not: vmpowerd's p50 and
p99 ≤ 2.0x the per-packet agent's, its throughput ≥ 1.0x that of "a C agent that batches
reads and replies" (``cagent_batch_each``). The ratio to ``cagent_batch`` is reported
beside it, as the limit.

The machine is shared (2 CPUs). The generator and the agent under test run on fixed
CPUs (``taskset``: the generator on the first CPU this process may use, the agent on the
second); with fewer than 2 CPUs or no ``taskset`` they run unpinned and ``pinning``
says why. ``Load.rounds`` rounds interleave the agents (``AGENTS`` in order, then
again), so a burst of load from other processes hits them alike; each figure is
the MEDIAN over rounds, every round listed beside it with the load average. The C
programs are built here with gcc into bench/build/. Every process and temporary file
is gone when ``run()`` returns.
"""

from __future__ import annotations

import json
import math
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from vmpower.cpufreq.simulate import build_tree, snapshot

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
C_SOURCES = HERE / "c"
BUILD_DIR = HERE / "build"
PROGRAMS = ("loadgen", "cagent", "cagent_batch")
AGENTS = ("vmpower", "cagent", "pyagent", "cagent_batch", "cagent_batch_each")  # a round's order
PYAGENT = HERE / "pyagent.py"
MODES = ("latency", "throughput")
THROUGHPUT_ONLY = frozenset({"cagent_batch_each"})

VMS = 8
VCPUS_PER_VM = 8  # vCPU i of every VM is pinned to host CPU i: 8 VMs share each CPU
CHANNELS_PER_VM = 8  # channel i drives vCPU i
HOST_CPUS = 8  # what libvirt's test driver reports, whatever the node XML says
WINDOW = 16  # requests in flight per channel in the throughput run
BATCH_PACKETS = 64  # cagent_batch reads up to this many packets a channel per wake

# Issue #16: latency against the per-packet C agent, throughput against the batching one.
TARGETS = {
    "p50_ratio_to_cagent_max": 2.0,
    "p99_ratio_to_cagent_max": 2.0,
    "throughput_ratio_to_cagent_batch_each_min": 1.0,
}

AGENT_START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Load:
    """How hard and how long each run pushes (defaults keep a whole run near 2 minutes)."""

    latency_requests: int = 20_000
    latency_warmup: int = 2_000
    throughput_s: float = 3.0
    throughput_warmup_s: float = 1.0
    window: int = WINDOW
    rounds: int = 3


@dataclass(frozen=True)
class Pinning:
    """The command prefixes that put the generator and the agent on their CPUs."""

    loadgen: tuple[str, ...]
    agent: tuple[str, ...]
    loadgen_cpu: int | None
    agent_cpu: int | None
    note: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "pinned": self.loadgen_cpu is not None,
            "loadgen_cpu": self.loadgen_cpu,
            "agent_cpu": self.agent_cpu,
            "note": self.note,
        }


def plan_pinning() -> Pinning:
    """``taskset -c`` prefixes for the generator and the agent, or none and the reason."""
    cpus = sorted(os.sched_getaffinity(0))
    taskset = shutil.which("taskset")
    if len(cpus) < 2:
        note = f"unpinned: only CPU(s) {cpus} available to the bench; latency is shared"
        return Pinning((), (), None, None, note)
    if taskset is None:
        note = "unpinned: taskset (util-linux) not found"
        return Pinning((), (), None, None, note)
    gen_cpu, agent_cpu = cpus[0], cpus[1]
    return Pinning(
        (taskset, "-c", str(gen_cpu)),
        (taskset, "-c", str(agent_cpu)),
        gen_cpu,
        agent_cpu,
        f"taskset: loadgen on CPU {gen_cpu}, the agent under test on CPU {agent_cpu}"
        f" (of {len(cpus)} available)",
    )


@dataclass(frozen=True)
class Node:
    """One run's private world: channel sockets, simulated sysfs, vmpowerd's files."""

    root: Path
    channels_dir: Path
    sysfs_root: Path
    node_xml: Path
    config: Path
    state_dir: Path
    control_socket: Path
    channels: tuple[tuple[str, int, int], ...]  # (socket path, vCPU, host CPU)

    def loadgen_specs(self) -> list[str]:
        return [f"{path}:{vcpu}" for path, vcpu, _ in self.channels]

    def cagent_specs(self) -> list[str]:
        return [f"{path}:{cpu}" for path, _, cpu in self.channels]

    def table_khz(self) -> list[int]:
        text = (
            self.sysfs_root / "devices/system/cpu/cpu0/cpufreq/scaling_available_frequencies"
        ).read_text()
        return sorted((int(f) for f in text.split()), reverse=True)


# -- building ---------------------------------------------------------------------------


def build_programs(
    build_dir: Path = BUILD_DIR, names: tuple[str, ...] = PROGRAMS
) -> dict[str, Path]:
    """gcc -O2 each bench/c/<name>.c into ``build_dir`` when it or bench/c/common.h is newer."""
    build_dir.mkdir(parents=True, exist_ok=True)
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc not found: the agent bench builds its C load generator with it")
    # Every program includes common.h ("common.h": found next to the .c, no -I needed).
    common_mtime = (C_SOURCES / "common.h").stat().st_mtime
    built = {}
    for name in names:
        source = C_SOURCES / f"{name}.c"
        binary = build_dir / name
        source_mtime = max(source.stat().st_mtime, common_mtime)
        if not binary.exists() or binary.stat().st_mtime < source_mtime:
            partial = build_dir / f".{name}.{os.getpid()}"  # renamed when whole
            result = subprocess.run(
                [gcc, "-O2", "-Wall", "-Wextra", "-o", str(partial), str(source)],
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                partial.unlink(missing_ok=True)
                raise RuntimeError(f"gcc failed on {source}:\n{result.stderr}")
            os.replace(partial, binary)
        built[name] = binary
    return built


# -- the simulated node -------------------------------------------------------------------


def make_node(root: Path) -> Node:
    """Write a node XML (8 running VMs x 8 pinned vCPUs x 8 channels), sysfs and config."""
    channels_dir = root / "channels"
    channels_dir.mkdir(parents=True)
    sysfs_root = root / "sysfs"
    build_tree(sysfs_root, "acpi-cpufreq", HOST_CPUS, turbo=False)
    channels: list[tuple[str, int, int]] = []
    domains = []
    for vm in range(VMS):
        name = f"bench{vm}"
        pins = "".join(
            f"<vcpupin vcpu='{v}' cpuset='{v % HOST_CPUS}'/>" for v in range(VCPUS_PER_VM)
        )
        devices = []
        for index in range(CHANNELS_PER_VM):
            path = str(channels_dir / f"{name}.{index}")
            vcpu = index % VCPUS_PER_VM
            channels.append((path, vcpu, vcpu % HOST_CPUS))
            devices.append(
                f"<channel type='unix'><source mode='bind' path={quoteattr(path)}/>"
                f"<target type='virtio' name='virtio.serial.port.poweragent.{index}'/></channel>"
            )
        domains.append(
            f"""  <domain type='test'>
    <name>{escape(name)}</name>
    <uuid>6a1c5a0e-00b0-4c1e-9a5e-0000000000{vm:02d}</uuid>
    <memory unit='KiB'>1048576</memory>
    <vcpu placement='static'>{VCPUS_PER_VM}</vcpu>
    <cputune>{pins}</cputune>
    <os><type arch='x86_64'>hvm</type></os>
    <devices>{"".join(devices)}</devices>
  </domain>"""
        )
    node_xml = root / "node.xml"
    node_xml.write_text(
        "<node>\n  <cpu><mhz>2400</mhz><model>x86_64</model><active>8</active><nodes>1</nodes>"
        "<sockets>1</sockets><cores>8</cores><threads>1</threads></cpu>\n"
        "  <memory>16777216</memory>\n" + "\n".join(domains) + "\n</node>\n"
    )
    state_dir = root / "state"
    control_socket = root / "control.sock"
    config = root / "vmpowerd.toml"
    # A rate limit far above the load (the bench measures work, not refusals) and
    # log.level warning: at info every applied write is a log line.
    q = json.dumps  # a JSON string is a valid TOML basic string
    config.write_text(
        f"""[libvirt]
uri = {q(f"test://{node_xml}")}
[channels]
dir = {q(str(channels_dir))}
rate_per_s = 1e9
burst = 1000000
[cpufreq]
sysfs_root = {q(str(sysfs_root))}
[state]
dir = {q(str(state_dir))}
[control]
socket = {q(str(control_socket))}
[log]
level = "warning"
"""
    )
    return Node(
        root, channels_dir, sysfs_root, node_xml, config, state_dir, control_socket,
        tuple(channels),
    )  # fmt: skip


# -- processes ----------------------------------------------------------------------------


class LineReader:
    """Lines from a child's stdout pipe, each awaited with a timeout (no blocking forever)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def readline(self, timeout_s: float) -> str | None:
        """The next line without its newline; None at end of file; TimeoutError."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> int | None:
    """SIGTERM, then SIGKILL if it lingers past ``timeout_s``; the exit code (None if it
    had to be killed)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None
    return proc.returncode


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` (/proc/<pid>/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    fields = text.rsplit(")", 1)[1].split()  # comm may hold spaces and parentheses
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of ``pid`` in MiB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = round(int(rest.split()[0]) / 1024, 1)  # kB
    return {"rss_mib": values.get("VmRSS", 0.0), "hwm_mib": values.get("VmHWM", 0.0)}


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no output)"


def cpu_ns(pid: int) -> int | None:
    """CPU time of every thread of ``pid`` in ns (schedstat), None where /proc lacks it.

    Finer than ``cpu_seconds`` (clock ticks, 10 ms): a latency run's CPU per request is
    tens of µs over about a second.
    """
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total


def proc_counters(pid: int) -> dict[str, int]:
    """Context switches of every thread of ``pid``, and its read/write-family syscalls.

    ``syscr``/``syscw`` (/proc/<pid>/io) count read, write, pread, pwrite, readv and
    writev, not send/recv: a partial count. A counter /proc does not give is left out.
    """
    counters: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("syscr", "syscw"):
                    counters[key] = int(rest)
    except OSError:
        pass
    switches = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
                        switches += int(rest)
    except OSError:
        return counters  # a thread gone mid-walk: no half count
    counters["ctxt_switches"] = switches
    return counters


def _start_agent(
    kind: str, node: Node, programs: dict[str, Path], pinning: Pinning
) -> subprocess.Popen[bytes]:
    log_path = node.root / f"{kind}.log"
    if kind == "vmpower":
        argv = [sys.executable, "-m", "vmpower.daemon", "--config", str(node.config)]
    else:
        table = node.table_khz()
        program = (
            [sys.executable, str(PYAGENT)]
            if kind == "pyagent"
            else [str(programs[kind.removesuffix("_each")])]
        )
        batch = ["--max-batch", str(BATCH_PACKETS)] if kind.startswith("cagent_batch") else []
        if kind == "cagent_batch_each":
            batch.append("--write-each")
        argv = [
            *program,
            *batch,
            "--sysfs-root", str(node.sysfs_root),
            "--high-khz", str(table[0]),
            "--low-khz", str(table[1]),
            *node.cagent_specs(),
        ]  # fmt: skip
    with open(log_path, "ab") as log_file:
        # taskset execs the program: the child's pid is the agent's.
        return subprocess.Popen(
            [*pinning.agent, *argv], stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO
        )


def measure(
    kind: str,
    mode: str,
    programs: dict[str, Path],
    workdir: Path,
    load: Load,
    pinning: Pinning | None = None,
) -> dict:
    """One run in a fresh ``workdir``: the generator bound, the agent started, the load driven."""
    pinning = pinning or Pinning((), (), None, None, "unpinned")
    node = make_node(workdir)
    before = snapshot(node.sysfs_root)
    if mode == "latency":
        options = ["--requests", str(load.latency_requests), "--warmup", str(load.latency_warmup)]
        longest_s = load.latency_requests * 0.005 + 30  # 5 ms a request would be a hang
    else:
        options = [
            "--duration-s", str(load.throughput_s),
            "--warmup-s", str(load.throughput_warmup_s),
            "--window", str(load.window),
        ]  # fmt: skip
        longest_s = load.throughput_s + 30
    stderr_path = node.root / "loadgen.err"
    agent_log = node.root / f"{kind}.log"
    agent: subprocess.Popen[bytes] | None = None
    with open(stderr_path, "wb") as stderr_file:
        gen = subprocess.Popen(
            [
                *pinning.loadgen, str(programs["loadgen"]), mode,
                "--accept-timeout-s", str(AGENT_START_TIMEOUT_S),
                *options, *node.loadgen_specs(),
            ],
            stdout=subprocess.PIPE,
            stderr=stderr_file,
        )  # fmt: skip
    assert gen.stdout is not None
    lines = LineReader(gen.stdout.fileno())

    def expect(word: str | None, timeout_s: float) -> str:
        """The generator's next line (``word``, or any line for None), watching the agent."""
        deadline = time.monotonic() + timeout_s
        line: str | None = f"(nothing in {timeout_s:.0f} s)"
        while time.monotonic() < deadline:
            try:
                line = lines.readline(min(1.0, deadline - time.monotonic()))
            except TimeoutError:
                if agent is not None and agent.poll() is not None:
                    line = f"(nothing: {kind} exited with {agent.returncode})"
                    break
                continue
            break
        if line is None or line.startswith("(") or (word is not None and line != word):
            raise RuntimeError(
                f"{kind} {mode}: load generator said {line!r}, expected {word or 'figures'!r}"
                f"\nloadgen stderr:\n{_tail(stderr_path)}\n{kind} log:\n{_tail(agent_log)}"
            )
        return line

    try:
        expect("bound", 10)
        agent = _start_agent(kind, node, programs, pinning)
        expect("accepted", AGENT_START_TIMEOUT_S + 5)
        expect("measuring", 30)
        cpu_from, cpu_ns_from = cpu_seconds(agent.pid), cpu_ns(agent.pid)
        counters_from = proc_counters(agent.pid)
        ticks_from = host_cpu_ticks()
        figures = parse_figures(expect(None, longest_s))
        # Sampled before the generator closes the channels: the agent is still as loaded.
        cpu_to, cpu_ns_to = cpu_seconds(agent.pid), cpu_ns(agent.pid)
        counters_to = proc_counters(agent.pid)
        memory = memory_mib(agent.pid)
        gen.wait(10)
        code = stop_process(agent)
        if figures.get("nacks"):
            raise RuntimeError(f"{kind} {mode}: {figures['nacks']} requests refused (NACK)")
        served = figures["requests"] if mode == "latency" else figures["replies"]
        result: dict[str, Any] = {
            "figures": figures,
            "loadavg": _load_note(),
            "host_steal_percent": steal_percent(ticks_from, host_cpu_ticks()),
        }
        if cpu_ns_from is not None and cpu_ns_to is not None:
            used_s = (cpu_ns_to - cpu_ns_from) / 1e9
        else:
            used_s = cpu_to - cpu_from  # clock ticks: coarse
        result["cpu_s"] = round(used_s, 3)
        result["cpu_us_per_request"] = round(used_s / served * 1e6, 2)
        for key in ("ctxt_switches", "syscr", "syscw"):
            if key in counters_from and key in counters_to:
                result[f"{key}_per_request"] = round(
                    (counters_to[key] - counters_from[key]) / served, 3
                )
        if mode == "throughput":
            result.update(memory)
        if kind == "vmpower":
            result["exit_code"] = code
            result["restored"] = snapshot(node.sysfs_root) == before
        return result
    finally:
        if agent is not None:
            stop_process(agent)
        stop_process(gen)
        gen.stdout.close()


def parse_figures(line: str) -> dict[str, Any]:
    value = json.loads(line)
    if not isinstance(value, dict):
        raise RuntimeError(f"load generator printed {line!r}, not a JSON object")
    return value


# -- the bench ----------------------------------------------------------------------------


def host_cpu_ticks() -> list[int]:
    """This machine's CPU time by state since boot (/proc/stat's "cpu" line, in ticks)."""
    try:
        return [int(field) for field in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return []


def steal_percent(before: list[int], after: list[int]) -> float | None:
    """The share of this VM's CPU time its hypervisor gave to others between two
    ``host_cpu_ticks()`` (proc(5): steal, the 8th field): what a shared host takes from
    a run, so its timings can be read against it. None where the kernel does not say."""
    if len(before) < 8 or len(after) < 8:
        return None
    total = sum(after) - sum(before)
    return round((after[7] - before[7]) * 100 / total, 2) if total > 0 else 0.0


def percentile(ordered: list[float], fraction: float) -> float:
    """The nearest-rank percentile of sorted values: the smallest with at least
    ``fraction`` of them at or below it (the 99th of 100 for p99; ``int(0.99 * n)`` as an
    index gave the 100th, the maximum, so one outlier was the p99)."""
    rank = math.ceil(fraction * len(ordered))
    return ordered[min(len(ordered), max(rank, 1)) - 1]


def _load_note() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _median(values: list[float], digits: int = 1) -> float:
    return round(statistics.median(values), digits)


def summary(latency: list[dict[str, Any]], throughput: list[dict[str, Any]]) -> dict[str, Any]:
    """One agent's figures: each the median over its rounds (of each round's own figure)."""

    def lat_us(key: str) -> float | None:
        if not latency:
            return None  # a throughput-only agent
        return _median([r["figures"][key] / 1000 for r in latency])

    def med(runs: list[dict[str, Any]], key: str, digits: int = 2) -> float | None:
        values = [r[key] for r in runs if key in r]
        return _median(values, digits) if values else None

    return {
        "p50_us": lat_us("p50_ns"),
        "p99_us": lat_us("p99_ns"),
        "p999_us": lat_us("p999_ns"),
        "max_us": lat_us("max_ns"),
        "mean_us": lat_us("mean_ns"),
        "latency_cpu_us_per_request": med(latency, "cpu_us_per_request"),
        "latency_ctxt_switches_per_request": med(latency, "ctxt_switches_per_request", 3),
        "latency_syscr_per_request": med(latency, "syscr_per_request", 3),
        "latency_syscw_per_request": med(latency, "syscw_per_request", 3),
        "throughput_per_s": round(
            statistics.median(r["figures"]["requests_per_s"] for r in throughput)
        ),
        "cpu_us_per_request": med(throughput, "cpu_us_per_request"),
        "rss_mib": med(throughput, "rss_mib", 1),
        "hwm_mib": med(throughput, "hwm_mib", 1),
    }


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("inf")


def _cpu_excess(agent: dict[str, Any], reference: dict[str, Any]) -> float | None:
    """The agent's CPU µs per request at one in flight beyond the reference's."""
    mine, theirs = agent["latency_cpu_us_per_request"], reference["latency_cpu_us_per_request"]
    return round(mine - theirs, 2) if mine is not None and theirs is not None else None


def run(load: Load | None = None) -> dict[str, object]:
    load = load or Load()
    programs = build_programs()
    pinning = plan_pinning()
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # tmpfs: sysfs-like writes
    workdir = Path(tempfile.mkdtemp(prefix="vmpower-bench-", dir=base))
    loadavg_start = _load_note()
    # Rounds interleave the agents so that a burst of load from other processes on this
    # shared machine hits each alike; each figure is the median over rounds.
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    try:
        for round_no in range(load.rounds):
            for kind in AGENTS:
                for mode in MODES:
                    if mode == "latency" and kind in THROUGHPUT_ONLY:
                        continue
                    name = f"{kind}-{mode}-{round_no}"
                    result = measure(kind, mode, programs, workdir / name, load, pinning)
                    runs.setdefault((kind, mode), []).append(result)
        busy_cpu = _busy_cpu_case(programs, workdir, load, pinning)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    agents = {
        kind: summary(runs.get((kind, "latency"), []), runs[(kind, "throughput")])
        for kind in AGENTS
    }
    vm, per_packet, batch = agents["vmpower"], agents["cagent"], agents["cagent_batch"]
    batch_each, python = agents["cagent_batch_each"], agents["pyagent"]
    ratios = {
        "throughput_vmpower_to_cagent_batch_each": _ratio(
            vm["throughput_per_s"], batch_each["throughput_per_s"]
        ),
        "p50_vmpower_to_cagent": _ratio(vm["p50_us"], per_packet["p50_us"]),
        "p99_vmpower_to_cagent": _ratio(vm["p99_us"], per_packet["p99_us"]),
        "throughput_vmpower_to_cagent_batch": _ratio(
            vm["throughput_per_s"], batch["throughput_per_s"]
        ),
        "throughput_vmpower_to_cagent": _ratio(
            vm["throughput_per_s"], per_packet["throughput_per_s"]
        ),
        "p50_vmpower_to_cagent_batch": _ratio(vm["p50_us"], batch["p50_us"]),
        "p99_vmpower_to_cagent_batch": _ratio(vm["p99_us"], batch["p99_us"]),
        # The Python floor: the interpreter's share (pyagent / cagent) and vmpowerd's own
        # work's (vmpower / pyagent) of the distance to C.
        "p50_pyagent_to_cagent": _ratio(python["p50_us"], per_packet["p50_us"]),
        "p99_pyagent_to_cagent": _ratio(python["p99_us"], per_packet["p99_us"]),
        "p50_vmpower_to_pyagent": _ratio(vm["p50_us"], python["p50_us"]),
        "p99_vmpower_to_pyagent": _ratio(vm["p99_us"], python["p99_us"]),
    }

    def round_ratios(round_no: int) -> dict[str, float]:
        """The same ratios within one round (the spread of the medians above)."""

        def fig(kind: str, mode: str, key: str) -> float:
            return runs[(kind, mode)][round_no]["figures"][key]

        return {
            "p50_to_cagent": _ratio(
                fig("vmpower", "latency", "p50_ns"), fig("cagent", "latency", "p50_ns")
            ),
            "p99_to_cagent": _ratio(
                fig("vmpower", "latency", "p99_ns"), fig("cagent", "latency", "p99_ns")
            ),
            "throughput_to_cagent_batch_each": _ratio(
                fig("vmpower", "throughput", "requests_per_s"),
                fig("cagent_batch_each", "throughput", "requests_per_s"),
            ),
            "throughput_to_cagent_batch": _ratio(
                fig("vmpower", "throughput", "requests_per_s"),
                fig("cagent_batch", "throughput", "requests_per_s"),
            ),
        }

    return {
        "load": {
            "channels": VMS * CHANNELS_PER_VM,
            "window": load.window,
            "throughput_s": load.throughput_s,
            "latency_requests": load.latency_requests,
            "rounds": load.rounds,
            "cagent_batch_max_packets": BATCH_PACKETS,
            "loadavg_start": loadavg_start,
            "loadavg_end": _load_note(),
        },
        "pinning": pinning.as_dict(),
        "figures_are": f"medians over {load.rounds} interleaved rounds",
        **agents,
        "ratios": ratios,
        # What vmpowerd adds to one request's round trip over the per-packet C agent.
        "p50_excess_us_vs_cagent": round(vm["p50_us"] - per_packet["p50_us"], 1),
        "latency_cpu_excess_us_vs_cagent": _cpu_excess(vm, per_packet),
        # ... and over the same work in plain Python: vmpowerd's own work per request.
        "p50_excess_us_vs_pyagent": round(vm["p50_us"] - python["p50_us"], 1),
        "latency_cpu_excess_us_vs_pyagent": _cpu_excess(vm, python),
        "targets": TARGETS,
        "met": {
            "p50_ratio_to_cagent": ratios["p50_vmpower_to_cagent"]
            <= TARGETS["p50_ratio_to_cagent_max"],
            "p99_ratio_to_cagent": ratios["p99_vmpower_to_cagent"]
            <= TARGETS["p99_ratio_to_cagent_max"],
            "throughput_ratio_to_cagent_batch_each": ratios[
                "throughput_vmpower_to_cagent_batch_each"
            ]
            >= TARGETS["throughput_ratio_to_cagent_batch_each_min"],
        },
        "round_ratios": [round_ratios(n) for n in range(load.rounds)],
        "rounds": {
            f"{kind}_{mode}": [_round_row(r) for r in runs[(kind, mode)]]
            for kind in AGENTS
            for mode in MODES
            if (kind, mode) in runs
        },
        "busy_cpu": busy_cpu,
        "vmpower_restored_every_setting": all(
            r["restored"] and r["exit_code"] == 0 for mode in MODES for r in runs[("vmpower", mode)]
        ),
    }


def _busy_cpu_case(
    programs: dict[str, Path], workdir: Path, load: Load, pinning: Pinning
) -> dict[str, Any]:
    """The latency load with a busy process on the agent's CPU (vmpower, then cagent)."""
    if pinning.agent_cpu is None:
        return {"skipped": pinning.note}
    figures: dict[str, Any] = {}
    for kind in ("vmpower", "cagent"):
        busy = subprocess.Popen(
            [*pinning.agent, "sh", "-c", "exec yes > /dev/null"], stdin=subprocess.DEVNULL
        )
        try:
            result = measure(kind, "latency", programs, workdir / f"{kind}-busy", load, pinning)
        finally:
            stop_process(busy)
        row = _round_row(result)
        figures[kind] = {key: row[key] for key in ("p50_us", "p90_us", "p99_us", "max_us")}
    figures["p90_vmpower_to_cagent"] = _ratio(
        figures["vmpower"]["p90_us"], figures["cagent"]["p90_us"]
    )
    figures["busy_process"] = f"yes > /dev/null on CPU {pinning.agent_cpu}, the agent's"
    return figures


def _round_row(result: dict[str, Any]) -> dict[str, Any]:
    """One round's figures, compact: µs for latency, requests/s for throughput, CPU for both."""
    figures = result["figures"]
    if figures["mode"] == "latency":
        row: dict[str, Any] = {
            k[: -len("_ns")] + "_us": round(v / 1000, 1)
            for k, v in figures.items()
            if k.endswith("_ns")
        }
    else:
        row = {"per_s": round(figures["requests_per_s"])}
    row["cpu_us_per_request"] = result["cpu_us_per_request"]
    if "ctxt_switches_per_request" in result:
        row["ctxt_switches_per_request"] = result["ctxt_switches_per_request"]
    row["loadavg"] = result["loadavg"]
    return row
