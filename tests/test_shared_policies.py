"""CPUs sharing one cpufreq policy (issue #13, point 2), on every driver.

Trees are laid out as the kernel does (``build_tree(..., cpus_per_policy=2)``: policyM
for CPUs M and M+1, ``related_cpus`` listing both, ``cpuN/cpufreq`` linking there; the
recorded i.MX8QXP host has one policy for all four CPUs). In-process tests use the real
parts (libvirt's test driver, ``KernelSysfs``, the restore journal); the daemon tests
run the real vmpowerd.
"""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_support import RunningAgent, render_node

from vmpower import protocol
from vmpower.cpufreq import open_cpufreq
from vmpower.cpufreq.simulate import (
    DRIVERS,
    KernelSysfs,
    build_from_fixture,
    build_tree,
    main,
    snapshot,
)
from vmpower.devtools import ChannelHost, make_request, wait_for
from vmpower.hypervisor import Hypervisor
from vmpower.power import PowerManager
from vmpower.protocol import Command, CoreType, ReplyCode, Unit
from vmpower.restore import RestoreJournal

POLICIES = "devices/system/cpu/cpufreq"
IMX8 = Path(__file__).resolve().parent / "data" / "real-hosts" / "imx8qxp-mek.json"
ACK, NACK = int(ReplyCode.ACK), int(ReplyCode.NACK)


def tree_snapshot(root: Path) -> dict[str, str]:
    """Every setting's value (a write leaves no trailing newline: compared stripped;
    the current frequency is a measurement, not a setting)."""
    return {p: text.strip() for p, text in snapshot(root).items() if "_cur_freq" not in p}


def _tree(root: Path, driver: str) -> None:
    build_tree(root, driver, 8, turbo=True, cpus_per_policy=2)


def _manager(tmp_path: Path, root: Path) -> tuple[PowerManager, RestoreJournal, Hypervisor]:
    channels = tmp_path / "channels"
    channels.mkdir()
    hv = Hypervisor(f"test://{render_node(tmp_path, channels)}", channels)
    hv.connect()
    journal = RestoreJournal(tmp_path / "state", writer=KernelSysfs(root).write_path)
    cpufreq = open_cpufreq(KernelSysfs(root, journal))
    return PowerManager(cpufreq, hv, journal), journal, hv


def _policy_target(root: Path, driver: str, policy: int) -> int:
    """What the policy is asked to run at now (setspeed, or min = max)."""
    d = root / POLICIES / f"policy{policy}"
    if (d / "scaling_governor").read_text().strip() == "userspace":
        return int((d / "scaling_setspeed").read_text())
    lo, hi = (int((d / n).read_text()) for n in ("scaling_min_freq", "scaling_max_freq"))
    assert lo == hi, f"{driver}: policy{policy} not pinned ({lo}-{hi})"
    return hi


@pytest.mark.parametrize("driver", DRIVERS)
def test_highest_wish_of_the_policy_wins_and_restore_waits_for_the_last(
    tmp_path: Path, driver: str
) -> None:
    root = tmp_path / "sys"
    _tree(root, driver)
    before = tree_snapshot(root)
    pm, journal, hv = _manager(tmp_path, root)
    try:
        low = pm.set_cpu_freq("a", 2, Unit.SCALE_MIN)
        assert _policy_target(root, driver, 2) == low
        high = pm.set_cpu_freq("b", 3, Unit.SCALE_MAX)  # the other CPU of policy2
        assert high > low
        assert _policy_target(root, driver, 2) == high  # the highest wish of both CPUs
        report = pm.cpu_report(2)
        assert report["policy"] == "policy2" and report["policy_cpus"] == [2, 3]
        assert report["policy_khz"] == high and report["desired_khz"] == low
        # One journal entry per file of the policy, under the policy's own directory.
        pending = journal.pending()
        ours = [p for p in pending if "/cpu2/" in p or "/cpu3/" in p or "policy2/" in p]
        assert ours and all(f"{POLICIES}/policy2/" in p for p in ours), ours
        # Releasing CPU 3 must not restore the policy CPU 2 still wants: back to a's wish.
        pm.release("b", [3])
        assert _policy_target(root, driver, 2) == low
        assert journal.pending_count() > 0
        # The last wish gone: the policy's originals come back.
        pm.release("a", [2])
        assert journal.pending_count() == 0
        assert tree_snapshot(root) == before
    finally:
        pm.restore_all()
        hv.close()


def test_a_cpu_sharing_a_policy_with_a_reserved_cpu_is_not_touched(tmp_path: Path) -> None:
    root = tmp_path / "sys"
    _tree(root, "acpi-cpufreq")
    pm, _journal, hv = _manager(tmp_path, root)
    try:
        pm.reserved_cpus = frozenset({4})
        with pytest.raises(Exception, match="reserved"):
            pm.set_cpu_freq("a", 5, Unit.SCALE_MAX)  # policy4 = CPUs 4, 5
        why = pm.cpufreq.unsupported_on(5)
        assert "policy4" in why["control"] and "reserved" in why["control"]
    finally:
        pm.restore_all()
        hv.close()


