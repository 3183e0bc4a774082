"""vmpowerd as a real subprocess: every docs/protocol.md host rule, end to end.

The test plays QEMU (it binds the channel sockets and the agent connects), speaks
the binary protocol, and checks the replies and the simulated sysfs.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_support import RunningAgent

from vmpower import protocol
from vmpower.devtools import ChannelHost, make_request, wait_for
from vmpower.errors import ControlError
from vmpower.protocol import Command, CoreType, ReplyCode, Unit

VECTORS = Path(__file__).resolve().parent / "data"
ACK, NACK = int(ReplyCode.ACK), int(ReplyCode.NACK)


def code(reply: bytes) -> int:
    return protocol.peek_header(reply)[2]


def power(host: ChannelHost, unit: Unit, resource_id: int = 0, **fields: object) -> int:
    reply = host.request(make_request(Command.CPU_POWER, unit, resource_id, **fields))
    assert len(reply) == protocol.PACKET_SIZE
    return code(reply)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[RunningAgent]:
    running = RunningAgent(tmp_path)
    try:
        yield running.start()
    finally:
        running.close()


def test_scale_requests_move_the_vcpus_own_host_cpu(agent: RunningAgent) -> None:
    vm1 = agent.hosts["vm1.0"]
    table = agent.table(2)  # vm1 vCPU0 is pinned to host CPU 2; table[0] is turbo
    assert power(vm1, Unit.SCALE_MAX, 0) == ACK
    assert agent.read(2, "scaling_governor") == "userspace"
    assert agent.setspeed(2) == table[1]  # max without turbo
    assert power(vm1, Unit.SCALE_DOWN, 0) == ACK
    assert agent.setspeed(2) == table[2]
    assert power(vm1, Unit.SCALE_UP, 0) == ACK
    assert agent.setspeed(2) == table[1]
    assert power(vm1, Unit.SCALE_UP, 0) == ACK  # no turbo asked: stays at max
    assert agent.setspeed(2) == table[1]
    assert power(vm1, Unit.ENABLE_TURBO, 0) == ACK
    assert agent.setspeed(2) == table[0]
    assert power(vm1, Unit.DISABLE_TURBO, 0) == ACK
    assert agent.setspeed(2) == table[1]
    assert power(vm1, Unit.SCALE_MIN, 0) == ACK
    assert agent.setspeed(2) == table[-1]
    # The other CPUs were not touched.
    assert agent.read(4, "scaling_governor") != "userspace"


def test_partial_packets_wait_for_the_rest(agent: RunningAgent) -> None:
    vm1 = agent.hosts["vm1.0"]
    packet = make_request(Command.CPU_POWER, Unit.SCALE_MIN, 0)
    vm1.send(packet[:100])
    assert vm1.nothing_to_read(0.3)
    vm1.send(packet[100:463])
    assert vm1.nothing_to_read(0.2)
    vm1.send(packet[463:] + packet[:1])  # the end of one and the start of the next
    assert code(vm1.recv_exact(464)) == ACK
    vm1.send(packet[1:])
    assert code(vm1.recv_exact(464)) == ACK
    assert agent.setspeed(2) == agent.table(2)[-1]


def test_foreign_and_unowned_cpus_are_refused(agent: RunningAgent) -> None:
    vm1 = agent.hosts["vm1.0"]
    assert power(vm1, Unit.SCALE_MAX, 2) == NACK  # vm1 has vCPUs 0 and 1 only
    assert power(vm1, Unit.SCALE_MAX, 4, core_type=CoreType.PHYSICAL) == NACK  # vm2's CPU
    assert power(vm1, Unit.SCALE_MAX, 200, core_type=CoreType.PHYSICAL) == NACK
    assert agent.read(4, "scaling_governor") != "userspace"
    assert power(vm1, Unit.SCALE_MIN, 2, core_type=CoreType.PHYSICAL) == ACK  # its own
    assert agent.setspeed(2) == agent.table(2)[-1]
    assert power(vm1, Unit.SCALE_MIN, 0, core_type=7) == NACK  # no such core type
    assert "not pinned to vm1" in agent.log()


def test_unpinned_vcpu_is_refused(tmp_path: Path) -> None:
    # "free" has no <channel> in its XML: its socket is found by the directory scan.
    agent = RunningAgent(tmp_path, channels=("vm1.0", "free.0"))
    try:
        agent.start()
        assert power(agent.hosts["free.0"], Unit.SCALE_MAX, 0) == NACK
        assert "not pinned" in agent.log()
        assert all(agent.read(cpu, "scaling_governor") != "userspace" for cpu in range(8))
    finally:
        agent.close()


def test_spoofed_vm_name_is_refused(agent: RunningAgent) -> None:
    vm1 = agent.hosts["vm1.0"]
    assert power(vm1, Unit.SCALE_MIN, 0, vm_name="vm2") == NACK
    assert agent.read(2, "scaling_governor") != "userspace"
    assert power(vm1, Unit.SCALE_MIN, 0, vm_name="vm1") == ACK  # its own name is fine


def test_unknown_command_and_unit_get_a_full_size_nack(agent: RunningAgent) -> None:
    vm1 = agent.hosts["vm1.0"]
    assert code(vm1.request(make_request(99), reply_size=464)) == NACK
    assert power(vm1, 77, 0) == NACK
    # The stream is still in sync: the next request is understood.
    assert power(vm1, Unit.SCALE_MIN, 0) == ACK


def test_connect_probe_gets_no_reply(agent: RunningAgent) -> None:
    vm1 = agent.hosts["vm1.0"]
    vm1.send(make_request(Command.CONNECT))
    assert vm1.nothing_to_read(0.3)
    assert power(vm1, Unit.SCALE_MIN, 0) == ACK


def test_disabled_channel_is_read_and_answered_with_nack(agent: RunningAgent) -> None:
    agent.control("set_channel_status", vm="vm1", channels=[0], status="disabled")
    vm1 = agent.hosts["vm1.0"]
    assert power(vm1, Unit.SCALE_MIN, 0) == NACK
    assert agent.read(2, "scaling_governor") != "userspace"
    assert power(agent.hosts["vm1.1"], Unit.SCALE_MIN, 0) == ACK  # its other channel works
    agent.control("set_channel_status", vm="vm1", channels="all", status="enabled")
    assert power(vm1, Unit.SCALE_MIN, 0) == ACK


def test_queries_need_permission_and_answer_for_the_requesting_vm(agent: RunningAgent) -> None:
    vm1 = agent.hosts["vm1.0"]
    for command, size in (
        (Command.QUERY_FREQ_LIST, 88),
        (Command.QUERY_FREQ, 88),
        (Command.QUERY_CAPS_LIST, 184),
        (Command.QUERY_CAPS, 184),
    ):
        reply = vm1.request(make_request(command))
        assert len(reply) == size and code(reply) == NACK
    agent.control("set_query", vm="vm1", enable=True)
    assert power(vm1, Unit.SCALE_MIN, 1) == ACK  # vCPU1 → host CPU 3
    freq = protocol.FreqListReply.decode(vm1.request(make_request(Command.QUERY_FREQ_LIST)))
    assert freq.command == ReplyCode.FREQ_LIST and freq.num_vcpu == 2
    assert freq.freq_list_khz[1] == agent.table(3)[-1]
    assert freq.freq_list_khz[0] in agent.table(2)
    one = protocol.FreqListReply.decode(vm1.request(make_request(Command.QUERY_FREQ, 0, 1)))
    assert one.freq_list_khz[1] == agent.table(3)[-1] and one.freq_list_khz[0] == 0
    caps = protocol.CapsListReply.decode(vm1.request(make_request(Command.QUERY_CAPS_LIST)))
    assert caps.command == ReplyCode.CAPS_LIST and list(caps.turbo[:2]) == [1, 1]
    bad = vm1.request(make_request(Command.QUERY_FREQ, 0, 5))
    assert len(bad) == 88 and code(bad) == NACK
    # vm2 was not given permission.
    reply = agent.hosts["vm2.0"].request(make_request(Command.QUERY_FREQ_LIST))
    assert code(reply) == NACK


def test_shared_cpu_runs_at_the_highest_wish(agent: RunningAgent) -> None:
    vm1, vm2 = agent.hosts["vm1.0"], agent.hosts["vm2.0"]
    table = agent.table(3)  # vm1 vCPU1 and vm2 vCPU0 are both pinned to host CPU 3
    assert power(vm1, Unit.SCALE_MIN, 1) == ACK
    assert agent.setspeed(3) == table[-1]
    assert power(vm2, Unit.SCALE_MAX, 0) == ACK
    assert agent.setspeed(3) == table[1]
    assert power(vm1, Unit.SCALE_DOWN, 1) == ACK  # vm1 goes lower: vm2 still wins
    assert agent.setspeed(3) == table[1]
    assert power(vm2, Unit.SCALE_MIN, 0) == ACK
    assert agent.setspeed(3) == table[-1]
    cpus = {row["cpu"]: row for row in agent.control("show_cpus")}
    assert set(cpus[3]["wishes"]) == {"vm1", "vm2"}
    assert cpus[3]["vms"] == ["vm1", "vm2"]


def test_reserved_and_offline_cpus_are_refused(tmp_path: Path) -> None:
    agent = RunningAgent(
        tmp_path, offline=frozenset({5}), settings={"cpufreq": {"reserved_cpus": "4"}}
    )
    try:
        agent.start()
        assert power(agent.hosts["vm2.0"], Unit.SCALE_MAX, 1) == NACK  # vCPU1 → CPU 4
        assert power(agent.hosts["web.prod.1.0"], Unit.SCALE_MAX, 0) == NACK  # 5-6, 5 offline
        assert power(agent.hosts["vm2.0"], Unit.SCALE_MIN, 0) == ACK
        assert "reserved" in agent.log() and "offline" in agent.log()
        assert agent.read(4, "scaling_governor") != "userspace"
        assert agent.read(6, "scaling_governor") != "userspace"
    finally:
        agent.close()


def test_flooding_channel_gets_nack_for_the_excess_and_others_are_served(tmp_path: Path) -> None:
    agent = RunningAgent(tmp_path, settings={"channels": {"rate_per_s": 5.0, "burst": 10}})
    try:
        agent.start()
        vm1, vm2 = agent.hosts["vm1.0"], agent.hosts["vm2.0"]
        vm1.send(make_request(Command.CPU_POWER, Unit.SCALE_DOWN, 0) * 50)
        assert power(vm2, Unit.SCALE_MIN, 1) == ACK  # served while vm1 floods
        codes = [code(vm1.recv_exact(464)) for _ in range(50)]
        assert codes[:10] == [ACK] * 10
        assert codes.count(NACK) >= 38  # a token or two may refill meanwhile
        shown = agent.control("show_vm", vm="vm1")
        assert shown["channels"][0]["rate_limited"] >= 38
    finally:
        agent.close()


def test_guest_that_never_reads_cannot_block_others(tmp_path: Path) -> None:
    agent = RunningAgent(tmp_path, settings={"channels": {"send_queue_max": 64}})
    try:
        agent.start()
        vm1, vm2 = agent.hosts["vm1.0"], agent.hosts["vm2.0"]
        # ~0.9 MB of requests whose replies we never read: the agent keeps reading them
        # (so this send completes) while its replies pile up beyond the socket buffer.
        vm1.send(make_request(Command.CPU_POWER, Unit.SCALE_MIN, 0) * 2000)
        assert power(vm2, Unit.SCALE_MIN, 1) == ACK
        assert wait_for(
            lambda: agent.control("show_vm", vm="vm1")["channels"][0]["dropped_replies"] > 0, 10
        )
        assert power(vm2, Unit.SCALE_MAX, 1) == ACK
    finally:
        agent.close()


def test_sigterm_restores_every_setting_and_exits_0(tmp_path: Path) -> None:
    agent = RunningAgent(tmp_path)
    original = agent.originals()
    try:
        agent.start()
        assert power(agent.hosts["vm1.0"], Unit.ENABLE_TURBO, 0) == ACK
        assert power(agent.hosts["vm2.0"], Unit.SCALE_MIN, 1) == ACK
        assert agent.originals() != original
        assert agent.stop(signal.SIGTERM) == 0
        assert agent.originals() == original
        assert "restored" in agent.log()
    finally:
        agent.close()


def test_second_instance_is_refused(agent: RunningAgent) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vmpower.daemon", "--config", str(agent.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "another vmpowerd" in result.stderr
    assert agent.proc is not None and agent.proc.poll() is None  # the first one still runs
    assert power(agent.hosts["vm1.0"], Unit.SCALE_MIN, 0) == ACK


def test_channel_reconnects_after_the_other_end_closes(agent: RunningAgent) -> None:
    vm1 = agent.hosts["vm1.0"]
    assert vm1.conn is not None
    vm1.conn.close()  # what QEMU does when the guest's VM restarts its device
    vm1.conn = None
    vm1.accept(timeout_s=10)
    assert power(vm1, Unit.SCALE_MIN, 0) == ACK


def test_dpdk_vectors_get_the_replies_the_spec_gives(agent: RunningAgent) -> None:
    captures = json.loads((VECTORS / "dpdk-22.11-guest.json").read_text())["captures"]
    agent.control("set_query", vm="vm1", enable=True)
    vm1 = agent.hosts["vm1.0"]
    table = agent.table(2)
    for capture in [c for c in captures if c["lcore"] == 0]:
        packet = bytes.fromhex(capture["hex"])
        command = capture["fields"]["command"]
        if command == Command.CONNECT:
            vm1.send(packet)
            assert vm1.nothing_to_read(0.2), capture["what"]
            continue
        reply = vm1.request(packet)
        if command in (Command.QUERY_FREQ_LIST, Command.QUERY_FREQ):
            assert len(reply) == 88 and code(reply) == ReplyCode.FREQ_LIST, capture["what"]
        elif command in (Command.QUERY_CAPS_LIST, Command.QUERY_CAPS):
            assert len(reply) == 184 and code(reply) == ReplyCode.CAPS_LIST, capture["what"]
        else:
            assert len(reply) == 464 and code(reply) == ACK, capture["what"]
            # The echo keeps the request's fields and zeroes every padding byte.
            assert reply[:12] == packet[:12] and reply[16:153] == packet[16:153]
            assert reply[153:156] == bytes(3) and reply[457:] == bytes(7)
    assert table  # the replay ended with PKT_POLICY_REMOVE: vm1's CPUs are back as they were
    assert agent.read(2, "scaling_governor") == "schedutil"
    # lcore 3 speaks for vCPU 3, which vm1 does not have: refused, with full-size replies.
    vm1b = agent.hosts["vm1.1"]
    for capture in [c for c in captures if c["lcore"] == 3 and c["fields"]["command"] == 1]:
        assert code(vm1b.request(bytes.fromhex(capture["hex"]))) == NACK


def test_policy_install_and_remove_are_acknowledged(agent: RunningAgent) -> None:
    vm1 = agent.hosts["vm1.0"]
    packet = make_request(
        Command.PKT_POLICY,
        0,
        0,
        policy_to_use=2,
        workload=0,
        vcpu_to_control=(0, 1, 0, 0, 0, 0, 0, 0),
        num_vcpu=2,
    )
    assert code(vm1.request(packet)) == ACK
    policies = agent.control("show_policies")
    assert policies[0]["owner"] == "vm1" and policies[0]["cpus"] == "2-3"
    assert code(vm1.request(make_request(Command.PKT_POLICY_REMOVE))) == ACK
    assert agent.control("show_policies") == []
    assert code(vm1.request(make_request(Command.PKT_POLICY_REMOVE))) == NACK  # nothing left
    foreign = make_request(
        Command.PKT_POLICY,
        0,
        0,
        policy_to_use=2,
        core_type=1,
        vcpu_to_control=(4, 0, 0, 0, 0, 0, 0, 0),
        num_vcpu=1,
    )
    assert code(vm1.request(foreign)) == NACK  # host CPU 4 is vm2's


def test_a_policy_installed_while_the_evaluation_sleeps_is_applied(agent: RunningAgent) -> None:
    """With no policy the evaluation sleeps; one installed over a guest channel wakes it
    (PowerManager.policy_installed): WORKLOAD HIGH puts vm1's CPUs at nominal."""
    high = make_request(
        Command.PKT_POLICY,
        0,
        0,
        policy_to_use=2,  # WORKLOAD
        workload=0,  # HIGH
        vcpu_to_control=(0, 1, 0, 0, 0, 0, 0, 0),
        num_vcpu=2,
    )
    time.sleep(0.5)  # policies.period_s is 0.1: the evaluation has found none and slept
    assert code(agent.hosts["vm1.0"].request(high)) == ACK
    for cpu in (2, 3):
        assert wait_for(lambda cpu=cpu: agent.read(cpu, "scaling_governor") == "userspace", 10)
        assert wait_for(lambda cpu=cpu: agent.setspeed(cpu) == agent.table(cpu)[1], 10)


