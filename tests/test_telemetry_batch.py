"""Batch sessions end to end: the real vmpowerd, real batch servers (fork + exec), real
/dev/shm, clients in this process or in forked ones (SIGKILLed, or running as nobody).

Every test checks that no /dev/shm file of a session outlives it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_support import RunningAgent, pid_alive

from vmpower import control
from vmpower.devtools import wait_for
from vmpower.errors import ControlError, TelemetryError, VmpowerError
from vmpower.restore import RestoreJournal
from vmpower.telemetry import BatchClient
from vmpower.telemetry.session import SessionSpec, new_key, session_paths
from vmpower.telemetry.shm import file_facts

SHM = Path("/dev/shm")
NOBODY = 65534
MAX = "CPU_FREQUENCY_MAX_CONTROL"
MIN = "CPU_FREQUENCY_MIN_CONTROL"


_CHILDREN: set[int] = set()  # clients forked by these tests


def batch_files() -> set[str]:
    """Session files in /dev/shm of clients of this test run (keys start with the
    client's pid; other runs on the same machine may have sessions of their own)."""
    ours = {os.getpid(), *_CHILDREN}
    names = set()
    for path in SHM.iterdir():
        if path.name.startswith("vmpower-batch-"):
            pid = path.name[len("vmpower-batch-") :].split("-", 1)[0]
            if pid.isdigit() and int(pid) in ours:
                names.add(path.name)
    return names


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    yield
    # a server ends within moments of its session; give it that long, not more
    wait_for(lambda: not batch_files(), 30)
    assert batch_files() == set()


def make_agent(base: Path) -> RunningAgent:
    """An agent whose control socket nobody (uid 65534) may use: mode 0666 in a 0755 dir."""
    sock_dir = Path(tempfile.mkdtemp(prefix="vmpower-batch-test-", dir="/tmp"))
    sock_dir.chmod(0o755)
    socket_path = sock_dir / "control.sock"
    agent = RunningAgent(
        base,
        settings={
            "control": {"socket": str(socket_path), "mode": 0o666},
            "telemetry": {
                "proc_root": str(base / "proc"),
                "powercap_root": str(base / "powercap"),
                "access_dir": str(base / "access"),
                "start_timeout_s": 20.0,
            },
        },
    )
    agent.socket = socket_path
    return agent


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    running = make_agent(tmp_path_factory.mktemp("batch"))
    try:
        running.start()
        yield running
        assert running.stop() == 0
    finally:
        running.close()
        shutil.rmtree(running.socket.parent, ignore_errors=True)


def fresh_agent(tmp_path: Path) -> Iterator[RunningAgent]:
    running = make_agent(tmp_path)
    try:
        yield running
    finally:
        running.close()
        shutil.rmtree(running.socket.parent, ignore_errors=True)


def khz(agent: RunningAgent, cpu: int, name: str) -> int:
    # The simulated tree's files are rewritten (O_TRUNC, then write): a read that falls
    # in between sees an empty file while another process restores it.
    for _ in range(1000):
        text = agent.read(cpu, name)
        if text:
            return int(text)
    raise AssertionError(f"cpu{cpu}/{name} stays empty")


def in_child(body: Callable[[], Any], linger: bool = False) -> tuple[int, Any]:
    """Run ``body`` in a forked child; (pid, what it returned, sent back as JSON).

    ``linger``: the child then stays alive (attached to its session) until killed.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    _CHILDREN.add(pid)
    if pid == 0:
        os.close(read_fd)
        code = 1
        try:
            try:
                result = body()
            except BaseException as exc:
                result = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(write_fd, (json.dumps(result) + "\n").encode())
            if linger:
                time.sleep(60)
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        line = pipe.readline()
    return pid, json.loads(line) if line else None


def exited(pid: int) -> bool:
    """The process has exited: gone, or a zombie its new parent has not reaped yet (a
    server whose daemon died is reparented to init, which reaps when it pleases)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(b")") + 2 :].startswith(b"Z")


