"""A local user must not steer vmpowerd through the file system (issue #11, point 3).

Attacks, against the real daemon: create the channel directory first (or make it, or
a parent, writable), bind a VM's socket in it, pre-create ``fifo<N>`` (or a symbolic
link there), plant a restore journal that names files outside the sysfs root, or one
the daemon did not write (wrong mode or owner, a link). The tests run as root and
play "another user" with ``os.chown`` to uid 4242; the QEMU user with a real user
from /etc/passwd.
"""

from __future__ import annotations

import json
import os
import pwd
import select
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_support import RunningAgent

from vmpower import protocol
from vmpower.devtools import ChannelHost, make_request, wait_for
from vmpower.protocol import Command, ReplyCode, Unit
from vmpower.restore import JOURNAL_NAME

STRANGER = 4242  # a uid nobody trusts
NOBODY = pwd.getpwnam("nobody")
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="plays other users with chown")


@pytest.fixture
def agents() -> Iterator[list[RunningAgent]]:
    made: list[RunningAgent] = []
    yield made
    for agent in made:
        agent.close()


def make(agents: list[RunningAgent], tmp_path: Path, **kwargs: object) -> RunningAgent:
    tmp_path.mkdir(parents=True, exist_ok=True)
    agent = RunningAgent(tmp_path, **kwargs)  # type: ignore[arg-type]
    agents.append(agent)
    return agent


def refused_start(agent: RunningAgent) -> str:
    """Start vmpowerd expecting a refusal: exit 1 and one clear line; returns that line."""
    try:
        agent.start(accept=False)
    except RuntimeError:
        assert agent.proc is not None
        status = agent.proc.wait(30)
        log = agent.log()
        assert status == 1, log
        assert "Traceback" not in log, log
        errors = [line for line in log.splitlines() if " ERROR " in line]
        assert len(errors) == 1, log
        return errors[0]
    pytest.fail(f"vmpowerd started:\n{agent.log()}")


def readable(sock: object, wait_s: float = 0.0) -> bool:
    return bool(select.select([sock], [], [], wait_s)[0])


# -- the channel directory ---------------------------------------------------------------


def test_a_channel_dir_owned_by_another_user_refuses_start(agents, tmp_path) -> None:
    agent = make(agents, tmp_path, channels=())
    os.chown(agent.channels_dir, STRANGER, STRANGER)
    line = refused_start(agent)
    assert f"channels.dir {agent.channels_dir} is owned by uid {STRANGER}" in line


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o1777])
def test_a_channel_dir_writable_by_others_refuses_start(agents, tmp_path, mode) -> None:
    """Sticky does not save the directory itself: others could still create entries."""
    agent = make(agents, tmp_path, channels=())
    os.chmod(agent.channels_dir, mode)
    line = refused_start(agent)
    assert f"channels.dir {agent.channels_dir} is writable by group or others" in line


def _untrusted_parent(tmp_path: Path) -> tuple[Path, str]:
    parent = tmp_path / "theirs"
    (parent / "channels").mkdir(parents=True)
    os.chown(parent, STRANGER, STRANGER)  # they can rename or replace "channels"
    return parent / "channels", f"{parent} is owned by uid {STRANGER}"


def _their_symlink(tmp_path: Path) -> tuple[Path, str]:
    tmp_path.mkdir()
    target = tmp_path / "ours"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    os.lchown(link, STRANGER, STRANGER)  # they decide where it points
    return link, f"symbolic link {link} is owned by uid {STRANGER}"


def _our_symlink_to_their_dir(tmp_path: Path) -> tuple[Path, str]:
    tmp_path.mkdir()
    target = tmp_path / "theirs"
    target.mkdir()
    os.chown(target, STRANGER, STRANGER)
    link = tmp_path / "link"
    link.symlink_to(target)
    return link, f"{target} is owned by uid {STRANGER}"


