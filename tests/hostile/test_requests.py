"""Hostile and faulty requests on a power channel (issue #11, points 1, 6, 7 and 9).

* 1: a guest flooding refused requests grows the log by a bounded amount per second,
  and every distinct reason still reaches it (the real daemon, its stderr);
* 6: a CPU whose cpufreq files cannot be read is that request's NACK; the rest of the
  same read is answered (docs/protocol.md, host rule 2; the real daemon);
* 7: an ACK means applied, a NACK means untouched: a change that fails half-way puts
  every file it wrote back (in process, on real parts: libvirt's test driver, a
  simulated tree whose writes obey the kernel's rules, the restore journal);
* 9: a WORKLOAD policy with a workload that is not HIGH, MEDIUM or LOW is refused.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import test_power
from agent_support import RunningAgent
from test_power import cpu_power, settings

from vmpower import protocol
from vmpower.cpufreq.simulate import UNSUPPORTED, KernelSysfs
from vmpower.devtools import make_request, wait_for
from vmpower.errors import VmpowerError
from vmpower.protocol import Command, CoreType, PolicyType, ReplyCode, Unit

ACK, NACK = int(ReplyCode.ACK), int(ReplyCode.NACK)
POLICY = "devices/system/cpu/cpufreq/policy"
BOOST = "devices/system/cpu/cpufreq/boost"
TURBO_KHZ = 2_301_000  # the simulated acpi-cpufreq table's _PSS turbo entry
NOMINAL_KHZ = 2_300_000
MIN_KHZ = 1_200_000


def code(reply: bytes) -> int:
    return protocol.peek_header(reply)[2]


# -- 1. a refusal flood ---------------------------------------------------------------------

FLOOD_S = 3.0
SUMMARY_S = 1.0
# What the log may grow by: the target is < 1 kB/s at the default 10 s interval;
# here the interval is 1 s, so one summary line per second is allowed for, plus the
# lines the daemon writes anyway (the first occurrence of each reason, the channel).
LOG_BYTES_PER_S = 1000
LOG_BYTES_FIXED = 4000


def test_a_refusal_flood_grows_the_log_by_little_and_every_reason_reaches_it(
    tmp_path: Path,
) -> None:
    # vm1 owns host CPUs 2 and 3: CPU 4 is vm2's.
    not_pinned = make_request(Command.CPU_POWER, Unit.SCALE_MAX, 4, core_type=CoreType.PHYSICAL)
    spoofed = make_request(Command.CPU_POWER, Unit.SCALE_MAX, 0, vm_name="vm2")
    bad_unit = make_request(Command.CPU_POWER, 99, 0)
    reasons = ("host CPU 4 is not pinned to vm1", "'vm2' is not this channel's VM", "unit 99")
    chunk = not_pinned * 98 + spoofed + bad_unit  # 100 packets, every one refused
    agent = RunningAgent(
        tmp_path, settings={"log": {"level": "info", "summary_interval_s": SUMMARY_S}}
    )
    try:
        agent.start()
        vm1 = agent.hosts["vm1.0"]
        assert vm1.conn is not None
        conn = vm1.conn
        stop = threading.Event()
        replies = [0]

        def drain() -> None:  # the guest reads its NACKs (else they are dropped and logged)
            conn.settimeout(0.2)
            while not stop.is_set():
                try:
                    replies[0] += len(conn.recv(1 << 20))
                except TimeoutError:
                    continue
                except OSError:
                    return

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        assert wait_for(lambda: "ready" in agent.log(), 30)
        size_before = agent.log_path.stat().st_size
        started = time.monotonic()
        sent = 0
        while time.monotonic() - started < FLOOD_S:
            conn.sendall(chunk)
            sent += 100
        assert wait_for(
            lambda: agent.control("show_vm", vm="vm1")["channels"][0]["requests"] == sent, 60
        ), "the daemon did not read every request"
        time.sleep(2.5 * SUMMARY_S)  # the last window's summary comes out
        elapsed_s = time.monotonic() - started
        channel = agent.control("show_vm", vm="vm1")["channels"][0]
        stop.set()
        reader.join(5)
        grown = agent.log_path.stat().st_size - size_before
        text = agent.log()
        # the counters stay exact whatever the log says
        assert channel["nacks"] == sent
        bound = LOG_BYTES_PER_S * elapsed_s + LOG_BYTES_FIXED
        assert grown < bound, (
            f"{sent} refused requests in {elapsed_s:.1f} s grew the log by {grown} bytes"
            f" (bound {bound:.0f}); its end:\n{text[-2000:]}"
        )
        for reason in reasons:
            assert reason in text, f"{reason!r} never reached the log"
        assert "requests refused in the last" in text  # the counts, in a summary
        assert agent.stop() == 0
    finally:
        agent.close()


# -- 6. every request answered --------------------------------------------------------------


def test_a_cpu_whose_table_cannot_be_read_is_a_nack_and_the_rest_of_the_read_is_answered(
    tmp_path: Path,
) -> None:
    agent = RunningAgent(tmp_path, settings={"log": {"level": "info"}})
    # vm1's vCPU 1 runs on host CPU 3: its driver's table is garbage before the daemon
    # first reads it, so the table look-up fails on the request path.
    table = agent.sysfs_root / f"{POLICY}3" / "scaling_available_frequencies"
    table.write_text("garbage\n")
    try:
        agent.start()
        agent.control("set_query", vm="vm1", enable=True)
        vm1 = agent.hosts["vm1.0"]
        read = [
            make_request(Command.CPU_POWER, Unit.SCALE_MAX, 0),  # host CPU 2: fine
            make_request(Command.CPU_POWER, Unit.SCALE_MAX, 1),  # host CPU 3: no table
            make_request(Command.QUERY_FREQ, 0, 1),  # host CPU 3 again, a query
            make_request(Command.CPU_POWER, Unit.SCALE_MIN, 0),  # fine
        ]
        vm1.send(b"".join(read))  # one read's worth
        replies = [vm1.recv_exact(protocol.reply_size(p), timeout_s=10) for p in read]
        assert [code(r) for r in replies] == [ACK, NACK, NACK, ACK]
        assert agent.setspeed(2) == MIN_KHZ
        assert agent.read(3, "scaling_governor") == "schedutil"  # untouched
        # the channel goes on: the next read is served
        assert code(vm1.request(read[0])) == ACK
        assert "not a list of kHz" in agent.log()  # the reason reached the operator
        assert "Traceback" not in agent.log()
        assert agent.stop() == 0
    finally:
        agent.close()


# -- 9. policy validation -------------------------------------------------------------------


def test_a_workload_policy_with_an_unknown_workload_is_refused(tmp_path: Path) -> None:
    agent = RunningAgent(tmp_path, settings={"log": {"level": "info"}})
    try:
        agent.start()
        vm1 = agent.hosts["vm1.0"]

        def policy(**fields: object) -> bytes:
            return make_request(
                Command.PKT_POLICY,
                0,
                0,
                vcpu_to_control=(0, 1, 0, 0, 0, 0, 0, 0),
                num_vcpu=2,
                **fields,
            )

        bad = policy(policy_to_use=int(PolicyType.WORKLOAD), workload=7)
        assert code(vm1.request(bad)) == NACK
        assert agent.control("show_policies") == []
        assert wait_for(lambda: "workload 7" in agent.log(), 5)
        # DPDK accepts a TIME policy listing no hours (it then does nothing): so does vmpower
        assert code(vm1.request(policy(policy_to_use=int(PolicyType.TIME)))) == ACK
        good = policy(policy_to_use=int(PolicyType.WORKLOAD), workload=2)  # LOW
        assert code(vm1.request(good)) == ACK
        assert [p["owner"] for p in agent.control("show_policies")] == ["vm1"]
        assert agent.stop() == 0
    finally:
        agent.close()


# -- 7. ACK means applied, NACK means untouched (in process) ---------------------------------
#
# tests/data/node.xml: vm1's vCPUs 0 and 1 run on host CPUs 2 and 3. The simulated CPUs
# run schedutil at 1.6 GHz unless the rig says otherwise.


make_rig = test_power.make_rig  # the fixture: the in-process rig of tests/test_power.py


def codes(replies: list[bytes]) -> list[int]:
    return [code(reply) for reply in replies]


def test_turbo_switched_on_then_a_failed_write_switches_it_off_again(make_rig) -> None:  # type: ignore[no-untyped-def]
    # Under userspace already, a turbo request writes the global boost switch first,
    # then scaling_setspeed; the latter is a directory here (EISDIR, root or not).
    rig = make_rig(governor="userspace", boost="0")
    setspeed = rig.root / f"{POLICY}2" / "scaling_setspeed"
    setspeed.unlink()
    setspeed.mkdir()
    before = settings(rig.root)
    assert codes(rig.exchange("vm1", cpu_power(Unit.ENABLE_TURBO, 0))) == [NACK]
    assert settings(rig.root) == before, "a NACKed request left files changed"
    assert (rig.root / BOOST).read_text().strip() == "0"
    assert rig.wish_khz(2) == {}
    assert rig.pm.stats.write_failures == 1
    # the next CPU asking for turbo finds the switch as it is, and turns it on itself
    assert codes(rig.exchange("vm1", cpu_power(Unit.ENABLE_TURBO, 1))) == [ACK]
    assert (rig.root / BOOST).read_text().strip() == "1"
    assert int(rig.file(3, "scaling_setspeed")) == TURBO_KHZ
    rig.pm.restore_all()
    assert (rig.root / BOOST).read_text().strip() == "0"


def test_governor_switched_then_the_change_fails_every_file_goes_back(make_rig) -> None:  # type: ignore[no-untyped-def]
    # The kernel takes the userspace governor, then fails the rest of the change
    # (scaling_setspeed follows scaling_cur_freq, which cannot be read here).
    rig = make_rig()
    cur = rig.root / f"{POLICY}2" / "scaling_cur_freq"
    cur.unlink()
    cur.mkdir()
    before = settings(rig.root)
    assert codes(rig.exchange("vm1", cpu_power(Unit.SCALE_MAX, 0))) == [NACK]
    assert rig.file(2, "scaling_governor") == "schedutil"
    assert rig.file(2, "scaling_setspeed") == UNSUPPORTED
    assert settings(rig.root) == before, "a NACKed request left files changed"
    assert rig.wish_khz(2) == {}
    assert rig.journal.pending() == {}  # nothing vmpower changed is left to restore


def test_a_cpu_taken_back_after_an_outside_change_fails_back_to_that_change(make_rig) -> None:  # type: ignore[no-untyped-def]
    # Files touched in an earlier turn: what they held before *this* turn comes back.
    rig = make_rig()
    assert codes(rig.exchange("vm1", cpu_power(Unit.SCALE_MIN, 0))) == [ACK]
    assert rig.file(2, "scaling_governor") == "userspace"
    # Someone puts CPU 2 back under schedutil: the next write is refused, and vmpower
    # takes the governor again on the one after; that change fails half-way.
    KernelSysfs(rig.root).write(f"{POLICY}2/scaling_governor", "schedutil")
    assert codes(rig.exchange("vm1", cpu_power(Unit.SCALE_UP, 0))) == [NACK]
    cur = rig.root / f"{POLICY}2" / "scaling_cur_freq"
    cur.unlink()
    cur.mkdir()
    before = settings(rig.root)
    assert codes(rig.exchange("vm1", cpu_power(Unit.SCALE_UP, 0))) == [NACK]
    assert settings(rig.root) == before
    assert rig.file(2, "scaling_governor") == "schedutil"
    assert rig.wish_khz(2) == {"vm1": MIN_KHZ}


def test_an_operator_write_failing_in_the_same_turn_turns_the_guests_acks_into_nacks(
    make_rig,  # type: ignore[no-untyped-def]
) -> None:
    rig = make_rig(governor="userspace")
    assert codes(rig.exchange("vm1", cpu_power(Unit.SCALE_MIN, 0))) == [ACK]
    assert int(rig.file(2, "scaling_setspeed")) == MIN_KHZ
    # A guest's request, then in the same turn an operator's whose write fails (the
    # setspeed attribute is gone: the CPU went away under the operator).
    rig.read("vm1", cpu_power(Unit.SCALE_UP, 0), cpu_power(Unit.SCALE_UP, 0))
    rig.cpufreq.close()  # the next write opens the attribute again
    setspeed = rig.root / f"{POLICY}2" / "scaling_setspeed"
    setspeed.unlink()
    setspeed.mkdir()
    with pytest.raises(VmpowerError, match="write failed"):
        rig.pm.set_cpu_freq("operator", 2, Unit.SCALE_MAX)
    rig.end_turn()
    assert codes(rig.guest("vm1").replies(2)) == [NACK, NACK], "ACKed though nothing was applied"
    assert rig.wish_khz(2) == {"vm1": MIN_KHZ}
    stats = rig.pm.stats
    assert (stats.requests, stats.acks, stats.nacks) == (3, 1, 2)