def reap(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


# -- the basic life of a session ------------------------------------------------------------


def test_start_read_write_stop(agent: RunningAgent) -> None:
    original = khz(agent, 2, "scaling_max_freq")
    signals = [("CPU_FREQUENCY_STATUS", "cpu", 2), (MAX, "cpu", 2), ("TIME", "board", 0)]
    with BatchClient(agent.socket, signals=signals, controls=[(MAX, "cpu", 2)]) as batch:
        assert batch.signal_labels == [
            "CPU_FREQUENCY_STATUS@cpu-2",
            f"{MAX}@cpu-2",
            "TIME@board-0",
        ]
        # attached: every name of the session is gone from /dev/shm already
        assert not any(p.exists() for p in session_paths(SHM, batch.server_key).all())
        freq, limit, elapsed = batch.read()
        assert freq == khz(agent, 2, "scaling_cur_freq") * 1000
        assert limit == original * 1000
        assert elapsed >= 0
        batch.write([2.0e9])
        assert khz(agent, 2, "scaling_max_freq") == 2_000_000
        assert batch.read()[1] == 2.0e9
        assert [row["server_key"] for row in agent.control("list_batches")] == [batch.server_key]
        server_pid = batch.server_pid
    # stop() returns once the server restored its controls
    assert khz(agent, 2, "scaling_max_freq") == original
    assert agent.control("list_batches") == []
    assert wait_for(lambda: not pid_alive(server_pid), 30)


def test_refused_values_are_clear_and_the_session_goes_on(agent: RunningAgent) -> None:
    with BatchClient(agent.socket, signals=[(MIN, "cpu", 1)], controls=[(MIN, "cpu", 1)]) as batch:
        with pytest.raises(TelemetryError, match="5000000000 Hz is outside cpu 1's"):
            batch.write([5e9])
        with pytest.raises(TelemetryError, match="write\\(\\) needs 1 values"):
            batch.write([1e9, 2e9])
        batch.write([1.5e9])
        assert batch.read() == [1.5e9]
    assert khz(agent, 1, "scaling_min_freq") == 1_200_000


def test_continuous_mode_samples_into_shared_memory(agent: RunningAgent) -> None:
    cur = agent.sysfs_root / "devices/system/cpu/cpu5/cpufreq/scaling_cur_freq"
    original = cur.read_text()
    try:
        signals = [("CPU_FREQUENCY_STATUS", "cpu", 5), ("TIME", "board", 0)]
        with BatchClient(agent.socket, signals=signals, period_s=0.02) as batch:
            first = batch.sample()  # the server sampled once before answering start_batch
            assert first[0] == int(original) * 1000
            cur.write_text("2200000\n")
            assert wait_for(lambda: batch.sample()[0] == 2.2e9, 30)
            assert batch.sample()[1] > first[1]  # later samples carry later times
    finally:
        cur.write_text(original)


def test_sample_needs_continuous_mode(agent: RunningAgent) -> None:
    with (
        BatchClient(agent.socket, signals=[("TIME", "board", 0)]) as batch,
        pytest.raises(TelemetryError, match="continuous mode"),
    ):
        batch.sample()


def test_vm_signals_come_from_libvirt(agent: RunningAgent) -> None:
    signals = [("VM_VCPU_TIME", "vm", "vm1"), ("VM_VCPU_TIME", "vm", 0)]
    with BatchClient(agent.socket, signals=signals) as batch:
        vm1, first_vm = batch.read()
        assert vm1 > 0 and first_vm > 0  # index 0 is the first VM name in sorted order


def test_energy_signals_and_vm_shares(agent: RunningAgent) -> None:
    zone = agent.tmp_path / "powercap" / "intel-rapl:0"
    zone.mkdir(parents=True)
    try:
        (zone / "name").write_text("package-0\n")
        (zone / "max_energy_range_uj").write_text("262143328850\n")
        counter = zone / "energy_uj"
        counter.write_text("1000000\n")
        running = sorted(
            vm["name"] for vm in agent.control("list_vms") if vm["state"] in ("running", "paused")
        )
        signals = [("CPU_ENERGY", "package", 0), ("CPU_POWER", "board", 0)]
        signals += [("VM_ENERGY", "vm", name) for name in running]
        with BatchClient(agent.socket, signals=signals) as batch:
            before = batch.read()
            counter.write_text("4000000\n")  # 3 J spent
            after = batch.read()
        assert before[0] == 1.0 and after[0] == 4.0
        assert after[1] > 0
        shares = after[2:]
        # libvirt's test driver advances every vCPU's time: each VM got a share, and the
        # shares add up to the energy spent (none lost, none made up)
        assert all(share > 0 for share in shares)
        assert sum(shares) - sum(before[2:]) == pytest.approx(3.0)
    finally:
        shutil.rmtree(zone)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"signals": [["NOPE", "cpu", 0]]}, "unknown signal or control 'NOPE'"),
        ({"signals": [["TIME", "cpu", 0]]}, "cannot be asked at domain 'cpu'"),
        ({"signals": [["CPU_FREQUENCY_STATUS", "cpu", 8]]}, "no CPU 8"),
        ({"signals": [["VM_ENERGY", "vm", "ghost"]]}, "unknown VM 'ghost'"),
        ({"controls": [["TIME", "board", 0]]}, "is a signal, not a control"),
        ({"signals": [["TIME", "board", 0]], "period_s": 0}, "period_s must be"),
        ({}, "needs signals and/or controls"),
        # opened by the server: its one-line refusal comes back through the daemon
        ({"signals": [["CPU_ENERGY", "package", 0]]}, "no readable intel-rapl zone"),
    ],
)
def test_bad_requests_are_refused_with_one_clear_line(
    agent: RunningAgent, args: dict[str, Any], message: str
) -> None:
    with pytest.raises(ControlError, match=message) as info:
        agent.control("start_batch", **args)
    assert "\n" not in str(info.value)
    assert agent.control("list_batches") == []


