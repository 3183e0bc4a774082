"""The MSRs BRANCH_RATIO programs are journaled (issue #11, point 11).

The policy programs IA32_PERFEVTSEL0/1 of its CPUs. Their originals used to live in
memory only, so a crash left the PMU programmed. Now they are in the restore journal
(device path, offset, original bytes) before the first write, and the next start puts
them back. The daemon runs for real, on a simulated msr tree: regular files read and
written at the MSR's offset, as /dev/cpu/<n>/msr is (stride 1, as the daemon uses it:
the two 8-byte selects overlap in a file, so the bytes 0x186..0x18e are compared).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_support import RunningAgent

from vmpower import protocol
from vmpower.devtools import make_request, wait_for
from vmpower.policies import IA32_PERFEVTSEL0, IA32_PERFEVTSEL1
from vmpower.protocol import Command, PolicyType, ReplyCode
from vmpower.restore import JOURNAL_NAME

CPUS = (2, 3)  # vm1's vCPUs 0 and 1 (tests/data/node.xml)
FIRST = IA32_PERFEVTSEL0
SPAN = IA32_PERFEVTSEL1 + 8 - IA32_PERFEVTSEL0  # both selects' bytes, overlapping
ORIGINAL = bytes(range(0x31, 0x31 + SPAN))  # not what the policy programs


def build_msr_tree(root: Path) -> None:
    for cpu in range(8):
        path = root / str(cpu) / "msr"
        path.parent.mkdir(parents=True)
        image = bytearray(4096)
        image[FIRST : FIRST + SPAN] = ORIGINAL
        path.write_bytes(bytes(image))


def selects(root: Path, cpu: int) -> bytes:
    with open(root / str(cpu) / "msr", "rb") as f:
        f.seek(FIRST)
        return f.read(SPAN)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[RunningAgent]:
    msr_root = tmp_path / "msr"
    build_msr_tree(msr_root)
    running = RunningAgent(
        tmp_path,
        settings={"policies": {"msr_root": str(msr_root), "branch_period_s": 0.01}},
    )
    running.msr_root = msr_root  # type: ignore[attr-defined]
    try:
        yield running.start()
    finally:
        running.close()


def install_branch_ratio(agent: RunningAgent) -> None:
    packet = make_request(
        Command.PKT_POLICY,
        0,
        0,
        policy_to_use=int(PolicyType.BRANCH_RATIO),
        vcpu_to_control=(0, 1, 0, 0, 0, 0, 0, 0),
        num_vcpu=2,
    )
    reply = agent.hosts["vm1.0"].request(packet)
    assert protocol.peek_header(reply)[2] == ReplyCode.ACK


def programmed(agent: RunningAgent) -> bool:
    root = agent.msr_root  # type: ignore[attr-defined]
    return all(selects(root, cpu) != ORIGINAL for cpu in CPUS)


def restored(agent: RunningAgent) -> bool:
    root = agent.msr_root  # type: ignore[attr-defined]
    return all(selects(root, cpu) == ORIGINAL for cpu in range(8))


def test_msrs_are_restored_at_the_next_start_after_a_crash(agent: RunningAgent) -> None:
    install_branch_ratio(agent)
    assert wait_for(lambda: programmed(agent), 30), agent.log()
    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    assert programmed(agent)  # the crash left the PMU programmed
    path = agent.state_dir / JOURNAL_NAME
    assert path.exists(), "the event selects' originals were not journaled"
    journal = json.loads(path.read_text())
    msr_entries = [e for e in journal["entries"] if "offset" in e]
    assert {(e["path"], e["offset"]) for e in msr_entries} == {
        (str(agent.msr_root / str(cpu) / "msr"), msr)  # type: ignore[attr-defined]
        for cpu in CPUS
        for msr in (IA32_PERFEVTSEL0, IA32_PERFEVTSEL1)
    }
    agent.socket.unlink()  # the killed daemon's: start() waits for the new one's
    agent.start()  # a fresh daemon: recover() runs before it serves anything
    assert restored(agent), [selects(agent.msr_root, c).hex() for c in CPUS]  # type: ignore[attr-defined]
    assert agent.control("status")["pending_restore"] == 0  # the journal is empty again
    assert agent.stop() == 0


def test_msrs_are_restored_when_the_policy_goes_and_leave_the_journal(
    agent: RunningAgent,
) -> None:
    install_branch_ratio(agent)
    assert wait_for(lambda: programmed(agent), 30), agent.log()
    reply = agent.hosts["vm1.0"].request(make_request(Command.PKT_POLICY_REMOVE))
    assert protocol.peek_header(reply)[2] == ReplyCode.ACK
    assert wait_for(lambda: restored(agent), 30)
    assert wait_for(lambda: agent.control("status")["pending_restore"] == 0, 30)
    install_branch_ratio(agent)  # and again, then a normal stop
    assert wait_for(lambda: programmed(agent), 30)
    assert agent.stop() == 0
    assert restored(agent)
    assert not (agent.state_dir / JOURNAL_NAME).exists()


def test_an_msr_entry_outside_the_msr_root_is_never_written(tmp_path: Path) -> None:
    msr_root = tmp_path / "msr"
    build_msr_tree(msr_root)
    outside = tmp_path / "elsewhere" / "msr"
    outside.parent.mkdir()
    outside.write_bytes(bytes(4096))
    inside = msr_root / "2" / "msr"
    with open(inside, "r+b") as f:  # as a crashed run left it
        f.seek(FIRST)
        f.write(b"\xc4\xc5\x53" + bytes(SPAN - 3))
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    entries = [
        {"path": str(inside), "offset": FIRST, "bytes": ORIGINAL[:8].hex()},
        {"path": str(inside), "offset": FIRST + 1, "bytes": ORIGINAL[1:9].hex()},
        {"path": str(outside), "offset": FIRST, "bytes": "ff" * 8},
    ]
    journal = state / JOURNAL_NAME
    journal.write_text(
        json.dumps({"format": "vmpower-restore-journal", "version": 2, "entries": entries})
    )
    os.chmod(journal, 0o600)
    agent = RunningAgent(tmp_path, channels=(), settings={"policies": {"msr_root": str(msr_root)}})
    try:
        agent.start(accept=False)
        assert selects(msr_root, 2) == ORIGINAL
        assert outside.read_bytes() == bytes(4096)
        assert f"{outside}@{FIRST:#x}" in agent.log()
        assert agent.control("status")["pending_restore"] == 0
        assert agent.stop() == 0
    finally:
        agent.close()