def test_control_socket_refusals_are_one_clear_line(agent: RunningAgent) -> None:
    with pytest.raises(ControlError, match="unknown VM 'nope'"):
        agent.control("show_vm", vm="nope")
    with pytest.raises(ControlError, match="out of range"):
        agent.control("set_cpu_freq", cpu=99, op="max")
    with pytest.raises(ControlError, match="op must be one of"):
        agent.control("set_cpu_freq", cpu=2, op="fast")
    with pytest.raises(ControlError, match="unknown command"):
        agent.control("frobnicate")
    result = agent.control("set_cpu_freq", cpu=5, op="min")
    assert result["freq_khz"] == agent.table(5)[-1] == agent.setspeed(5)


def test_fifo_json_messages_control_their_cpu(tmp_path: Path) -> None:
    agent = RunningAgent(tmp_path, settings={"channels": {"fifo_cpus": "6"}})
    try:
        agent.start()
        fifo = agent.channels_dir / "fifo6"
        assert oct(fifo.stat().st_mode & 0o777) == oct(0o660)
        with open(fifo, "w") as f:
            f.write('{"instruction": {"command": "power", "unit": "SCALE_MIN"}}\n')
        assert wait_for(lambda: agent.read(6, "scaling_governor") == "userspace", 10)
        assert wait_for(lambda: agent.read(6, "scaling_setspeed") == str(agent.table(6)[-1]), 10)
        with open(fifo, "w") as f:
            f.write(
                '{"instruction": {"command": "power", "unit": "SCALE_BOGUS"}}'
                '{"instruction": {"command": "power", "unit": "SCALE_MAX"}}'
            )
        assert wait_for(lambda: agent.read(6, "scaling_setspeed") == str(agent.table(6)[1]), 10)
        assert "SCALE_BOGUS" in agent.log()
    finally:
        agent.close()


