"""The Prometheus endpoint: HTTP GET /metrics, served from snapshots the monitor publishes.

Threads (docs/architecture.md, "One thread, one loop"): the monitor thread builds an
immutable ``Snapshot`` of plain tuples (``SnapshotBuilder.build``) and publishes it by
one reference store; the HTTP threads only read the latest snapshot and render it. Every
scrape gets a snapshot begun after it arrived (so it shows every reply sent before it):
it asks the monitor for one (``call_soon_threadsafe``) and waits at most REFRESH_WAIT_S,
else serves the old one (``vmpower_snapshot_timestamp_seconds`` says how old): a hung
loop never hangs a scrape, and however many clients ask, the loop builds at most one
snapshot per REFRESH_S.

Against hostile clients: at most MAX_CLIENTS connections are served at once (more get
503 at once and are closed, from the listening thread, without blocking), each has
CLIENT_TIMEOUT_S to send its request, and nothing but ``GET /metrics`` (and HEAD) is
answered (404 / 405 otherwise). Bodies are rendered once per snapshot.

Rendering: the vmpower families are written here in the Prometheus text format 0.0.4
(label values escaped as the format says: backslash, double quote, newline), because
prometheus_client's generic rendering takes about 90 ms for 1000 VMs x 4 channels
(bench/bench_metrics.py); the process families (``process_*``: CPU, memory, open fds of
the daemon) come from prometheus_client's ``ProcessCollector``. tests/test_metrics.py
checks the text with prometheus_client's parser and with ``promtool check metrics``.

Families and how they are made: docs/metrics.md.
"""

from __future__ import annotations

import logging
import math
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.process_collector import ProcessCollector

from vmpower import __version__
from vmpower.channels import ChannelRegistry, ChannelState
from vmpower.config import parse_listen
from vmpower.cpufreq import CpuFreq
from vmpower.energy import EnergyAccount
from vmpower.errors import SysfsError, VmpowerError
from vmpower.hypervisor import Hypervisor
from vmpower.power import PowerManager
from vmpower.restore import RestoreJournal
from vmpower.sysfs import Reader, Sysfs

log = logging.getLogger("vmpower.metrics")

REFRESH_S = 0.5  # at most one snapshot build per this many seconds, however many ask
REFRESH_WAIT_S = 2.0  # how long a scrape waits for the monitor's fresh snapshot
MAX_CLIENTS = 4  # connections served at once; more get 503
CLIENT_TIMEOUT_S = 5.0  # to send the request (slow clients do not hold a slot longer)

# Refusal kinds (``power.Refused.kind`` and the request path's other NACKs) → the
# small fixed set of ``reason`` label values. A kind not listed counts as "other".
REASONS = (
    "rate_limited",
    "disabled",
    "not_permitted",
    "cpu_unavailable",
    "invalid",
    "apply_failed",
    "error",
    "other",
)
REASON_OF_KIND = {
    "rate limit": "rate_limited",
    "channel disabled": "disabled",
    "not pinned": "not_permitted",
    "no such vCPU": "not_permitted",
    "spoofed name": "not_permitted",
    "vm unknown": "not_permitted",
    "reserved": "cpu_unavailable",
    "offline": "cpu_unavailable",
    "no turbo": "cpu_unavailable",
    "unknown unit": "invalid",
    "unknown command": "invalid",
    "unknown core type": "invalid",
    "bad policy": "invalid",
    "no policy": "invalid",
    "write failed": "apply_failed",
    "internal error": "error",
}


def reason_of(kind: str) -> str:
    reason = REASON_OF_KIND.get(kind)
    if reason is not None:
        return reason
    return "error" if kind.startswith("failed") else "other"


@dataclass(frozen=True)
class Snapshot:
    """What one scrape shows; plain immutable data, built on the monitor thread."""

    taken_at: float  # time.time()
    libvirt_connected: bool
    restore_pending: int
    cpus_driven: int
    requests: tuple[tuple[str, int, int], ...]  # (vm, acks, nacks)
    refusals: tuple[tuple[str, str, int], ...]  # (vm, reason, count)
    cpu_hz: tuple[tuple[int, int], ...]  # (cpu, Hz now)
    target_hz: tuple[tuple[int, int], ...]  # (cpu, Hz vmpower set)
    channels: tuple[tuple[str, str, int], ...]  # (vm, state, count)
    vm_info: tuple[tuple[str, str], ...]  # (vm, uuid)
    package_j: tuple[tuple[int, float], ...]
    host_j: tuple[tuple[int, float], ...]
    vm_j: tuple[tuple[str, float], ...]
    departed_j: float | None  # None: no intel-rapl zone, no energy families
    conflicts: tuple[str, ...] = ()  # other power managers running (vmpower.conflicts)


