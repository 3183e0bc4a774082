"""Packaging: the demo runs from a built wheel; the guest tool as a zipapp on python3.

The wheel is built offline from a copy of the source (pip wheel --no-build-isolation)
and installed into a fresh virtual environment made by the test, which reuses .venv's
third-party packages (libvirt-python, compiled once) through a .pth line, but not
its editable vmpower. The demo then runs from outside the source tree.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_support import RunningAgent

from vmpower.devtools import PtyChannelHost

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from build_guest_pyz import build as build_guest_pyz  # noqa: E402


def run(argv: list[str], cwd: Path, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False
    )


def test_the_demo_runs_from_a_built_wheel(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(
        REPO / "vmpower", source / "vmpower", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(REPO / "share", source / "share")  # the shell completion files
    wheels = tmp_path / "wheels"
    built = run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(source),
        ],
        tmp_path,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("vmpower-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    # Installed where bash-completion and zsh look, under the install prefix.
    data = {name.split(".data/data/", 1)[1] for name in names if ".data/data/" in name}
    assert {
        "share/bash-completion/completions/vmpower",
        "share/zsh/site-functions/_vmpower",
    } <= data, sorted(data)

    venv = tmp_path / "venv"
    made = run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    site = Path(
        run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path
        ).stdout.strip()
    )
    # .venv's packages, as a plain path: its .pth files (the editable vmpower) stay unread.
    (site / "dotvenv.pth").write_text(sysconfig.get_path("purelib") + "\n")
    installed = run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "-q",
            str(wheel),
        ],
        tmp_path,
    )
    assert installed.returncode == 0, installed.stderr

    where = run([str(python), "-c", "import vmpower; print(vmpower.__file__)"], tmp_path)
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr
    demo = run([str(python), "-m", "vmpower.demo"], tmp_path)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "every CPU restored: yes" in demo.stdout
    # The example files are package data too.
    files = run(
        [
            str(python),
            "-c",
            "from importlib import resources; print(sorted(p.name for p in"
            " resources.files('vmpower').joinpath('data').iterdir()))",
        ],
        tmp_path,
    )
    for name in (
        "vmpowerd.toml",
        "vmpowerd.service",
        "vmpower.sysusers.conf",
        "vmpower.tmpfiles.conf",
    ):
        assert name in files.stdout
    # The console scripts work from the wheel.
    version = run([str(venv / "bin" / "vmpower"), "--version"], tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("vmpower 0.")


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[RunningAgent]:
    running = RunningAgent(tmp_path, channels=("vm2.0", "web.prod.1.0"))
    try:
        yield running
    finally:
        running.close()


def system_pythons() -> list[str]:
    """python3 (the system's), and a python3.9 when one runs here: the oldest supported."""
    found = []
    for name in ("python3", "python3.9"):
        path = shutil.which(name)
        if path and subprocess.run([path, "-c", "pass"], capture_output=True).returncode == 0:
            found.append(path)
    return found


def test_the_guest_zipapp_runs_on_the_system_python(agent: RunningAgent, tmp_path: Path) -> None:
    pyz = build_guest_pyz(tmp_path / "build" / "vmpower-guest.pyz")
    port = PtyChannelHost(agent.channels_dir / "vm1.0")
    try:
        agent.start()
        port.accept()
        for python in system_pythons():
            helped = run([python, "-I", str(pyz), "--help"], tmp_path, 60)
            assert helped.returncode == 0, (python, helped.stderr)
            assert "set_cpu_freq" in helped.stdout
            # A real request, answered by the real daemon through the channel.
            asked = run(
                [
                    python,
                    "-I",
                    str(pyz),
                    "--timeout",
                    "10",
                    "--device",
                    port.device,
                    "set_cpu_freq",
                    "0",
                    "min",
                ],
                tmp_path,
                60,
            )
            assert asked.returncode == 0, (python, asked.stderr)
            assert asked.stdout.strip() == "vCPU 0 min: ACK"
            assert agent.setspeed(2) == agent.table(2)[-1]
    finally:
        port.close()
    # Standard library only: nothing but the guest tool's own modules inside.
    import zipfile

    names = {n.split("/")[1] for n in zipfile.ZipFile(pyz).namelist() if n.count("/") >= 1} - {""}
    assert names == {"__init__.py", "errors.py", "protocol", "guest"}
