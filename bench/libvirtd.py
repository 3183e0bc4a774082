"""The system libvirtd for benches that need a real one (bench_hostile, bench_state).

Its shared test driver (``test+unix:///default``) stands in for a hypervisor. A bench
starts it only when none answers, with its pid file and log in the bench's own
directory, and stops it by its PID (``bench_agent.stop_process``). bench_scale runs a
private one in session mode instead (its own node XML): ``bench_scale._PrivateLibvirtd``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from vmpower.devtools import wait_for

TEST_URI = "test+unix:///default"  # libvirtd's shared instance of the test driver
START_TIMEOUT_S = 60.0


def binary() -> Path | None:
    """The libvirtd program, or None when libvirt-daemon is not installed."""
    found = Path(shutil.which("libvirtd") or "/usr/sbin/libvirtd")
    return found if found.is_file() else None


def answers(uri: str = TEST_URI) -> bool:
    """Whether a libvirtd serves ``uri`` now (its errors are not printed)."""
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        libvirt.open(uri).close()
    except libvirt.libvirtError:
        return False
    return True


def start(workdir: Path) -> subprocess.Popen[bytes]:
    """Start libvirtd (``libvirtd.pid`` and ``libvirtd.log`` in ``workdir``) and wait
    until it answers; RuntimeError when it is missing, exits or stays silent."""
    program = binary()
    if program is None:
        raise RuntimeError("libvirtd is not installed")
    with open(workdir / "libvirtd.log", "wb") as log_file:
        proc = subprocess.Popen(
            [str(program), "--pid-file", str(workdir / "libvirtd.pid")],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    if not wait_for(lambda: proc.poll() is not None or answers(), START_TIMEOUT_S, 0.2):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"libvirtd did not answer within {START_TIMEOUT_S:g} s")
    if proc.poll() is not None:
        raise RuntimeError(f"libvirtd exited with {proc.returncode}")
    return proc