class SnapshotBuilder:
    """Builds snapshots from the agent's parts; runs on the monitor thread only."""

    def __init__(
        self,
        *,
        power: PowerManager,
        cpufreq: CpuFreq,
        hypervisor: Hypervisor,
        channels: ChannelRegistry,
        journal: RestoreJournal,
        energy: EnergyAccount | None,
        conflicts: Callable[[], list[dict[str, object]]] | None = None,
    ) -> None:
        self.power = power
        self.conflicts = conflicts
        self.cpufreq = cpufreq
        self.hypervisor = hypervisor
        self.channels = channels
        self.journal = journal
        self.energy = energy
        # scaling_cur_freq readers kept open (one pread each per snapshot), read-only.
        self._sysfs = Sysfs(cpufreq.sysfs.root)
        self._cur: dict[int, Reader] = {}

    def build(self) -> Snapshot:
        power = self.power
        vms = self.hypervisor.vms()
        acks: dict[str, int] = {}
        nacks: dict[str, int] = {}
        refusals: dict[tuple[str, str], int] = {}
        for (kind, owner), n in power.acks_by.items():
            if kind == "vm":
                acks[owner] = n
        for (kind, owner, refusal), n in power.nacks_by.items():
            if kind == "vm":
                nacks[owner] = nacks.get(owner, 0) + n
                key = (owner, reason_of(refusal))
                refusals[key] = refusals.get(key, 0) + n
        channel_states: dict[tuple[str, ChannelState], int] = {}
        for (vm, _index), channel in self.channels.vm_channels.items():
            key = (vm, channel.state)
            channel_states[key] = channel_states.get(key, 0) + 1
        served = {vm for vm, _state in channel_states}
        states = [(s, s.value) for s in ChannelState]
        channels = tuple(
            (vm, name, channel_states.get((vm, state), 0))
            for vm in sorted(served)
            for state, name in states
        )
        counted = sorted(set(acks) | set(nacks) | served)
        # Requesters gone from libvirt and from the channels: their counts go (a counter
        # that disappears is a reset to Prometheus), so VM churn cannot grow them.
        if len(power.acks_by) + len(power.nacks_by) > 4 * (len(vms) + len(served)) + 64:
            power.forget_counts(lambda kind, owner: kind != "vm" or owner in vms or owner in served)
        targets = []
        for cpu, wishes in power.wishes.items():
            if wishes:
                try:
                    targets.append((cpu, self.cpufreq.requested_khz(cpu) * 1000))
                except VmpowerError:
                    continue
        driven = {c for c, w in power.wishes.items() if w} | {
            c for c, lim in getattr(power, "limits", {}).items() if lim
        }
        energy = self.energy
        package_j: tuple[tuple[int, float], ...] = ()
        host_j: tuple[tuple[int, float], ...] = ()
        vm_j: tuple[tuple[str, float], ...] = ()
        departed: float | None = None
        if energy is not None and energy.enabled:
            energy.update()
            energy.forget(vms)
            package_j = tuple(sorted(energy.package_j.items()))
            host_j = tuple(sorted(energy.host_j.items()))
            books = energy.vm_j  # every VM libvirt knows has a counter, from 0
            vm_j = tuple((vm, books.get(vm, 0.0)) for vm in sorted(set(vms) | set(books)))
            departed = energy.departed_j
        return Snapshot(
            taken_at=time.time(),
            libvirt_connected=self.hypervisor.status()["connected"],
            restore_pending=self.journal.pending_count(),
            cpus_driven=len(driven),
            requests=tuple((vm, acks.get(vm, 0), nacks.get(vm, 0)) for vm in counted),
            refusals=tuple((vm, reason, n) for (vm, reason), n in sorted(refusals.items())),
            cpu_hz=self._frequencies(),
            target_hz=tuple(sorted(targets)),
            channels=channels,
            vm_info=tuple((name, info.uuid) for name, info in sorted(vms.items())),
            package_j=package_j,
            host_j=host_j,
            vm_j=vm_j,
            departed_j=departed,
            conflicts=tuple(
                sorted(str(c.get("name")) for c in (self.conflicts() if self.conflicts else ()))
            ),
        )

    def _frequencies(self) -> tuple[tuple[int, int], ...]:
        """scaling_cur_freq of every CPU that has one (kHz → Hz); offline ones left out."""
        out = []
        for cpu in self.cpufreq.cpus():
            reader = self._cur.get(cpu)
            try:
                if reader is None:
                    reader = self._sysfs.open_reader(
                        f"devices/system/cpu/cpu{cpu}/cpufreq/scaling_cur_freq"
                    )
                    self._cur[cpu] = reader
                out.append((cpu, reader.read_int() * 1000))
            except (SysfsError, OSError, ValueError):
                stale = self._cur.pop(cpu, None)  # offline now: opened again when back
                if stale is not None:
                    stale.close()
        return tuple(out)

    def close(self) -> None:
        for reader in self._cur.values():
            reader.close()
        self._cur.clear()
        self._sysfs.close()


