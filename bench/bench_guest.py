"""What guests feel (issue #16): the in-guest round trip with vmpowerd and with the C agent.

The e2e set-up of tests/e2e/ (tests/e2e/e2e_env.py) runs here on its real parts: the
host's libvirtd, a QEMU TCG guest booted from the cached kernel and initramfs, one
virtio-serial power channel per vCPU (QEMU binds the sockets). Inside the guest, the
e2e guest agent (tests/e2e/guest_agent.py) times CPU_POWER round trips on vCPU 0's
port with CLOCK_MONOTONIC, from the write of the 464-byte request to the last byte of
the reply, alternating SCALE_UP and SCALE_DOWN: both agents ACK these, and each one
moves the host CPU's frequency (a real sysfs write per request in both).

The same guest's channels are served, one agent at a time, by:

* vmpowerd (``python -m vmpower.daemon``, ``log.level = "warning"`` as in the agent
  bench, a simulated acpi-cpufreq tree), and
* bench/c/cagent.c, DPDK's per-packet work (read 464 bytes, one pwrite, one reply), and
* bench/pyagent.py, the same work in plain Python: the Python floor (how much of
  vmpowerd's distance to C is the interpreter's, and how much its own work's).

Rounds interleave them (vmpowerd, C, Python, then the other way round, ...); an agent
is stopped, its process gone, before the next starts, and QEMU's channel socket then
accepts the new client (checked every round: the warm-up must be ACKed, and the agent
must show it served it: vmpowerd's request count, the reference agent's sysfs write).
Figures per agent are the medians over its rounds of each round's p50, p99 and max,
with every round listed and the load average; the ratios vmpowerd / C face the issue's
targets (p50 ≤ 1.1x, p99 ≤ 1.5x), reported as measured, the floor's ratios beside them.
Every agent runs on the same fixed host CPU (taskset), the last one, away from vCPU 0's.

The DPDK client (tests/e2e/dpdk_client.c) is not used: its ``rtt:N`` step sends
SCALE_MAX, which the C agent NACKs, and librte_power's CPU_POWER_CONNECT probe gets a
NACK from the C agent but no reply from vmpowerd, so its replies would run one behind.

The bench holds the e2e lock (no e2e test runs meanwhile); a part that cannot be set
up raises ``RuntimeError`` saying which. libvirtd (when started here), QEMU, both agents
and the temporary directory are gone when ``run()`` returns.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from bench.bench_agent import build_programs, percentile, stop_process
from vmpower import protocol
from vmpower.cpufreq.simulate import build_tree

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TESTS = REPO / "tests"

VM_NAME = "vmpower-bench-guest"
LOCK_WAIT_S = 300.0
UNITS = ("SCALE_UP", "SCALE_DOWN")
TARGETS = {"p50_ratio_max": 1.1, "p99_ratio_max": 1.5}
AGENTS = ("vmpowerd", "c_agent", "py_agent")
PYAGENT = HERE / "pyagent.py"


@dataclass(frozen=True)
class Load:
    """Sizes of one run (defaults: about 30 s on top of the guest's boot, ~15 s)."""

    requests: int = 3000  # timed round trips per round and agent
    warmup: int = 200  # untimed, after each switch: first contact, caches, the handover
    rounds: int = 5  # per agent
    vcpu: int = 0  # the guest vCPU whose port is timed


def _e2e() -> ModuleType:
    """tests/e2e/e2e_env.py (it imports tests/agent_support.py: tests/ goes on the path)."""
    if str(TESTS) not in sys.path:
        sys.path.append(str(TESTS))  # appended: nothing in tests/ shadows an installed module
    from e2e import e2e_env

    return e2e_env


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _summary_us(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    return {
        "p50_us": round(percentile(ordered, 0.50) * 1e6, 1),
        "p99_us": round(percentile(ordered, 0.99) * 1e6, 1),
        "max_us": round(ordered[-1] * 1e6, 1),
        "mean_us": round(statistics.fmean(ordered) * 1e6, 1),
    }


class RefAgent:
    """A reference agent (bench/build/cagent, bench/pyagent.py: the same command line) on
    the guest's channel sockets (``PATH:CPU``), with its own sysfs tree."""

    def __init__(
        self,
        label: str,
        command: list[str],
        work_dir: Path,
        channels: list[tuple[Path, int]],
        host_cpus: tuple[int, ...],
    ) -> None:
        self.label = label
        self.command = command
        self.sysfs_root = work_dir / "sysfs"
        build_tree(self.sysfs_root, "acpi-cpufreq", 8, turbo=True)
        # Two adjacent entries below the boost one: the one-step move DPDK makes.
        table = self.table_khz()
        self.high_khz, self.low_khz = table[1], table[2]
        self.channels = channels
        self.host_cpus = host_cpus
        self.log_path = work_dir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def table_khz(self) -> list[int]:
        path = self.sysfs_root / "devices/system/cpu/cpu0/cpufreq/scaling_available_frequencies"
        return sorted((int(f) for f in path.read_text().split()), reverse=True)

    def setspeed_path(self, cpu: int) -> Path:
        return self.sysfs_root / f"devices/system/cpu/cpu{cpu}/cpufreq/scaling_setspeed"

    def start(self) -> None:
        argv = [
            "taskset", "-c", ",".join(map(str, self.host_cpus)),
            *self.command,
            "--sysfs-root", str(self.sysfs_root),
            "--high-khz", str(self.high_khz),
            "--low-khz", str(self.low_khz),
            *(f"{path}:{cpu}" for path, cpu in self.channels),
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM (it has no handler: it ends at once), SIGKILL if it lingers; reaped."""
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc)


class Session:
    """One guest and the agents that take turns on its channels."""

    def __init__(self, env: ModuleType, run_dir: Path, load: Load, agent_cpus: tuple[int, ...]):
        self.env = env
        self.run_dir = run_dir
        self.load = load
        self.agent_cpus = agent_cpus
        self.vm: Any = None
        self.vmpowerd: Any = None
        self.refs: dict[str, RefAgent] = {}
        self.switches = 0

    # -- set-up and clean-up ------------------------------------------------------------

    def boot(self, cache: Any) -> float:
        env = self.env
        initrd = env.build_initrd(cache, self.run_dir)
        self.vm = env.GuestVm(VM_NAME, self.run_dir, cache.kernel(), initrd)
        self.vm.define()
        return float(self.vm.start())

    def prepare_agents(self, cagent_binary: Path) -> None:
        vm = self.vm
        work = self.run_dir / "vmpowerd"
        work.mkdir()
        self.vmpowerd = self.env.E2eAgent(
            work,
            self.env.QEMU_URI,
            vm.channels_dir,
            log_level="warning",
            host_cpus=self.agent_cpus,
        )
        # vCPU i is pinned to host CPU i (GuestVm's pins): channel i drives CPU i.
        channels = [(vm.channel_socket(v), vm.pins[v]) for v in range(vm.vcpus)]
        commands = {
            "c_agent": ("the C agent", [str(cagent_binary)]),
            "py_agent": ("the Python agent", [sys.executable, str(PYAGENT)]),
        }
        for name, (label, command) in commands.items():
            ref_work = self.run_dir / name
            ref_work.mkdir()
            self.refs[name] = RefAgent(label, command, ref_work, channels, self.agent_cpus)

    def close(self) -> list[str]:
        """Everything started here, stopped; what could not be, as messages."""
        problems = []
        for ref in self.refs.values():
            ref.stop()
        if self.vmpowerd is not None:
            self.vmpowerd.close()
        if self.vm is not None:
            qemu_pid = self.vm.qemu_pid()
            self.vm.undefine()
            if qemu_pid is not None:
                with contextlib.suppress(TimeoutError):
                    self.env.wait_until(
                        lambda: not Path(f"/proc/{qemu_pid}").exists(), 20, "QEMU exiting"
                    )
                if Path(f"/proc/{qemu_pid}").exists():
                    problems.append(f"QEMU (pid {qemu_pid}) still runs after undefine")
        return problems

    # -- one round ------------------------------------------------------------------------

    def _start(self, agent: str) -> dict[str, Any]:
        """Start ``agent`` on the channels and prove it serves them; the handover's facts."""
        vm, load = self.vm, self.load
        started = time.monotonic()
        if agent == "vmpowerd":
            self.vmpowerd.start()
            self.vmpowerd.wait_connected(vm.name, vm.vcpus)
            served_from = self.vmpowerd.control("status")["requests"]
        else:
            ref = self.refs[agent]
            mark = ref.setspeed_path(vm.pins[load.vcpu])
            mark.write_text("0\n")  # the agent's first write replaces it
            ref.start()
        try:
            vm.control.round_trips(load.vcpu, load.warmup, timeout_s=120, units=UNITS)
        except self.env.SetupError as exc:
            log = self.vmpowerd.log() if agent == "vmpowerd" else self.refs[agent].log()
            raise self.env.SetupError(f"{agent} did not serve the guest: {exc}\n{log}") from None
        first_s = time.monotonic() - started
        if agent == "vmpowerd":
            served = self.vmpowerd.control("status")["requests"] - served_from
            proof = f"vmpowerd counted {served} requests"
            ok = served >= load.warmup
        else:
            written = mark.read_text().strip()
            proof = f"{ref.label} wrote {written} kHz"
            ok = written in (str(ref.high_khz), str(ref.low_khz))
        if not ok:
            raise self.env.SetupError(f"the warm-up was ACKed, but not by {agent}: {proof}")
        return {"ready_s": round(first_s, 3), "proof": proof}

    def _stop(self, agent: str) -> None:
        if agent == "vmpowerd":
            code = self.vmpowerd.stop()
            if code != 0:
                raise self.env.SetupError(f"vmpowerd exited {code}:\n{self.vmpowerd.log()[-3000:]}")
        else:
            self.refs[agent].stop()
        self.switches += 1

    def round(self, agent: str, index: int) -> dict[str, Any]:
        load = self.load
        row: dict[str, Any] = {"round": index, "loadavg": _loadavg()}
        row.update(self._start(agent))
        try:
            samples_s = self.vm.control.round_trips(
                load.vcpu, load.requests, timeout_s=max(120.0, load.requests * 0.05), units=UNITS
            )
        finally:
            self._stop(agent)
        row.update(_summary_us(samples_s))
        return row


def _aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        key: round(statistics.median(r[key] for r in rows), 1)
        for key in ("p50_us", "p99_us", "max_us")
    }
    out["worst_max_us"] = max(r["max_us"] for r in rows)
    out["rounds"] = rows
    return out


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b > 0 else None


def _measure(env: ModuleType, load: Load, agent_cpus: tuple[int, ...]) -> dict[str, Any]:
    cache = env.Cache()
    cache.base_initramfs()
    cagent_binary = build_programs(names=("cagent",))["cagent"]
    libvirtd = env.Libvirtd(env.CACHE)
    libvirtd.start()
    # Under /tmp: AF_UNIX socket paths hold 107 bytes at most.
    run_dir = Path(tempfile.mkdtemp(prefix="vmpower-bench-guest-"))
    session = Session(env, run_dir, load, agent_cpus)
    problems: list[str] = []
    try:
        boot_s = session.boot(cache)
        session.prepare_agents(cagent_binary)
        vcpu_cpu = session.vm.pins[load.vcpu]
        rows: dict[str, list[dict[str, Any]]] = {name: [] for name in AGENTS}
        loadavg_start = _loadavg()
        started = time.monotonic()
        for index in range(load.rounds):
            # vmpowerd, C, Python in even rounds, the other way round in odd ones: a drift
            # in the machine's load over the run weighs on every agent alike.
            order = AGENTS if index % 2 == 0 else AGENTS[::-1]
            for agent in order:
                rows[agent].append(session.round(agent, index))
        measured_s = time.monotonic() - started
    except Exception:
        if session.vm is not None:
            print("--- guest console, last lines ---", file=sys.stderr)
            print("\n".join(session.vm.console().splitlines()[-30:]), file=sys.stderr)
        raise
    finally:
        try:
            problems = session.close()
        finally:
            libvirtd.stop()
            shutil.rmtree(run_dir, ignore_errors=True)
    if problems:
        raise RuntimeError("; ".join(problems))

    figures: dict[str, Any] = {name: _aggregate(rows[name]) for name in AGENTS}
    v, c, py = figures["vmpowerd"], figures["c_agent"], figures["py_agent"]

    def ratios_of(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
        return {key: _ratio(a[f"{key}_us"], b[f"{key}_us"]) for key in ("p50", "p99", "max")}

    ratios = ratios_of(v, c)
    # Each round's two runs are back to back under about the same load: their ratio is
    # less moved by the load's drift than the ratio of the medians (informative).
    per_round = {}
    for key in ("p50", "p99"):
        pairs = zip(v["rounds"], c["rounds"], strict=True)
        each = [round(a[f"{key}_us"] / b[f"{key}_us"], 3) for a, b in pairs]
        per_round[key] = {"median": statistics.median(each), "rounds": each}
    return {
        "client": "tests/e2e/guest_agent.py round_trips (the guest's Python, CLOCK_MONOTONIC)",
        "units": list(UNITS),
        "guest": {"vcpus": session.vm.vcpus, "timed_vcpu": load.vcpu, "vcpu_host_cpu": vcpu_cpu},
        "agent_host_cpus": list(agent_cpus),
        "requests_per_round": load.requests,
        "warmup_per_round": load.warmup,
        "rounds_per_agent": load.rounds,
        "guest_boot_s": round(boot_s, 2),
        "measured_s": round(measured_s, 1),
        "agent_switches": session.switches,
        "loadavg_start": loadavg_start,
        "loadavg_end": _loadavg(),
        **figures,
        "ratios_vmpowerd_to_c": ratios,
        # The Python floor: the interpreter's share of the distance to C, and vmpowerd's
        # own work's (its checks, journal, logs and counters per request and turn).
        "ratios_py_agent_to_c": ratios_of(py, c),
        "ratios_vmpowerd_to_py_agent": ratios_of(v, py),
        "ratios_per_round": per_round,
        "targets": TARGETS,
        "met": {
            "p50": ratios["p50"] is not None and ratios["p50"] <= TARGETS["p50_ratio_max"],
            "p99": ratios["p99"] is not None and ratios["p99"] <= TARGETS["p99_ratio_max"],
        },
        "dpdk_client": "not used: its rtt step sends SCALE_MAX (the C agent NACKs it) and"
        " the C agent NACKs librte_power's CONNECT probe, which vmpowerd leaves unanswered",
    }


def run(load: Load | None = None) -> dict[str, Any]:
    load = load or Load()
    if protocol.PACKET_SIZE != 464:
        raise RuntimeError(f"packet size {protocol.PACKET_SIZE}: the C agent speaks 464 bytes")
    env = _e2e()
    cpus = sorted(os.sched_getaffinity(0))
    agent_cpus = (cpus[-1],)
    try:
        with env.exclusive(env.CACHE / "e2e.lock", LOCK_WAIT_S):
            env.ensure_host_packages()
            return _measure(env, load, agent_cpus)
    except (env.SetupError, TimeoutError, AssertionError) as exc:
        raise RuntimeError(f"bench guest: the e2e set-up or run failed: {exc}") from exc
