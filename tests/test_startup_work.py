"""Start-up work that must stay small (issue #16): reading every domain asks libvirt
for the states in one call, not one ``info()`` per running VM; a daemon without
metrics.listen never imports the HTTP endpoint (prometheus_client, http.server)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from agent_support import LibvirtCalls, render_node

from vmpower.hypervisor import Hypervisor, VmState
from vmpower.hypervisor.libvirt_events import EventInbox, EventLoop
from vmpower.hypervisor.session import LibvirtSession


@pytest.fixture
def session(tmp_path: Path) -> Iterator[LibvirtSession]:
    channels = tmp_path / "ch"
    channels.mkdir()
    node = render_node(tmp_path, channels)
    EventLoop.ensure_running()
    s = LibvirtSession(f"test://{node}", channels, EventInbox(lambda: None), time.monotonic)
    yield s
    s.close()


def _truth(session: LibvirtSession) -> dict[str, tuple[VmState, int]]:
    """Each domain's state and vCPU count as info() gives them (the reference)."""
    from vmpower.hypervisor.session import _STATES

    assert session.conn is not None
    out = {}
    for dom in session.conn.listAllDomains(0):
        state, _max, _mem, vcpus, _t = dom.info()
        out[dom.name()] = (_STATES.get(state, VmState.OTHER), vcpus)
    return out


def test_reading_every_domain_asks_info_only_of_vms_with_no_live_map(
    session: LibvirtSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = LibvirtCalls(monkeypatch)
    opened = session.open(lambda _name: True)
    running = [n for n, read in opened.vms.items() if read.info.active]
    assert len(running) >= 4  # the node file's running and paused VMs
    # Only the shut-off VM (no live map to give its vCPU count) was asked apart.
    assert sorted(calls.names("info")) == sorted(n for n in opened.vms if n not in running)
    # ... and the registry says what info() says.
    truth = _truth(session)
    assert {n: (r.info.state, r.info.vcpu_count) for n, r in opened.vms.items()} == truth


def test_without_bulk_states_each_vm_is_asked_as_before(
    session: LibvirtSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(_conn: libvirt.virConnect, _stats: int, _flags: int) -> None:
        exc = libvirt.libvirtError("this function is not supported by the connection driver")
        exc.err = (libvirt.VIR_ERR_NO_SUPPORT, 0, "no support", 2, None, None, None, 0, 0)
        raise exc

    monkeypatch.setattr(libvirt.virConnect, "getAllDomainStats", unsupported)
    calls = LibvirtCalls(monkeypatch)
    opened = session.open(lambda _name: True)
    assert session.state_listings_unsupported == 1
    assert sorted(calls.names("info")) == sorted(opened.vms)
    monkeypatch.undo()
    truth = _truth(session)
    assert {n: (r.info.state, r.info.vcpu_count) for n, r in opened.vms.items()} == truth


def test_the_registry_reads_each_running_vm_without_info(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    channels = tmp_path / "ch"
    channels.mkdir()
    node = render_node(tmp_path, channels)
    calls = LibvirtCalls(monkeypatch)
    hv = Hypervisor(f"test://{node}", channels)
    try:
        hv.connect()
        refreshed = len(calls.names("info"))
        hv.refresh()  # every VM read again: the same single call for the states
        assert len(calls.names("info")) == 2 * refreshed
        assert refreshed == sum(1 for vm in hv.vms().values() if not vm.active)
    finally:
        hv.close()


def _imported_after(code: str) -> dict[str, bool]:
    names = ("prometheus_client", "http.server", "vmpower.metrics_http")
    probe = (
        f"{code}\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {names!r}}}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.splitlines()[-1])


def test_the_daemon_does_not_import_the_metrics_endpoint_unless_configured() -> None:
    assert not any(_imported_after("import vmpower.daemon").values())


def test_the_endpoint_keeps_its_import_path() -> None:
    imported = _imported_after("from vmpower.metrics import MetricsExporter")
    assert all(imported.values())
