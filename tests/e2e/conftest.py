"""Fixtures of the end-to-end tests: the prepared host, the booted TCG guest, vmpowerd.

``e2e_host`` (session): one e2e session per host at a time (a lock in the cache), the
system packages and the cache (kernel, Python, DPDK client, base initramfs).
Per test, nothing is left behind: ``libvirtd`` is stopped by its PID (when the test
started it), ``guest_vm`` is destroyed and undefined with its sockets gone and no QEMU
left, and ``new_agent``'s vmpowerd subprocesses are killed if a test left one running.

A part that cannot be installed, built or started fails the test with the reason; an
e2e test is never skipped.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.e2e_env import (
    CACHE,
    Cache,
    E2eAgent,
    E2eHost,
    GuestVm,
    Libvirtd,
    SetupError,
    Timings,
    build_initrd,
    ensure_host_packages,
    exclusive,
    wait_until,
)

# The build cache holds a Python standard library: nothing there is a test of ours.
collect_ignore = ["cache"]

VM_NAME = "vmpower-e2e"
LOCK_WAIT_S = 300


@pytest.fixture(scope="session")
def e2e_host() -> Iterator[E2eHost]:
    timings = Timings()
    try:
        with exclusive(CACHE / "e2e.lock", LOCK_WAIT_S):
            packages_s = ensure_host_packages()
            start = time.monotonic()
            cache = Cache()
            cache.base_initramfs()
            cache.dpdk_client()
            cache_s = time.monotonic() - start
            timings.record("setup", packages_s=packages_s, cache_s=cache_s)
            yield E2eHost(cache, timings)
    except SetupError as exc:
        pytest.fail(f"e2e environment: {exc}", pytrace=False)


@pytest.fixture
def libvirtd(e2e_host: E2eHost) -> Iterator[Libvirtd]:
    daemon = Libvirtd(CACHE)
    try:
        daemon.start()
    except SetupError as exc:
        pytest.fail(f"e2e libvirtd: {exc}", pytrace=False)
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def guest_vm(e2e_host: E2eHost, libvirtd: Libvirtd) -> Iterator[GuestVm]:
    # Under /tmp, not pytest's deep tmp_path: AF_UNIX socket paths hold 107 bytes at most.
    run_dir = Path(tempfile.mkdtemp(prefix="vmpower-e2e-"))
    vm: GuestVm | None = None
    try:
        try:
            initrd = build_initrd(e2e_host.cache, run_dir)
            vm = GuestVm(VM_NAME, run_dir, e2e_host.cache.kernel(), initrd)
            vm.define()
            boot_s = vm.start()
        except SetupError as exc:
            pytest.fail(f"e2e guest: {exc}", pytrace=False)
        uptime_s = float(vm.control.hello["hello"])
        e2e_host.timings.record("boot", guest_boot_s=boot_s, guest_uptime_at_ready_s=uptime_s)
        yield vm
    finally:
        if vm is not None:
            qemu_pid = vm.qemu_pid()
            vm.undefine()
            if qemu_pid is not None:
                with contextlib.suppress(TimeoutError):
                    wait_until(lambda: not Path(f"/proc/{qemu_pid}").exists(), 20, "QEMU exiting")
            qemu_left = qemu_pid is not None and Path(f"/proc/{qemu_pid}").exists()
        shutil.rmtree(run_dir, ignore_errors=True)
        if vm is not None:
            assert not qemu_left, f"QEMU (pid {qemu_pid}) still runs after undefine"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    # Keep each phase's report on the test, so fixtures can tell whether it failed.
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "report_call", None)
    return report is None or report.failed


@pytest.fixture(autouse=True)
def guest_console_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a failed test that used the guest, show the end of its serial console."""
    yield
    vm = request.node.funcargs.get("guest_vm")
    if isinstance(vm, GuestVm) and _failed(request):
        print(f"--- guest console ({vm.console_log}), last lines ---")
        print("\n".join(vm.console().splitlines()[-40:]))


@pytest.fixture
def new_agent(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., E2eAgent]]:
    """Factory: ``new_agent(uri, channels_dir)`` → a started vmpowerd."""
    agents: list[E2eAgent] = []
    counter = iter(range(100))

    def make(uri: str, channels_dir: Path) -> E2eAgent:
        work = tmp_path / f"agent{next(counter)}"
        work.mkdir()
        agent = E2eAgent(work, uri, channels_dir)
        agents.append(agent)
        try:
            return agent.start()
        except SetupError as exc:
            pytest.fail(str(exc), pytrace=False)

    yield make
    for agent in agents:
        agent.close()
        if _failed(request):
            print(f"--- vmpowerd log ({agent.log_path}), last lines ---")
            print("\n".join(agent.log().splitlines()[-60:]))