# -- rendering (any thread: reads only the snapshot) ---------------------------------------


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _family(out: list[str], name: str, kind: str, help_text: str) -> None:
    out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")


def render(snap: Snapshot) -> str:
    """The snapshot in the Prometheus text format 0.0.4."""
    out: list[str] = []
    add = out.append
    vm_label: dict[str, str] = {}

    def vm(name: str) -> str:
        text = vm_label.get(name)
        if text is None:
            text = vm_label[name] = f'vm="{_escape(name)}"'
        return text

    _family(out, "vmpower_build_info", "gauge", "vmpower version (always 1)")
    add(f'vmpower_build_info{{version="{_escape(__version__)}"}} 1\n')
    _family(
        out,
        "vmpower_snapshot_timestamp_seconds",
        "gauge",
        "when the daemon's loop took the values shown (Unix time)",
    )
    add(f"vmpower_snapshot_timestamp_seconds {snap.taken_at!r}\n")
    _family(out, "vmpower_libvirt_connected", "gauge", "1 while connected to libvirt")
    add(f"vmpower_libvirt_connected {int(snap.libvirt_connected)}\n")
    _family(
        out,
        "vmpower_restore_pending_files",
        "gauge",
        "settings whose original waits in the restore journal",
    )
    add(f"vmpower_restore_pending_files {snap.restore_pending}\n")
    _family(out, "vmpower_cpus_driven", "gauge", "host CPUs vmpower holds (a wish or a limit)")
    add(f"vmpower_cpus_driven {snap.cpus_driven}\n")
    _family(
        out,
        "vmpower_conflicting_power_managers",
        "gauge",
        "other power managers running (they undo vmpower's settings)",
    )
    add(f"vmpower_conflicting_power_managers {len(snap.conflicts)}\n")
    _family(out, "vmpower_conflict", "gauge", "another power manager running (always 1)")
    for manager in snap.conflicts:
        add(f'vmpower_conflict{{manager="{_escape(manager)}"}} 1\n')
    _family(out, "vmpower_requests_total", "counter", "requests answered, by VM and result")
    for name, acks, nacks in snap.requests:
        label = vm(name)
        add(f'vmpower_requests_total{{{label},result="ack"}} {acks}\n')
        add(f'vmpower_requests_total{{{label},result="nack"}} {nacks}\n')
    _family(out, "vmpower_refusals_total", "counter", "requests refused (NACK), by reason")
    for name, reason, n in snap.refusals:
        add(f'vmpower_refusals_total{{{vm(name)},reason="{reason}"}} {n}\n')
    _family(out, "vmpower_cpu_frequency_hertz", "gauge", "frequency the kernel reports now")
    for cpu, hz in snap.cpu_hz:
        add(f'vmpower_cpu_frequency_hertz{{cpu="{cpu}"}} {hz}\n')
    _family(
        out,
        "vmpower_cpu_target_frequency_hertz",
        "gauge",
        "frequency vmpower set (only CPUs it drives)",
    )
    for cpu, hz in snap.target_hz:
        add(f'vmpower_cpu_target_frequency_hertz{{cpu="{cpu}"}} {hz}\n')
    _family(out, "vmpower_channels", "gauge", "VM power channels by state")
    for name, state, n in snap.channels:
        add(f'vmpower_channels{{{vm(name)},state="{state}"}} {n}\n')
    _family(out, "vmpower_vm_info", "gauge", "VMs known to libvirt (always 1)")
    for name, uuid in snap.vm_info:
        add(f'vmpower_vm_info{{{vm(name)},uuid="{_escape(uuid)}"}} 1\n')
    if snap.departed_j is not None:
        _family(
            out,
            "vmpower_package_energy_joules_total",
            "counter",
            "intel-rapl package energy since vmpowerd started",
        )
        for package, j in snap.package_j:
            add(f'vmpower_package_energy_joules_total{{package="{package}"}} {_number(j)}\n')
        _family(
            out,
            "vmpower_vm_energy_joules_total",
            "counter",
            "package energy shared to the VM by the vCPU time it used",
        )
        for name, j in snap.vm_j:
            add(f"vmpower_vm_energy_joules_total{{{vm(name)}}} {_number(j)}\n")
        _family(
            out,
            "vmpower_host_energy_joules_total",
            "counter",
            "package energy no VM accounts for (host processes, idle)",
        )
        for package, j in snap.host_j:
            add(f'vmpower_host_energy_joules_total{{package="{package}"}} {_number(j)}\n')
        _family(
            out,
            "vmpower_departed_vm_energy_joules_total",
            "counter",
            "energy of VMs whose own counters were dropped (gone from libvirt)",
        )
        add(f"vmpower_departed_vm_energy_joules_total {_number(snap.departed_j)}\n")
    return "".join(out)