@pytest.mark.parametrize("attack", [_untrusted_parent, _their_symlink, _our_symlink_to_their_dir])
def test_an_untrusted_parent_or_link_refuses_start(agents, tmp_path, attack) -> None:
    directory, problem = attack(tmp_path / "fs")
    agent = make(agents, tmp_path / "a", channels=(), settings={"channels": {"dir": directory}})
    line = refused_start(agent)
    assert f"channels.dir {directory}" in line and problem in line


def test_a_trusted_link_through_a_sticky_parent_is_served(agents, tmp_path) -> None:
    """/tmp-like parents (root, 1777) and a root-owned link to a good directory are fine."""
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    agent = make(agents, tmp_path / "a")
    link = sticky / "powermonitor"
    link.symlink_to(agent.channels_dir)
    agent.config_path.write_text(
        agent.config_path.read_text().replace(f'"{agent.channels_dir}"', f'"{link}"')
    )
    agent.start()  # every channel accepted
    assert agent.control("status")["channels_connected"] == 4


def test_a_missing_channel_dir_is_created_safe_and_owned_by_the_qemu_user(agents, tmp_path) -> None:
    directory = tmp_path / "run" / "powermonitor"
    agent = make(
        agents,
        tmp_path / "a",
        channels=(),
        settings={"channels": {"dir": directory, "qemu_user": "nobody"}},
    )
    agent.start(accept=False)
    st = directory.stat()
    assert (st.st_uid, st.st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid)  # QEMU can bind there
    assert stat.S_IMODE(st.st_mode) == 0o755


def test_an_unknown_qemu_user_is_not_trusted_and_said_once(agents, tmp_path) -> None:
    directory = tmp_path / "run" / "powermonitor"
    settings = {"channels": {"dir": directory, "qemu_user": "no-such-qemu-user"}}
    agent = make(agents, tmp_path / "a", channels=(), settings=settings)
    agent.start(accept=False)
    assert directory.stat().st_uid == os.geteuid()
    assert agent.log().count("'no-such-qemu-user': no such user") == 1


def test_a_dir_owned_by_the_qemu_user_is_trusted_only_as_the_qemu_user(agents, tmp_path) -> None:
    served = make(agents, tmp_path / "a", settings={"channels": {"qemu_user": "nobody"}})
    os.chown(served.channels_dir, NOBODY.pw_uid, NOBODY.pw_gid)
    served.start()  # every channel accepted
    assert served.control("status")["channels_connected"] == 4
    # the same directory owner, but QEMU runs as someone else here
    refused = make(
        agents, tmp_path / "b", channels=(), settings={"channels": {"qemu_user": "root"}}
    )
    os.chown(refused.channels_dir, NOBODY.pw_uid, NOBODY.pw_gid)
    line = refused_start(refused)
    assert f"is owned by nobody (uid {NOBODY.pw_uid})" in line


# -- sockets -----------------------------------------------------------------------------