def test_sighup_reloads_the_config(tmp_path: Path) -> None:
    agent = RunningAgent(tmp_path)
    try:
        agent.start()
        assert power(agent.hosts["vm2.0"], Unit.SCALE_MIN, 1) == ACK
        text = agent.config_path.read_text().replace("[cpufreq]", '[cpufreq]\nreserved_cpus = "4"')
        agent.config_path.write_text(text)
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "configuration reloaded" in agent.log(), 10)
        assert power(agent.hosts["vm2.0"], Unit.SCALE_MAX, 1) == NACK
        agent.config_path.write_text(text + "\n[bogus]\n")
        agent.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "not reloaded" in agent.log(), 10)
        assert agent.proc.poll() is None
    finally:
        agent.close()


def test_status_reports_counts(agent: RunningAgent) -> None:
    power(agent.hosts["vm1.0"], Unit.SCALE_MIN, 0)
    time.sleep(0)  # the reply is sent after the write: counters are already updated
    status = agent.control("status")
    assert status["requests"] >= 1 and status["acks"] >= 1
    assert status["channels_connected"] == 4
    assert status["libvirt"]["connected"] is True


@pytest.mark.parametrize("driver", ["intel_pstate", "amd-pstate-epp", "cppc_cpufreq"])
def test_every_driver_serves_the_same_requests(tmp_path: Path, driver: str) -> None:
    from vmpower.cpufreq import open_cpufreq
    from vmpower.sysfs import Sysfs

    agent = RunningAgent(tmp_path, driver=driver)
    try:
        agent.start()
        view = open_cpufreq(Sysfs(agent.sysfs_root))
        table, nominal = view.table_khz(2), view.nominal_khz(2)
        vm1 = agent.hosts["vm1.0"]
        assert power(vm1, Unit.SCALE_MAX, 0) == ACK
        assert open_cpufreq(Sysfs(agent.sysfs_root)).state(2).target_khz == nominal
        assert power(vm1, Unit.ENABLE_TURBO, 0) == ACK
        assert open_cpufreq(Sysfs(agent.sysfs_root)).state(2).target_khz == table[0] > nominal
        assert power(vm1, Unit.SCALE_MIN, 0) == ACK
        assert open_cpufreq(Sysfs(agent.sysfs_root)).state(2).target_khz == table[-1]
        assert agent.stop() == 0
    finally:
        agent.close()