# -- ends ---------------------------------------------------------------------------------------


def test_client_killed_restores_controls_and_ends_the_server(agent: RunningAgent) -> None:
    original = khz(agent, 3, "scaling_max_freq")

    def client() -> dict[str, Any]:
        batch = BatchClient(agent.socket, controls=[(MAX, "cpu", 3)]).start()
        batch.write([1.8e9])
        return {"server_pid": batch.server_pid}

    pid, session = in_child(client, linger=True)
    assert khz(agent, 3, "scaling_max_freq") == 1_800_000
    os.kill(pid, signal.SIGKILL)
    reap(pid)
    assert wait_for(lambda: khz(agent, 3, "scaling_max_freq") == original, 30)
    assert wait_for(lambda: not pid_alive(session["server_pid"]), 30)
    assert agent.control("list_batches") == []


def test_client_killed_before_attaching_leaves_no_files(agent: RunningAgent) -> None:
    def client() -> dict[str, Any]:
        return control.request(agent.socket, "start_batch", signals=[["TIME", "board", 0]])

    pid, session = in_child(client, linger=True)
    paths = session_paths(session["shm_dir"], session["server_key"])
    assert paths.signals.exists() and paths.channel.block.exists()  # never attached
    os.kill(pid, signal.SIGKILL)
    reap(pid)
    assert wait_for(lambda: not any(p.exists() for p in paths.all()), 30)
    assert wait_for(lambda: not pid_alive(session["server_pid"]), 30)