def test_a_socket_another_user_owns_is_not_served(agents, tmp_path) -> None:
    # One line per refused socket is the point: no summary of the retries may fall due
    # within the test, however slow the machine (the default interval is 10 s).
    agent = make(agents, tmp_path, settings={"log": {"summary_interval_s": 600}})
    theirs = agent.hosts["vm1.1"]
    os.chown(theirs.path, STRANGER, STRANGER)  # as if uid 4242 had bound it
    # vm2.0 becomes a symbolic link to a socket elsewhere (a trusted one, even)
    elsewhere = ChannelHost(tmp_path / "elsewhere" / "vm2.0")
    try:
        os.unlink(agent.hosts["vm2.0"].path)
        os.symlink(elsewhere.path, agent.hosts["vm2.0"].path)
        agent.start(accept=False)
        trusted = agent.hosts["vm1.0"]
        trusted.accept(30)
        wait_for(
            lambda: (
                readable(theirs.listener)
                or (f"uid {STRANGER}" in agent.log() and "is a symbolic link" in agent.log())
            ),
            30,
        )
        assert not readable(theirs.listener), "the socket of uid 4242 was served"
        assert not readable(elsewhere.listener), "a symbolic link was followed"
        reply = trusted.request(make_request(Command.CPU_POWER, Unit.SCALE_MAX, 0))
        assert protocol.peek_header(reply)[2] == ReplyCode.ACK  # the trusted one is served
        time.sleep(3.5)  # several reconnect ticks (1 s) retry the refused sockets
        assert not readable(theirs.listener) and not readable(elsewhere.listener)
        log = agent.log()
        assert sum(f"uid {STRANGER}" in line for line in log.splitlines()) == 1, log
        assert sum("is a symbolic link" in line for line in log.splitlines()) == 1, log
        vm1 = agent.control("show_vm", vm="vm1")
        channel = next(c for c in vm1["channels"] if c["index"] == 1)
        assert channel["state"] == "disconnected"
        assert f"owned by uid {STRANGER}" in channel["last_error"]
    finally:
        elsewhere.close()


# -- FIFOs -------------------------------------------------------------------------------


def test_a_fifo_another_user_created_is_replaced(agents, tmp_path) -> None:
    agent = make(agents, tmp_path, channels=(), settings={"channels": {"fifo_cpus": "6"}})
    fifo = agent.channels_dir / "fifo6"
    os.mkfifo(fifo, 0o666)
    os.chmod(fifo, 0o666)
    os.chown(fifo, STRANGER, STRANGER)  # they could chmod it back at will
    # and they hold it open, to read what host processes send the daemon
    theirs = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        before = fifo.lstat()
        agent.start(accept=False)
        st = fifo.lstat()
        assert stat.S_ISFIFO(st.st_mode) and st.st_uid == os.geteuid(), st
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_ino != before.st_ino  # a new FIFO, not theirs adopted
        assert agent.control("status")["fifos"] == [6]
        with open(fifo, "wb") as writer:  # a host process's message reaches the daemon only
            writer.write(b'{"policy": {"command": "destroy", "name": "x"}}')
        with pytest.raises(BlockingIOError):
            os.read(theirs, 4096)
    finally:
        os.close(theirs)


def test_a_symlink_at_a_fifo_path_is_replaced_and_its_target_untouched(agents, tmp_path) -> None:
    agent = make(agents, tmp_path, channels=(), settings={"channels": {"fifo_cpus": "6"}})
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    os.chmod(target, 0o644)
    fifo = agent.channels_dir / "fifo6"
    fifo.symlink_to(target)
    agent.start(accept=False)
    st = fifo.lstat()
    assert stat.S_ISFIFO(st.st_mode) and st.st_uid == os.geteuid(), st
    assert target.read_text() == "keep me\n"
    assert stat.S_ISREG(target.stat().st_mode) and stat.S_IMODE(target.stat().st_mode) == 0o644
    assert agent.control("status")["fifos"] == [6]


# -- the restore journal -----------------------------------------------------------------


def plant_journal(agent: RunningAgent, entries: list[dict[str, object]], mode: int = 0o600) -> Path:
    agent.state_dir.mkdir(mode=0o700)
    path = agent.state_dir / JOURNAL_NAME
    data = {"format": "vmpower-restore-journal", "version": 1, "entries": entries}
    path.write_text(json.dumps(data))
    os.chmod(path, mode)
    return path


def governor(agent: RunningAgent, cpu: int) -> Path:
    return agent.sysfs_root / f"devices/system/cpu/cpu{cpu}/cpufreq/scaling_governor"


