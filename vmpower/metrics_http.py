"""The Prometheus endpoint of vmpower.metrics: HTTP GET /metrics and the process families.

Imported only when metrics.listen is set (the daemon imports it then; ``from
vmpower.metrics import MetricsExporter`` imports it too): prometheus_client and
http.server are not loaded by a daemon that serves no endpoint (issue #16). Threads,
snapshots, limits against hostile clients: vmpower.metrics's docstring.
"""

from __future__ import annotations

import math
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, HTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from vmpower import __version__
from vmpower.config import parse_listen
from vmpower.errors import VmpowerError
from vmpower.metrics import (
    CLIENT_TIMEOUT_S,
    MAX_CLIENTS,
    REFRESH_S,
    REFRESH_WAIT_S,
    Renderer,
    Snapshot,
    log,
)


class _ProcessCollector:
    """The ``process_*`` families of prometheus_client's ProcessCollector (same names,
    help and values, read from /proc/self), with open fds counted cheaply.

    ProcessCollector lists /proc/self/fd to count them: about 4-5 ms with 4000 channel
    sockets open, the largest part of a scrape. Since Linux 6.2 a stat() of that
    directory gives the count as its size (fs/proc/fd.c, proc_fd_getattr); older kernels
    report 0 there, and the listing is used.
    """

    def __init__(self) -> None:
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._pagesize = os.sysconf("SC_PAGE_SIZE")
        self._btime = 0.0
        with open("/proc/stat", "rb") as stat:
            for line in stat:
                if line.startswith(b"btime "):
                    self._btime = float(line.split()[1])

    def collect(self) -> Iterable[Metric]:
        out: list[Metric] = []
        try:
            with open("/proc/self/stat", "rb") as stat:
                parts = stat.read().split(b")")[-1].split()
            ticks = self._ticks
            out += [
                GaugeMetricFamily(
                    "process_virtual_memory_bytes",
                    "Virtual memory size in bytes.",
                    value=float(parts[20]),
                ),
                GaugeMetricFamily(
                    "process_resident_memory_bytes",
                    "Resident memory size in bytes.",
                    value=float(parts[21]) * self._pagesize,
                ),
                GaugeMetricFamily(
                    "process_start_time_seconds",
                    "Start time of the process since unix epoch in seconds.",
                    value=float(parts[19]) / ticks + self._btime,
                ),
                CounterMetricFamily(
                    "process_cpu_seconds_total",
                    "Total user and system CPU time spent in seconds.",
                    value=(float(parts[11]) + float(parts[12])) / ticks,
                ),
            ]
            with open("/proc/self/limits", "rb") as limits:
                for line in limits:
                    if line.startswith(b"Max open file"):
                        out.append(
                            GaugeMetricFamily(
                                "process_max_fds",
                                "Maximum number of open file descriptors.",
                                value=float(line.split()[3]),
                            )
                        )
                        break
            count = os.stat("/proc/self/fd").st_size or len(os.listdir("/proc/self/fd"))
            out.append(
                GaugeMetricFamily(
                    "process_open_fds", "Number of open file descriptors.", value=count
                )
            )
        except (OSError, ValueError, IndexError):
            pass  # not Linux's /proc: the families it could read
        return out


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
        self._renderer = Renderer()  # its kept lines: under _render_lock
        self._process = CollectorRegistry(auto_describe=True)
        self._process.register(_ProcessCollector())  # type: ignore[arg-type]
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
        """A snapshot begun at most REFRESH_S before this call: the latest one when it is
        that recent (no wait), else a fresh one the monitor builds (waited on, bounded;
        the latest one if the loop does not answer in REFRESH_WAIT_S)."""
        arrived = time.monotonic()
        if self._begun >= arrived - REFRESH_S:
            return self._snapshot
        with self._refresh_lock:  # one scrape asks at a time; those waiting share it
            if self._begun >= arrived - REFRESH_S:
                return self._snapshot  # another scrape's refresh, begun meanwhile
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
        """The latest snapshot's text, rendered once per snapshot (only what changed)."""
        snap = self.current()
        with self._render_lock:
            cached = self._body
            if snap is None:
                text = b""
            elif cached is not None and cached[0] is snap:
                text = cached[1]
            else:
                # The process families with it: once per snapshot too (reading
                # /proc/self/fd costs a listing of every channel socket).
                text = self._renderer.render(snap).encode() + generate_latest(self._process)
                self._body = (snap, text)
        return text


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