def test_stop_batch_wakes_the_client_and_restores(agent: RunningAgent) -> None:
    original = khz(agent, 6, "scaling_min_freq")
    batch = BatchClient(agent.socket, controls=[(MIN, "cpu", 6)]).start()
    try:
        batch.write([1.9e9])
        result = agent.control("stop_batch", server_key=batch.server_key)
        assert result["stopped"] is True
        assert khz(agent, 6, "scaling_min_freq") == original  # restored before the answer
        assert batch.ended(timeout_s=5)
        with pytest.raises(TelemetryError, match="was stopped"):
            batch.write([1.9e9])
    finally:
        batch.close()
    with pytest.raises(ControlError, match="no batch session"):
        agent.control("stop_batch", server_key=batch.server_key)


def test_server_crash_is_restored_by_the_daemon(agent: RunningAgent) -> None:
    original = khz(agent, 7, "scaling_max_freq")
    batch = BatchClient(agent.socket, controls=[(MAX, "cpu", 7)]).start()
    try:
        batch.write([1.7e9])
        session_dir = agent.state_dir / "telemetry" / batch.server_key
        # The daemon wrote it (issue #12, point 5): its journal has the original, the
        # session's has nothing.
        pending = RestoreJournal(agent.state_dir).pending()
        assert [v for p, v in pending.items() if p.endswith("cpu7/cpufreq/scaling_max_freq")]
        assert RestoreJournal(session_dir).pending() == {}
        os.kill(batch.server_pid, signal.SIGKILL)
        # the daemon reaps the server and drops the session's limits
        assert wait_for(lambda: khz(agent, 7, "scaling_max_freq") == original, 30)
        assert wait_for(lambda: not session_dir.exists(), 30)
        with pytest.raises(TelemetryError, match="exited"):
            batch.read()
    finally:
        batch.close()


def test_concurrent_clients_are_independent(agent: RunningAgent) -> None:
    originals = khz(agent, 3, "scaling_max_freq"), khz(agent, 4, "scaling_min_freq")
    a = BatchClient(agent.socket, signals=[(MAX, "cpu", 3)], controls=[(MAX, "cpu", 3)]).start()
    b = BatchClient(agent.socket, signals=[(MIN, "cpu", 4)], controls=[(MIN, "cpu", 4)]).start()
    try:
        assert a.server_pid != b.server_pid and a.server_key != b.server_key
        a.write([1.6e9])
        b.write([1.4e9])
        b_sequence = b._signals.sequence  # type: ignore[union-attr]
        assert a.read() == [1.6e9]
        assert b._signals.sequence == b_sequence  # type: ignore[union-attr]  # a's read is a's
        a.stop()
        assert khz(agent, 3, "scaling_max_freq") == originals[0]
        assert khz(agent, 4, "scaling_min_freq") == 1_400_000  # b's setting stands
        assert b.read() == [1.4e9]
    finally:
        a.stop()
        b.stop()
    assert khz(agent, 4, "scaling_min_freq") == originals[1]


def test_non_root_client(agent: RunningAgent) -> None:
    def as_nobody() -> dict[str, Any]:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        out: dict[str, Any] = {}
        try:
            BatchClient(agent.socket, controls=[(MAX, "cpu", 0)]).start()
        except VmpowerError as exc:
            out["refusal"] = str(exc)
        session = control.request(agent.socket, "start_batch", signals=[["TIME", "board", 0]])
        paths = session_paths(session["shm_dir"], session["server_key"])
        mine = (
            paths.signals,
            paths.controls,
            paths.channel.block,
            paths.channel.to_worker,
            paths.channel.to_controller,
        )
        out["facts"] = [file_facts(p) for p in mine]
        batch = BatchClient.attach(session)
        out["read"] = batch.read()
        batch.stop()
        return out

    pid, out = in_child(as_nobody)
    assert reap(pid) == 0, out
    assert out["refusal"] == (
        "access denied: uid 65534 may not write CPU_FREQUENCY_MAX_CONTROL (controls it may"
        f" write: none; writing is root-only unless {agent.tmp_path / 'access'} allows it)"
    )
    assert out["facts"] == [[0o600, NOBODY, NOBODY]] * 5
    assert out["read"][0] >= 0