def test_journal_entries_outside_the_sysfs_root_are_never_written(agents, tmp_path) -> None:
    agent = make(agents, tmp_path, channels=())
    passwd = tmp_path / "etc" / "passwd"
    passwd.parent.mkdir()
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\n")
    shadow = tmp_path / "etc" / "shadow"
    shadow.write_text("root:*:1::::::\n")
    gov = governor(agent, 2)
    original = gov.read_text().strip()
    gov.write_text("userspace\n")  # as a crashed run left it
    plant_journal(
        agent,
        [
            {"path": str(gov), "original": original},
            {"path": str(passwd), "original": "root::0:0:root:/root:/bin/bash"},
            # lexically under the root, really outside it
            {"path": f"{agent.sysfs_root}/../etc/shadow", "original": "root::1::::::"},
        ],
    )
    agent.start(accept=False)
    assert passwd.read_text() == "root:x:0:0:root:/root:/bin/bash\n"
    assert shadow.read_text() == "root:*:1::::::\n"
    assert gov.read_text().strip() == original  # the entry inside is restored
    log = agent.log()
    assert "2 entries lie outside" in log and str(passwd) in log, log
    kept = list(agent.state_dir.glob(f"{JOURNAL_NAME}.refused-*"))
    assert len(kept) == 1  # reported and kept for the operator, not silently dropped
    paths = [e["path"] for e in json.loads(kept[0].read_text())["entries"]]
    assert paths == [str(passwd), f"{agent.sysfs_root}/../etc/shadow"]
    assert agent.control("status")["pending_restore"] == 0  # nothing left to restore
    assert agent.stop() == 0


def identity(path: Path) -> tuple[int, ...]:
    st = path.lstat()
    return (st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns)


def _mode_0644(agent: RunningAgent, path: Path) -> str:
    os.chmod(path, 0o644)
    return f"{path} has mode 0644"


def _owned_by_them(agent: RunningAgent, path: Path) -> str:
    os.chown(path, STRANGER, STRANGER)
    return f"{path} is owned by uid {STRANGER}"


def _a_symlink(agent: RunningAgent, path: Path) -> str:
    elsewhere = agent.tmp_path / "journal-elsewhere.json"
    os.replace(path, elsewhere)
    path.symlink_to(elsewhere)
    return f"{path} is a symbolic link"


@pytest.mark.parametrize("attack", [_mode_0644, _owned_by_them, _a_symlink])
def test_an_untrusted_journal_refuses_start_and_is_left_as_it_is(agents, tmp_path, attack) -> None:
    agent = make(agents, tmp_path, channels=())
    gov = governor(agent, 2)
    original = gov.read_text().strip()
    gov.write_text("userspace\n")
    path = plant_journal(agent, [{"path": str(gov), "original": original}])
    problem = attack(agent, path)
    before = (identity(path), path.read_bytes())
    line = refused_start(agent)
    assert "restore journal not trusted" in line and problem in line
    assert (identity(path), path.read_bytes()) == before  # neither restored nor rewritten
    assert gov.read_text() == "userspace\n"


@pytest.mark.parametrize("owner, mode", [(0, 0o777), (0, 0o1777), (STRANGER, 0o700)])
def test_an_untrusted_state_dir_refuses_start(agents, tmp_path, owner, mode) -> None:
    agent = make(agents, tmp_path, channels=())
    agent.state_dir.mkdir()
    os.chmod(agent.state_dir, mode)
    os.chown(agent.state_dir, owner, owner)
    line = refused_start(agent)
    assert f"state directory {agent.state_dir}" in line


def test_stale_journal_temp_files_are_removed_at_start(agents, tmp_path) -> None:
    """A crash between write and rename leaves the journal's temp file behind."""
    agent = make(agents, tmp_path, channels=())
    agent.state_dir.mkdir(mode=0o700)
    stale = agent.state_dir / f".{JOURNAL_NAME}.2147483646.tmp"  # no such pid
    stale.write_text('{"format": "vmpower-restore-jour')
    agent.start(accept=False)
    assert not stale.exists()
    assert agent.control("status")["pending_restore"] == 0  # the loop runs: stop cleanly
    assert agent.stop() == 0