def test_recorded_host_with_one_policy_for_four_cpus(tmp_path: Path) -> None:
    root = tmp_path / "sys"
    build_from_fixture(root, IMX8)
    before = tree_snapshot(root)
    pm, _journal, hv = _manager(tmp_path, root)
    try:
        assert pm.cpufreq.policy_cpus(3) == frozenset({0, 1, 2, 3})
        assert "per_cpu" in pm.cpufreq.unsupported_on(1)
        pm.set_cpu_freq("a", 1, Unit.SCALE_MIN)
        pm.set_cpu_freq("b", 3, Unit.SCALE_MAX)
        policy = root / POLICIES / "policy0"
        assert (policy / "scaling_setspeed").read_text().strip() == "1200000"
        pm.release("b")
        assert (policy / "scaling_setspeed").read_text().strip() == "900000"
        pm.release("a")
        assert tree_snapshot(root) == before
    finally:
        pm.restore_all()
        hv.close()


def test_simulate_sysfs_lays_out_shared_policies_as_the_kernel_does(tmp_path: Path) -> None:
    root = tmp_path / "t"
    assert (
        main([str(root), "--driver", "intel_pstate", "--cpus", "6", "--cpus-per-policy", "3"]) == 0
    )
    cpu = root / "devices/system/cpu"
    assert sorted(p.name for p in (cpu / "cpufreq").glob("policy*")) == ["policy0", "policy3"]
    assert (cpu / "cpufreq/policy3/related_cpus").read_text().split() == ["3", "4", "5"]
    assert (cpu / "cpufreq/policy3/affected_cpus").read_text().split() == ["3", "4", "5"]
    assert str((cpu / "cpu4/cpufreq").readlink()) == "../cpufreq/policy3"
    with pytest.raises(SystemExit):
        main(
            [
                str(tmp_path / "u"),
                "--driver",
                "intel_pstate",
                "--cpus",
                "2",
                "--cpus-per-policy",
                "3",
            ]
        )


# -- the real daemon ---------------------------------------------------------------------


def _power(host: ChannelHost, unit: Unit, resource_id: int, core_type: int = 0) -> int:
    reply = host.request(make_request(Command.CPU_POWER, unit, resource_id, core_type=core_type))
    return protocol.peek_header(reply)[2]


@pytest.fixture
def shared_agent(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RunningAgent]:
    driver = getattr(request, "param", "acpi-cpufreq")
    agent = RunningAgent(tmp_path, driver=driver)
    shutil.rmtree(agent.sysfs_root)
    _tree(agent.sysfs_root, driver)
    try:
        yield agent
    finally:
        agent.close()


def test_daemon_arbitrates_per_policy_and_show_cpus_names_it(shared_agent: RunningAgent) -> None:
    agent = shared_agent.start()
    vm1, vm2 = agent.hosts["vm1.0"], agent.hosts["vm2.0"]
    # vm1 runs on CPUs 2, 3 (policy2); vm2 on 3, 4; CPU 5 (policy4, with 4) is vm2's
    # neighbour's, not vm1's: a VM reaches a policy only through a CPU it owns.
    assert _power(vm1, Unit.SCALE_MAX, 5, int(CoreType.PHYSICAL)) == NACK
    assert _power(vm1, Unit.SCALE_MIN, 0) == ACK  # vCPU 0 → CPU 2
    assert _power(vm2, Unit.SCALE_MAX, 0) == ACK  # vCPU 0 → CPU 3: policy2 too
    rows = {r["cpu"]: r for r in agent.control("show_cpus")}
    assert rows[2]["policy"] == rows[3]["policy"] == "policy2"
    assert rows[2]["policy_khz"] == rows[3]["policy_khz"] == agent.setspeed(2)
    assert rows[2]["desired_khz"] < rows[2]["policy_khz"]
    assert "per_cpu" in rows[2]["unsupported"]
    assert agent.stop() == 0


@pytest.mark.parametrize("shared_agent", DRIVERS, indirect=True)
def test_sigkill_then_restart_restores_the_shared_policy(shared_agent: RunningAgent) -> None:
    agent = shared_agent
    before = tree_snapshot(agent.sysfs_root)
    agent.start()
    assert _power(agent.hosts["vm1.0"], Unit.SCALE_MIN, 1) == ACK  # vCPU 1 → CPU 3
    assert _power(agent.hosts["vm2.0"], Unit.SCALE_MAX, 1) == ACK  # vCPU 1 → CPU 4
    assert tree_snapshot(agent.sysfs_root) != before
    journal = json.loads((agent.state_dir / "restore-journal.json").read_text())
    assert "policy2/" in json.dumps(journal) and "policy4/" in json.dumps(journal)
    agent.stop(signal.SIGKILL)
    for host in agent.hosts.values():
        host.close()
    agent.hosts = {n: ChannelHost(agent.channels_dir / n) for n in agent.hosts}
    agent.start()
    assert wait_for(lambda: tree_snapshot(agent.sysfs_root) == before, 10)
    assert agent.stop() == 0
