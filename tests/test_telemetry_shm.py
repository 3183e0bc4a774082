"""Batch value buffers and session files in the real /dev/shm, with real processes."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmpower.errors import TelemetryError
from vmpower.telemetry.catalog import Request
from vmpower.telemetry.session import (
    SessionSpec,
    check_key,
    new_key,
    process_ids,
    process_start_ticks,
    remove_session_files,
    session_paths,
)
from vmpower.telemetry.shm import KIND_CONTROLS, KIND_SIGNALS, ValueBuffer, file_facts

SHM = Path("/dev/shm")
NOBODY = 65534


@pytest.fixture
def key() -> Iterator[str]:
    """A fresh session key; the test fails if a file of it is left in /dev/shm."""
    k = new_key(os.getpid())
    yield k
    left = [p for p in session_paths(SHM, k).all() if p.exists()]
    remove_session_files(SHM, k)
    assert left == []


def test_buffer_is_private_to_its_owner(key: str) -> None:
    path = session_paths(SHM, key).signals
    buf = ValueBuffer.create(path, KIND_SIGNALS, 3, owner=(NOBODY, NOBODY))
    try:
        assert file_facts(path) == (0o600, NOBODY, NOBODY)
        assert [math.isnan(v) for v in buf.read()] == [True, True, True]
    finally:
        buf.close()
        path.unlink()


def test_create_refuses_an_existing_name_or_symlink(key: str, tmp_path: Path) -> None:
    path = session_paths(SHM, key).signals
    target = tmp_path / "victim"
    target.write_text("keep me")
    path.symlink_to(target)
    try:
        with pytest.raises(TelemetryError, match="already exists"):
            ValueBuffer.create(path, KIND_SIGNALS, 1)
        assert target.read_text() == "keep me"
    finally:
        path.unlink()


def test_open_checks_the_header(key: str) -> None:
    paths = session_paths(SHM, key)
    buf = ValueBuffer.create(paths.signals, KIND_SIGNALS, 2)
    try:
        buf.write([1.5, 2.5])
        reader = ValueBuffer.open(paths.signals, KIND_SIGNALS, writable=False, count=2)
        assert reader.read() == [1.5, 2.5]
        assert reader.sequence == 2
        reader.close()
        with pytest.raises(TelemetryError, match="a signals buffer, expected controls"):
            ValueBuffer.open(paths.signals, KIND_CONTROLS, writable=True)
        with pytest.raises(TelemetryError, match="holds 2 values, expected 3"):
            ValueBuffer.open(paths.signals, KIND_SIGNALS, writable=False, count=3)
        paths.controls.write_bytes(b"\0" * 64)
        with pytest.raises(TelemetryError, match="bad magic"):
            ValueBuffer.open(paths.controls, KIND_CONTROLS, writable=True)
        with pytest.raises(TelemetryError, match="expected 2 values, got 1"):
            buf.write([1.0])
    finally:
        buf.close()
        remove_session_files(SHM, key)


def test_readers_never_see_a_torn_sample(key: str) -> None:
    """A writer process stores samples whose values are all equal; readers check that."""
    count = 64
    path = session_paths(SHM, key).signals
    buf = ValueBuffer.create(path, KIND_SIGNALS, count)
    buf.write([0.0] * count)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            writer = ValueBuffer.open(path, KIND_SIGNALS, writable=True, count=count)
            for k in range(1, 200_001):
                writer.write([float(k)] * count)
            code = 0
        finally:
            os._exit(code)
    seen = set()
    try:
        while True:
            sample = buf.read()
            assert len(set(sample)) == 1, f"torn sample: {sorted(set(sample))[:4]}"
            seen.add(sample[0])
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                assert os.waitstatus_to_exitcode(status) == 0
                break
        assert buf.read() == [200_000.0] * count
        assert len(seen) > 1  # the reader did run while the writer wrote
    finally:
        buf.close()
        path.unlink()


def test_a_writer_stuck_mid_write_makes_reads_fail_not_hang(key: str) -> None:
    path = session_paths(SHM, key).signals
    buf = ValueBuffer.create(path, KIND_SIGNALS, 1)
    try:
        buf._words[2] = 1  # odd: what a writer killed inside write() leaves
        with pytest.raises(TelemetryError, match="no stable sample"):
            buf.read(max_wait_s=0.05)
    finally:
        buf.close()
        path.unlink()


def test_session_names_and_stale_cleanup_use_one_function(key: str) -> None:
    paths = session_paths(SHM, key)
    assert paths.signals.name == f"vmpower-batch-{key}-signals"
    assert paths.controls.name == f"vmpower-batch-{key}-controls"
    names = [p.name for p in paths.all()]
    assert len(set(names)) == len(names)
    assert all(name.startswith(f"vmpower-batch-{key}-") for name in names)
    for path in paths.all():
        path.write_bytes(b"stale")
    assert sorted(remove_session_files(SHM, key)) == sorted(paths.all())
    assert not any(p.exists() for p in paths.all())


def test_keys_are_checked() -> None:
    assert check_key(new_key(42)).startswith("42-")
    for bad in ("../x", "42", "42-ZZZZZZZZ", 42, None):
        with pytest.raises(TelemetryError, match="bad batch server key"):
            check_key(bad)


def test_session_spec_round_trip(tmp_path: Path) -> None:
    spec = SessionSpec(
        key=new_key(7),
        shm_dir="/dev/shm",
        client_pid=7,
        client_uid=1000,
        client_gid=100,
        client_start_ticks=12345,
        signals=(Request("VM_ENERGY", "vm", "web.prod.1"), Request("TIME", "board", 0)),
        controls=(Request("CPU_FREQUENCY_MAX_CONTROL", "cpu", 3),),
        period_s=0.25,
        sysfs_root="/sys",
        powercap_root="/sys/class/powercap",
        proc_root="/proc",
        libvirt_uri="qemu:///system",
    )
    spec.save(tmp_path)
    assert SessionSpec.load(tmp_path) == spec
    (tmp_path / "session.json").write_text('{"key": "7-00000000", "shm_dir": 3}')
    with pytest.raises(TelemetryError, match=r"session\.json: shm_dir must be a non-empty string"):
        SessionSpec.load(tmp_path)


def test_process_identity_for_the_pid_reuse_guard() -> None:
    ticks = process_start_ticks(os.getpid())
    assert ticks is not None and ticks > 0
    assert process_ids(os.getpid()) == (os.geteuid(), os.getegid())
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    assert process_start_ticks(pid) is None
    assert process_ids(pid) is None