def test_stop_batch_of_another_user_is_refused(agent: RunningAgent) -> None:
    with BatchClient(agent.socket, signals=[("TIME", "board", 0)]) as batch:

        def as_nobody() -> str:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                control.request(agent.socket, "stop_batch", server_key=batch.server_key)
            except ControlError as exc:
                return str(exc)
            return "not refused"

        pid, message = in_child(as_nobody)
        assert reap(pid) == 0
        assert message == f"batch session {batch.server_key} belongs to another user"
        assert batch.read()[0] >= 0


# -- the daemon's own ends ------------------------------------------------------------------------


@pytest.fixture
def lone_agent(tmp_path: Path) -> Iterator[RunningAgent]:
    yield from fresh_agent(tmp_path)


def test_daemon_death_ends_its_servers(lone_agent: RunningAgent) -> None:
    agent = lone_agent.start()
    original = khz(agent, 2, "scaling_min_freq")
    batch = BatchClient(agent.socket, controls=[(MIN, "cpu", 2)]).start()
    try:
        batch.write([2.1e9])
        assert agent.proc is not None
        agent.proc.kill()  # SIGKILL: no shutdown, the barrier's pipe just hangs up
        agent.proc.wait()
        assert wait_for(lambda: exited(batch.server_pid), 30)
        assert batch.ended(timeout_s=5)
        # The daemon wrote the limit and journaled its original (issue #12, point 5):
        # like any setting of a crashed daemon, the next start restores it first.
        assert khz(agent, 2, "scaling_min_freq") == 2_100_000
        agent.start(accept=False)
        assert wait_for(lambda: khz(agent, 2, "scaling_min_freq") == original, 10)
        assert agent.stop() == 0
    finally:
        batch.close()


def test_daemon_shutdown_stops_sessions_first(lone_agent: RunningAgent) -> None:
    agent = lone_agent.start()
    original = khz(agent, 2, "scaling_max_freq")
    batch = BatchClient(agent.socket, controls=[(MAX, "cpu", 2)]).start()
    try:
        batch.write([1.3e9])
        assert agent.stop() == 0
        assert khz(agent, 2, "scaling_max_freq") == original
        assert exited(batch.server_pid)
        assert batch.ended(timeout_s=5)
    finally:
        batch.close()


def test_sessions_left_by_a_crash_are_recovered_at_start(lone_agent: RunningAgent) -> None:
    agent = lone_agent
    # What a crash of both the daemon and a server leaves: the session directory with
    # its journal (original saved, file changed) and the session's files in /dev/shm.
    key = new_key(999_999)
    session_dir = agent.state_dir / "telemetry" / key
    session_dir.mkdir(parents=True)
    SessionSpec(
        key=key,
        shm_dir=str(SHM),
        client_pid=999_999,
        client_uid=0,
        client_gid=0,
        client_start_ticks=1,
        signals=(),
        controls=(),
        period_s=None,
        sysfs_root=str(agent.sysfs_root),
        powercap_root="/nonexistent",
        proc_root="/proc",
        libvirt_uri="test:///default",
    ).save(session_dir)
    limit = agent.sysfs_root / "devices/system/cpu/cpu1/cpufreq/scaling_max_freq"
    original = limit.read_text().strip()
    RestoreJournal(session_dir).remember(str(limit), original)
    limit.write_text("1500000\n")
    stale = session_paths(SHM, key)
    try:
        stale.signals.write_bytes(b"stale")
        stale.channel.to_worker.write_bytes(b"stale")
        agent.start()
        assert limit.read_text().strip() == original
        assert not session_dir.exists()
        assert not stale.signals.exists() and not stale.channel.to_worker.exists()
        assert agent.stop() == 0
    finally:  # a run stopped before the daemon's start leaves no /dev/shm file behind
        stale.signals.unlink(missing_ok=True)
        stale.channel.to_worker.unlink(missing_ok=True)
