"""`make run`'s demo runs end to end and leaves nothing behind."""

import subprocess
import sys
import tempfile
from pathlib import Path


def test_demo_shows_requests_refusals_tools_and_restores_every_cpu() -> None:
    before = set(Path(tempfile.gettempdir()).glob("vmpower-demo-*"))
    result = subprocess.run(
        [sys.executable, "-m", "vmpower.demo"], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "vm1 vCPU0 → max" in out and "→ ACK" in out
    assert "vm1 pretending to be vm2 → max" in out and "→ NACK" in out
    assert "FREQ_LIST" in out and "CAPS_LIST" in out
    assert "vCPU 1 max: ACK" in out  # the guest tool through its pseudo-terminal port
    assert "$ vmpower show_cpus" in out and "reserved" in out
    assert "every CPU restored: yes" in out
    assert set(Path(tempfile.gettempdir()).glob("vmpower-demo-*")) == before