# -- publishing and serving ---------------------------------------------------------------


class MetricsExporter:
    """The latest snapshot, its rendering, and the HTTP endpoint serving it."""

    def __init__(
        self,
        listen: str,
        build: Callable[[], Snapshot],
        post: Callable[[Callable[[], None]], None],
    ) -> None:
        address = parse_listen(listen)
        if address is None:
            raise VmpowerError("metrics.listen is empty: no endpoint to serve")
        self.listen = listen
        self._address = address
        self._build = build
        self._post = post
        self._snapshot: Snapshot | None = None
        self._begun = -math.inf  # time.monotonic() when the latest snapshot was begun
        self._body: tuple[Snapshot, bytes] | None = None
        self._refresh_lock = threading.Lock()
        self._render_lock = threading.Lock()
        self._process = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self._process)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- monitor thread -------------------------------------------------------------------

    def publish(self) -> None:
        """Build and publish a snapshot (monitor thread)."""
        begun = time.monotonic()
        snap = self._build()
        self._snapshot, self._begun = snap, begun

    def start(self) -> None:
        """Bind the endpoint (errors name metrics.listen) and serve on a thread."""
        self.publish()
        host, port = self._address
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family = infos[0][0]
            server = _Server((host, port), family, self)
        except OSError as exc:
            raise VmpowerError(
                f"metrics.listen {self.listen}: cannot listen: {exc.strerror or exc}"
            ) from None
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="metrics-http"
        )
        self._thread.daemon = True
        self._thread.start()
        log.info("metrics: serving GET /metrics on %s", self.listen)

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    # -- HTTP threads ---------------------------------------------------------------------

    def current(self) -> Snapshot | None:
        """A snapshot begun after this call (waited on, bounded), else the latest one."""
        arrived = time.monotonic()
        with self._refresh_lock:  # one scrape asks at a time; the others may share it
            if self._begun >= arrived:
                return self._snapshot
            # However many ask: at most one build per REFRESH_S (a scrape waits here).
            pause_s = self._begun + REFRESH_S - time.monotonic()
            if pause_s > 0:
                time.sleep(pause_s)
            done = threading.Event()

            def publish() -> None:
                try:
                    self.publish()
                finally:
                    done.set()

            self._post(publish)
            done.wait(REFRESH_WAIT_S)
        return self._snapshot

    def body(self) -> bytes:
        snap = self.current()
        with self._render_lock:
            cached = self._body
            if snap is None:
                text = b""
            elif cached is not None and cached[0] is snap:
                text = cached[1]
            else:
                text = render(snap).encode()
                self._body = (snap, text)
        return text + generate_latest(self._process)


class _Server(socketserver.ThreadingMixIn, HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 16

    def __init__(self, address: tuple[str, int], family: int, exporter: MetricsExporter) -> None:
        self.address_family = family
        self.exporter = exporter
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # Only the address asked for ("[::1]" is not also 127.0.0.1).
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # HTTPServer.server_bind looks the host name up (getfqdn): not needed, can hang.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        if not self._slots.acquire(blocking=False):
            # Too many at once: a short refusal without blocking this (listening) thread.
            try:
                request.setblocking(False)
                request.send(
                    b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 1\r\n"
                    b"Content-Length: 0\r\nConnection: close\r\n\r\n"
                )
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = CLIENT_TIMEOUT_S
    protocol_version = "HTTP/1.0"  # one request per connection: a slot is not kept
    server_version = f"vmpowerd/{__version__}"
    sys_version = ""

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def _answer(self, with_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path != "/metrics":
            self._plain(404, b"only /metrics is served here\n")
            return
        try:
            body = self.server.exporter.body()
        except Exception:  # a bug: said once here, the scrape fails visibly
            log.exception("metrics: rendering failed")
            self._plain(500, b"rendering failed; see the daemon's log\n")
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def _plain(self, code: int, text: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # Any other method or a malformed request: a short answer, no HTML page.
        if code == 501:
            code = 405
        self._plain(code, f"{message or code}\n".encode(errors="replace"))

    def log_message(self, format: str, *args: object) -> None:
        return  # scrapes are not news; errors are logged where they happen
