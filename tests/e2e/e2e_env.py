"""Set-up of the end-to-end tests on real parts: packages, guest images, libvirtd, the VM.

This module owns everything the e2e tests need besides vmpower itself:

* the host's system packages and libvirt's two manual steps, through
  ``scripts/ensure-e2e-deps.sh`` (idempotent; a no-op when everything is there);
* the cache ``tests/e2e/cache`` (git-ignored), built once and reused: Debian's kernel
  and the six virtio modules the guest loads, Debian's python3.11-minimal with its
  standard library (compiled), libdpdk-dev's headers, the DPDK client built from
  ``dpdk_client.c``, and the base initramfs (busybox, modules, Python);
* the per-run initramfs overlay: ``guest_init.sh`` as /init, ``guest_agent.py``,
  vmpower's guest-side modules (the guest tool imports only those) and the DPDK client
  with the shared libraries it loads; the kernel unpacks the two concatenated cpio
  archives in order (Documentation/driver-api/early-userspace/buffer-format.rst);
* libvirtd: used when one already serves ``qemu:///system``, otherwise started by hand
  and stopped by its PID;
* the guest VM: a TCG domain (KVM does not run guests on this machine), its power
  channels, its control port (``GuestControl``) and its serial console log;
* ``E2eAgent``: vmpowerd as a subprocess on a simulated cpufreq tree;
* ``Timings``: the measured figures, printed and kept in ``cache/timings.json``.

Every failure to prepare a part raises ``SetupError`` with the reason, so a test that
cannot run fails and says why (it is never skipped).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import lzma
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent_support import kill_daemon, stop_daemon, to_toml

from vmpower import control
from vmpower.cpufreq.simulate import build_tree
from vmpower.errors import ControlError, VmpowerError

E2E_DIR = Path(__file__).resolve().parent
REPO = E2E_DIR.parents[1]
CACHE = E2E_DIR / "cache"
ENSURE_SCRIPT = REPO / "scripts" / "ensure-e2e-deps.sh"
QEMU_URI = "qemu:///system"

# Debian 6.1 kernels build these as modules; /init loads them in this order (modules.dep).
VIRTIO_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_console",
)
# The test's own virtio-serial port (guest_agent.py opens it by this name).
CONTROL_PORT_NAME = "org.vmpower.e2e.control"
POWER_PORT = "/dev/virtio-ports/virtio.serial.port.poweragent.{}"
# The guest side of vmpower: the guest tool imports nothing else from the package.
GUEST_MODULES = (
    "vmpower/__init__.py",
    "vmpower/errors.py",
    "vmpower/protocol/__init__.py",
    "vmpower/protocol/codec.py",
    "vmpower/protocol/framing.py",
    "vmpower/protocol/fifo.py",
)
# Parts of the Python standard library no test path imports (saves initramfs space).
PYTHON_PRUNE = ("test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "pydoc_data")


class SetupError(VmpowerError):
    """A part of the e2e environment could not be installed, built or started."""


def run(
    argv: list[str],
    *,
    what: str,
    timeout_s: float = 300,
    cwd: Path | None = None,
    stdin: bytes | None = None,
) -> str:
    """Run a set-up command; its stdout, or SetupError naming ``what`` and its output."""
    try:
        done = subprocess.run(
            argv, capture_output=True, timeout=timeout_s, cwd=cwd, input=stdin, check=False
        )
    except FileNotFoundError:
        raise SetupError(f"{what}: {argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise SetupError(f"{what}: {' '.join(argv)} took over {timeout_s} s") from None
    if done.returncode != 0:
        output = (done.stdout + done.stderr).decode(errors="replace").strip()
        raise SetupError(f"{what}: `{' '.join(argv)}` exited {done.returncode}:\n{output}")
    return done.stdout.decode(errors="replace")


def wait_until(
    predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05
) -> Any:
    """Poll ``predicate`` until it returns a true value (returned); TimeoutError otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout_s} s")
        time.sleep(interval_s)


# ------------------------------------------------------------------------------ host


def ensure_host_packages() -> float:
    """Install the e2e system packages and libvirt's manual steps; seconds it took."""
    start = time.monotonic()
    run(["bash", str(ENSURE_SCRIPT)], what="installing the e2e system packages", timeout_s=900)
    return time.monotonic() - start


@contextlib.contextmanager
def exclusive(lock_path: Path, timeout_s: float) -> Iterator[None]:
    """One e2e session per host at a time: libvirtd and the domain name are host-wide."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    raise SetupError(
                        f"another e2e session (pid {holder}) holds {lock_path} for over"
                        f" {timeout_s} s"
                    ) from None
                time.sleep(0.5)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def multiarch() -> str:
    return run(["gcc", "-print-multiarch"], what="asking gcc for the multiarch triplet").strip()


# ----------------------------------------------------------------------------- cache


class Cache:
    """The git-ignored build cache; each part is built once, keyed by a stamp file."""

    def __init__(self, root: Path = CACHE) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._apt_updated = False

    # -- helpers -------------------------------------------------------------------

    @staticmethod
    def _stamp_ok(stamp: Path, key: str) -> bool:
        return stamp.is_file() and stamp.read_text() == key

    def _download(self, package: str, into: Path) -> Path:
        """``apt-get download`` one package (running ``apt-get update`` once if needed)."""
        into.mkdir(parents=True, exist_ok=True)
        for attempt in (1, 2):
            try:
                run(["apt-get", "download", "-q", package], cwd=into, what=f"downloading {package}")
                break
            except SetupError:
                if attempt == 2 or self._apt_updated:
                    raise
                run(["apt-get", "update", "-qq"], what="apt-get update", timeout_s=600)
                self._apt_updated = True
        debs = sorted(into.glob(f"{package}_*.deb"))
        if not debs:
            raise SetupError(f"apt-get download {package} left no .deb in {into}")
        return debs[-1]

    def _depends_on(self, package: str, pattern: str) -> str:
        """The dependency of ``package`` whose name matches ``pattern`` (apt-cache)."""
        for attempt in (1, 2):
            text = run(["apt-cache", "depends", package], what=f"reading {package}'s depends")
            found = re.findall(rf"Depends:\s+({pattern})\s*$", text, re.MULTILINE)
            if found:
                return found[0]
            if attempt == 1 and not self._apt_updated:
                run(["apt-get", "update", "-qq"], what="apt-get update", timeout_s=600)
                self._apt_updated = True
        raise SetupError(f"apt-cache lists no dependency of {package} matching {pattern}")

    @staticmethod
    def _extract(deb: Path, dest: Path, members: list[str] | None = None) -> None:
        """Unpack a .deb (or only ``members``, tar wildcards) without installing it."""
        dest.mkdir(parents=True, exist_ok=True)
        tar = ["tar", "-x", "-C", str(dest)]
        if members:
            tar += ["--wildcards", *members]
        with subprocess.Popen(
            ["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE
        ) as feed:
            assert feed.stdout is not None
            done = subprocess.run(tar, stdin=feed.stdout, capture_output=True, check=False)
            feed.stdout.close()
        if feed.returncode != 0 or done.returncode != 0:
            raise SetupError(f"unpacking {deb.name}: {done.stderr.decode(errors='replace')}")

    # -- the guest kernel ------------------------------------------------------------

    @property
    def kernel_dir(self) -> Path:
        return self.root / "kernel"

    def kernel(self) -> Path:
        """Debian's current amd64 kernel image and its virtio modules; the vmlinuz path."""
        out = self.kernel_dir
        stamp = out / "STAMP"
        if stamp.is_file() and (out / "vmlinuz").is_file():
            return out / "vmlinuz"
        shutil.rmtree(out, ignore_errors=True)
        image = self._depends_on("linux-image-amd64", r"linux-image-[0-9][^ ]*-amd64")
        with tempfile.TemporaryDirectory(dir=self.root) as tmp:
            deb = self._download(image, Path(tmp))
            unpacked = Path(tmp) / "root"
            names = [f"*/{m}.ko*" for m in VIRTIO_MODULES]  # .ko, or .ko.xz in later kernels
            self._extract(deb, unpacked, ["./boot/vmlinuz-*", *names])
            (out / "modules").mkdir(parents=True)
            vmlinuz = next(iter(unpacked.glob("boot/vmlinuz-*")), None)
            if vmlinuz is None:
                raise SetupError(f"{deb.name} has no boot/vmlinuz-*")
            shutil.copy(vmlinuz, out / "vmlinuz")
            for module in VIRTIO_MODULES:
                plain = list(unpacked.glob(f"lib/modules/*/kernel/**/{module}.ko"))
                packed = list(unpacked.glob(f"lib/modules/*/kernel/**/{module}.ko.xz"))
                if plain:
                    shutil.copy(plain[0], out / "modules" / f"{module}.ko")
                elif packed:  # busybox insmod may lack xz support: unpack here
                    data = lzma.decompress(packed[0].read_bytes())
                    (out / "modules" / f"{module}.ko").write_bytes(data)
                else:
                    raise SetupError(f"{deb.name} has no module {module}")
            stamp.write_text(deb.name)
        return out / "vmlinuz"

    # -- Python for the guest --------------------------------------------------------

    @property
    def python_root(self) -> Path:
        return self.root / "python"

    def python(self) -> Path:
        """Debian's python3.X-minimal + its standard library, unpacked and compiled."""
        out = self.python_root
        stamp = out / "STAMP"
        if stamp.is_file():
            return out
        shutil.rmtree(out, ignore_errors=True)
        minimal = self._depends_on("python3-minimal", r"python3\.[0-9]+-minimal")
        version = minimal.removeprefix("python").removesuffix("-minimal")
        packages = [minimal, f"libpython{version}-minimal", f"libpython{version}-stdlib"]
        with tempfile.TemporaryDirectory(dir=self.root) as tmp:
            for package in packages:
                self._extract(self._download(package, Path(tmp)), out)
        shutil.rmtree(out / "usr" / "share", ignore_errors=True)
        stdlib = out / "usr" / "lib" / f"python{version}"
        for name in PYTHON_PRUNE:
            shutil.rmtree(stdlib / name, ignore_errors=True)
        binary = out / "usr" / "bin" / f"python{version}"
        if not binary.is_file():
            raise SetupError(f"{minimal} has no usr/bin/python{version}")
        # Precompiled once here: the guest's rootfs is fresh at every boot, and compiling
        # under TCG on each import would dominate every one-shot's run time.
        self.compile_python(binary, stdlib)
        stamp.write_text(" ".join(packages))
        return out

    def python_binary(self) -> Path:
        return next(iter(sorted((self.python() / "usr" / "bin").glob("python3.*[0-9]"))))

    def compile_python(self, binary: Path, *paths: Path) -> None:
        # unchecked-hash: the .pyc stays valid whatever the files' times in the archive.
        argv = [str(binary), "-m", "compileall", "-q", "-j", "0"]
        argv += ["--invalidation-mode", "unchecked-hash", *map(str, paths)]
        run(argv, what="compiling Python for the guest")

    # -- DPDK ----------------------------------------------------------------------------

    @property
    def dpdk_include(self) -> Path:
        return self.root / "dpdk" / "usr" / "include"

    def dpdk_headers(self) -> Path:
        """libdpdk-dev's headers only (installing it would pull ~200 packages)."""
        stamp = self.root / "dpdk" / "STAMP"
        if stamp.is_file():
            return self.dpdk_include
        shutil.rmtree(self.root / "dpdk", ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=self.root) as tmp:
            deb = self._download("libdpdk-dev", Path(tmp))
            self._extract(deb, self.root / "dpdk", ["./usr/include/*"])
        if not (self.dpdk_include / "dpdk" / "rte_power_guest_channel.h").is_file():
            raise SetupError("libdpdk-dev has no dpdk/rte_power_guest_channel.h")
        stamp.write_text(deb.name)
        return self.dpdk_include

    def dpdk_client(self) -> Path:
        """``dpdk_client.c`` built against librte_power (rebuilt when the source changes)."""
        source = E2E_DIR / "dpdk_client.c"
        out = self.root / "bin" / "vmpower_dpdk_client"
        include = self.dpdk_headers()
        triplet = multiarch()
        libs = sorted(glob.glob(f"/usr/lib/{triplet}/librte_power.so.[0-9]*"), key=len)
        if not libs:
            raise SetupError("librte_power.so.* not found: is librte-power23 installed?")
        key = hashlib.sha256(source.read_bytes() + libs[0].encode()).hexdigest()
        stamp = out.with_suffix(".sha256")
        if out.is_file() and self._stamp_ok(stamp, key):
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        argv = ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-DALLOW_EXPERIMENTAL_API"]
        argv += [f"-I{include}/dpdk", f"-I{include}/{triplet}/dpdk", "-o", str(out), str(source)]
        run([*argv, f"-l:{Path(libs[0]).name}"], what="building the DPDK client")
        stamp.write_text(key)
        return out

    # -- initramfs -----------------------------------------------------------------------

    def base_initramfs(self) -> Path:
        """busybox, the virtio modules and Python with its libraries, as one cpio archive."""
        self.kernel()
        python_root = self.python()
        busybox = Path("/bin/busybox")
        if not busybox.is_file():
            raise SetupError("/bin/busybox missing: is busybox-static installed?")
        out = self.root / "base.cpio"
        key = "\n".join(
            [
                (self.kernel_dir / "STAMP").read_text(),
                (python_root / "STAMP").read_text(),
                hashlib.sha256(busybox.read_bytes()).hexdigest(),
                # This file decides the layout: a change to it rebuilds the archive.
                hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
            ]
        )
        stamp = self.root / "base.cpio.key"
        if out.is_file() and self._stamp_ok(stamp, key):
            return out
        with tempfile.TemporaryDirectory(dir=self.root) as tmp:
            root = Path(tmp) / "root"
            make_skeleton(root)
            shutil.copy(busybox, root / "bin" / "busybox")
            shutil.copytree(self.kernel_dir / "modules", root / "usr" / "lib" / "modules")
            shutil.copytree(python_root / "usr", root / "usr", dirs_exist_ok=True, symlinks=True)
            binary = self.python_binary()
            (root / "usr" / "bin" / "python3").symlink_to(binary.name)
            copy_libraries(binary, root)
            write_cpio(root, out)
        stamp.write_text(key)
        return out


SKELETON = ("bin", "usr/bin", "usr/lib", "usr/lib64", "proc", "sys", "dev", "tmp", "root", "opt")


def make_skeleton(root: Path) -> None:
    """The directories of a merged-/usr root (Debian 12's layout)."""
    for name in SKELETON:
        (root / name).mkdir(parents=True, exist_ok=True)
    (root / "lib").symlink_to("usr/lib")
    (root / "lib64").symlink_to("usr/lib64")


def copy_libraries(binary: Path, root: Path) -> None:
    """Copy the shared libraries ``binary`` loads (ldd) into the same places under root."""
    text = run(["ldd", str(binary)], what=f"listing the libraries of {binary.name}")
    for line in text.splitlines():
        match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if not match:
            continue
        path = Path(match.group(1))
        # /lib is a symlink to /usr/lib on Debian 12: store under usr/, keep the name.
        real_dir = Path(os.path.realpath(path.parent))
        target = root / real_dir.relative_to("/") / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            shutil.copy(os.path.realpath(path), target)


def write_cpio(root: Path, out: Path) -> None:
    """A newc cpio archive of ``root`` owned by root (the kernel's initramfs format)."""
    names = subprocess.run(
        ["find", ".", "-mindepth", "1"], cwd=root, capture_output=True, check=True
    ).stdout
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        done = subprocess.run(
            ["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"],
            cwd=root,
            input=names,
            stdout=f,
            stderr=subprocess.PIPE,
            check=False,
        )
    if done.returncode != 0:
        raise SetupError(f"cpio: {done.stderr.decode(errors='replace')}")
    tmp.replace(out)


def build_initrd(cache: Cache, dest: Path) -> Path:
    """This run's initramfs: the cached base plus an overlay with the code under test."""
    base = cache.base_initramfs()
    client = cache.dpdk_client()
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        root = Path(tmp) / "overlay"
        for name in ("usr/bin", "opt/e2e", "opt/dpdk", "opt/vmpower"):
            (root / name).mkdir(parents=True)
        init = root / "init"
        shutil.copy(E2E_DIR / "guest_init.sh", init)
        init.chmod(0o755)
        shutil.copy(E2E_DIR / "guest_agent.py", root / "opt" / "e2e" / "guest_agent.py")
        package = root / "opt" / "vmpower"
        for rel in GUEST_MODULES:
            (package / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / rel, package / rel)
        guest_pkg = REPO / "vmpower" / "guest"
        if guest_pkg.is_dir():
            shutil.copytree(
                guest_pkg,
                package / "vmpower" / "guest",
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            )
        cache.compile_python(cache.python_binary(), package, root / "opt" / "e2e")
        wrapper = root / "usr" / "bin" / "vmpower-guest"
        wrapper.write_text(
            '#!/bin/sh\nPYTHONPATH=/opt/vmpower exec python3 -m vmpower.guest.cli "$@"\n'
        )
        wrapper.chmod(0o755)
        shutil.copy(client, root / "opt" / "dpdk" / client.name)
        copy_libraries(client, root)
        overlay = Path(tmp) / "overlay.cpio"
        write_cpio(root, overlay)
        initrd = dest / "initrd.img"
        with open(initrd, "wb") as out:
            for part in (base, overlay):
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
    return initrd


# --------------------------------------------------------------------------- libvirtd


def libvirt_open(uri: str) -> Any:
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt.open(uri)


class Libvirtd:
    """The system libvirtd: reused when one answers, else started by hand and owned."""

    def __init__(self, state_dir: Path, uri: str = QEMU_URI) -> None:
        self.uri = uri
        self.pid_file = state_dir / "libvirtd.pid"
        self.log_path = state_dir / "libvirtd.log"
        self.pid: int | None = None  # set when this session started (or adopted) it
        self.proc: subprocess.Popen[bytes] | None = None

    def _answers(self) -> bool:
        import libvirt

        try:
            libvirt_open(self.uri).close()
        except libvirt.libvirtError:
            return False
        return True

    def start(self, timeout_s: float = 60) -> float:
        """Make sure libvirtd serves ``uri``; returns the seconds it took."""
        start = time.monotonic()
        if self._answers():
            # A libvirtd an earlier, interrupted session started is ours to stop.
            with contextlib.suppress(OSError, ValueError):
                old = int(self.pid_file.read_text())
                if Path(f"/proc/{old}/comm").read_text().strip() == "libvirtd":
                    self.pid = old
            return time.monotonic() - start
        binary = shutil.which("libvirtd") or "/usr/sbin/libvirtd"
        if not Path(binary).is_file():
            raise SetupError("libvirtd not found: is libvirt-daemon installed?")
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            # Its own session: a Ctrl-C on pytest must not kill it before domains are gone.
            self.proc = subprocess.Popen(
                [binary, "--pid-file", str(self.pid_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pid = self.proc.pid
        proc = self.proc
        try:
            wait_until(
                lambda: proc.poll() is not None or self._answers(),
                timeout_s,
                "libvirtd answering on " + self.uri,
                interval_s=0.2,
            )
        except TimeoutError:
            self.stop()
            raise SetupError(f"libvirtd did not answer in {timeout_s} s:\n{self.log()}") from None
        if proc.poll() is not None:
            raise SetupError(f"libvirtd exited with {proc.returncode}:\n{self.log()}")
        return time.monotonic() - start

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 20) -> None:
        """Stop the libvirtd this session owns, by its PID (never one it did not start)."""
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None:
                if self.proc.poll() is not None:
                    break
            elif not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if self.proc is not None:
                self.proc.wait()
        self.pid_file.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the VM


def virsh(*args: str, uri: str = QEMU_URI, timeout_s: float = 60) -> str:
    """What an operator would type; SetupError with virsh's message when it fails."""
    return run(["virsh", "-c", uri, *args], what="virsh " + " ".join(args), timeout_s=timeout_s)


@dataclass
class GuestResult:
    """One program run inside the guest."""

    rc: int
    stdout: str
    stderr: str
    elapsed_s: float


class GuestControl:
    """The host end of the guest agent's control port (a socket QEMU binds)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.buf = b""
        self.hello: dict[str, Any] = {}
        self._ids = iter(range(1, 1 << 30))

    def connect(self, timeout_s: float) -> dict[str, Any]:
        """Connect and wait for the agent's hello (the guest is up); returns the hello."""
        deadline = time.monotonic() + timeout_s
        self.close()
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(str(self.path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"no guest control socket at {self.path}") from None
                time.sleep(0.05)
        self.sock = sock
        self.buf = b""
        while True:
            message = self._read_line(max(0.1, deadline - time.monotonic()))
            if "hello" in message:
                self.hello = message
                return message

    def _read_line(self, timeout_s: float) -> dict[str, Any]:
        assert self.sock is not None, "connect() first"
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the guest agent said nothing for {timeout_s:.0f} s")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise ConnectionError("the guest control port closed (VM stopped?)")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def request(self, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        assert self.sock is not None, "connect() first"
        ident = next(self._ids)
        self.sock.sendall((json.dumps({"id": ident, **body}) + "\n").encode())
        deadline = time.monotonic() + timeout_s
        while True:
            message = self._read_line(max(0.1, deadline - time.monotonic()))
            if message.get("id") == ident:
                return message
            if "error" in message and message.get("id") is None:
                raise SetupError(f"guest agent: {message['error']}")

    def run(self, *argv: str, timeout_s: float = 60) -> GuestResult:
        """Run a program in the guest and return what it printed."""
        reply = self.request({"argv": list(argv), "timeout_s": timeout_s}, timeout_s + 10)
        return GuestResult(reply["rc"], reply["stdout"], reply["stderr"], reply["elapsed_s"])

    def round_trips(
        self,
        vcpu: int,
        count: int,
        timeout_s: float = 60,
        units: tuple[str, ...] = ("SCALE_MAX",),
    ) -> list[float]:
        """``count`` CPU_POWER round trips on the vCPU's port, timed in the guest.

        The requests take ``units`` (``protocol.Unit`` names) in turn; every reply must
        be an ACK.
        """
        spec = {"device": POWER_PORT.format(vcpu), "count": count, "vcpu": vcpu}
        reply = self.request({"rtt": {**spec, "units": list(units)}}, timeout_s)
        if "error" in reply:
            raise SetupError(f"round trips in the guest: {reply['error']}")
        if reply["acks"] != count:
            raise SetupError(f"round trips in the guest: {reply['acks']} ACKs of {count}")
        return list(reply["samples_s"])

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


@dataclass
class GuestVm:
    """A TCG guest with one power channel per vCPU, defined on ``qemu:///system``."""

    name: str
    run_dir: Path
    kernel: Path
    initrd: Path
    vcpus: int = 2
    memory_mib: int = 256
    pins: dict[int, int] = field(default_factory=lambda: {0: 0, 1: 1})
    uri: str = QEMU_URI

    def __post_init__(self) -> None:
        self.channels_dir = self.run_dir / "channels"
        self.channels_dir.mkdir(parents=True, exist_ok=True)
        self.control_socket = self.run_dir / "control.sock"
        self.console_log = self.run_dir / "console.log"
        self.xml_path = self.run_dir / f"{self.name}.xml"
        self.control = GuestControl(self.control_socket)
        self.defined = False

    def channel_socket(self, index: int) -> Path:
        return self.channels_dir / f"{self.name}.{index}"

    def xml(self) -> str:
        pins = "".join(f"<vcpupin vcpu='{v}' cpuset='{c}'/>" for v, c in sorted(self.pins.items()))
        channels = "".join(
            f"""
    <channel type='unix'>
      <source mode='bind' path='{self.channel_socket(i)}'/>
      <target type='virtio' name='virtio.serial.port.poweragent.{i}'/>
    </channel>"""
            for i in range(self.vcpus)
        )
        ports = self.vcpus + 1
        # type='qemu' is TCG: /dev/kvm exists here but cannot run guests. mode='maximum'
        # gives the guest SSE4.2, which Debian's DPDK libraries require.
        return f"""<domain type='qemu'>
  <name>{self.name}</name>
  <memory unit='MiB'>{self.memory_mib}</memory>
  <vcpu placement='static'>{self.vcpus}</vcpu>
  <cputune>{pins}</cputune>
  <cpu mode='maximum'/>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{self.kernel}</kernel>
    <initrd>{self.initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 vmpower_e2e_ports={ports}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='file'>
      <source path='{self.console_log}' append='on'/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path='{self.console_log}' append='on'/>
      <target type='serial' port='0'/>
    </console>{channels}
    <channel type='unix'>
      <source mode='bind' path='{self.control_socket}'/>
      <target type='virtio' name='{CONTROL_PORT_NAME}'/>
    </channel>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""

    def define(self) -> None:
        """Define the domain (dropping a leftover of the same name first)."""
        host_cpus = os.cpu_count() or 1
        if max(self.pins.values()) >= host_cpus:
            raise SetupError(
                f"the e2e guest pins vCPUs to host CPUs {sorted(self.pins.values())};"
                f" this host has {host_cpus}"
            )
        self.remove_leftover()
        self.xml_path.write_text(self.xml())
        virsh("define", str(self.xml_path))
        self.defined = True

    def remove_leftover(self) -> None:
        """A domain of this name an interrupted session left behind: destroy, undefine."""
        import libvirt

        conn = libvirt_open(self.uri)
        try:
            try:
                dom = conn.lookupByName(self.name)
            except libvirt.libvirtError:
                return
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        finally:
            conn.close()

    def start(self, timeout_s: float = 120) -> float:
        """``virsh start``, then wait until the guest agent greets us; boot seconds."""
        start = time.monotonic()
        virsh("start", self.name)
        try:
            self.control.connect(timeout_s)
        except (TimeoutError, ConnectionError) as exc:
            raise SetupError(
                f"guest {self.name} did not come up: {exc}\nconsole:\n{self.console()[-3000:]}"
            ) from None
        return time.monotonic() - start

    def destroy(self) -> None:
        self.control.close()
        if self.is_active():
            virsh("destroy", self.name)

    def is_active(self) -> bool:
        return virsh("domstate", self.name).strip() not in ("shut off", "crashed")

    def undefine(self) -> None:
        """Stop and forget the domain; QEMU removes the sockets it bound."""
        self.control.close()
        with contextlib.suppress(SetupError):
            self.remove_leftover()
        self.defined = False
        for path in [*self.channels_dir.glob("*"), self.control_socket]:
            if path.is_socket():
                path.unlink(missing_ok=True)

    def qemu_pid(self) -> int | None:
        pid_file = Path("/run/libvirt/qemu") / f"{self.name}.pid"
        try:
            return int(pid_file.read_text())
        except (OSError, ValueError):
            return None

    def console(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except OSError:
            return ""


# ---------------------------------------------------------------------- the PTY bridge


class PtyBridge:
    """socat plays QEMU on the host: a PTY at the guest's port path ↔ a channel socket.

    DPDK's KVM-VM driver opens the fixed path /dev/virtio-ports/<port name> (FD_PATH in
    power_kvm_vm.c), so the link must be there; socat listens on the channel socket
    where vmpowerd connects, as it would to QEMU's. socat ends when the client closes
    the PTY (EOF on the master side), so there is one bridge per client run.
    """

    def __init__(self, port_path: Path, socket_path: Path) -> None:
        self.port_path = port_path
        self.socket_path = socket_path
        self.made_dir = False
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10) -> PtyBridge:
        if self.port_path.exists() or self.port_path.is_symlink():
            raise SetupError(
                f"{self.port_path} already exists on this host (a real guest port, or a"
                " leftover): the PTY bridge will not replace it"
            )
        if not self.port_path.parent.is_dir():
            self.port_path.parent.mkdir(parents=True)
            self.made_dir = True
        socat = shutil.which("socat")
        if socat is None:
            raise SetupError("socat is not installed")
        self.proc = subprocess.Popen(
            [
                socat,
                f"PTY,link={self.port_path},raw,echo=0",
                f"UNIX-LISTEN:{self.socket_path},unlink-early",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        proc = self.proc
        try:
            wait_until(
                lambda: (
                    proc.poll() is not None
                    or (self.port_path.is_symlink() and self.socket_path.is_socket())
                ),
                timeout_s,
                "socat's PTY link and listening socket",
            )
        except TimeoutError as exc:
            self.stop()
            raise SetupError(str(exc)) from None
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            self.stop()
            raise SetupError(f"socat exited with {proc.returncode}: {err}")
        return self

    def stop(self, timeout_s: float = 10) -> None:
        """Stop socat (by its PID) and remove what it and we created."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            if self.proc.stderr is not None:
                self.proc.stderr.close()
            self.proc = None
        if self.port_path.is_symlink():
            self.port_path.unlink()
        if self.socket_path.is_socket():
            self.socket_path.unlink()
        if self.made_dir:
            with contextlib.suppress(OSError):  # not empty: somebody else's ports now
                self.port_path.parent.rmdir()
            self.made_dir = False


# ----------------------------------------------------------------------------- vmpowerd


class E2eAgent:
    """vmpowerd as a subprocess, on ``uri`` and a simulated acpi-cpufreq tree.

    ``log_level`` is the daemon's (``debug`` by default: a failing test shows every
    request); ``host_cpus``, when given, pins it there with taskset (a bench's fixed CPU).
    """

    def __init__(
        self,
        work_dir: Path,
        uri: str,
        channels_dir: Path,
        cpus: int = 8,
        *,
        log_level: str = "debug",
        host_cpus: tuple[int, ...] = (),
    ) -> None:
        self.work_dir = work_dir
        self.host_cpus = host_cpus
        self.sysfs_root = work_dir / "sysfs"
        build_tree(self.sysfs_root, "acpi-cpufreq", cpus, turbo=True)
        self.socket = work_dir / "control.sock"
        self.config_path = work_dir / "vmpowerd.toml"
        self.log_path = work_dir / "vmpowerd.log"
        self.config_path.write_text(
            to_toml(
                {
                    "libvirt": {"uri": uri, "reconnect_min_s": 0.2, "reconnect_max_s": 2.0},
                    "channels": {"dir": str(channels_dir)},
                    "cpufreq": {"sysfs_root": str(self.sysfs_root)},
                    "state": {"dir": str(work_dir / "state")},
                    "control": {"socket": str(self.socket)},
                    "log": {"level": log_level},
                }
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60) -> E2eAgent:
        argv = [sys.executable, "-m", "vmpower.daemon", "--config", str(self.config_path)]
        if self.host_cpus:  # taskset execs the daemon: the PID stays the daemon's
            argv = ["taskset", "-c", ",".join(map(str, self.host_cpus)), *argv]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        proc = self.proc
        try:
            wait_until(
                lambda: self.socket.exists() or proc.poll() is not None,
                timeout_s,
                "vmpowerd's control socket",
            )
        except TimeoutError:
            raise SetupError(f"vmpowerd did not start:\n{self.log()}") from None
        if proc.poll() is not None:
            raise SetupError(f"vmpowerd exited with {proc.returncode}:\n{self.log()}")
        return self

    def control(self, cmd: str, **args: Any) -> Any:
        return control.request(self.socket, cmd, **args)

    def connected_channels(self, vm: str) -> int:
        try:
            rows = self.control("list_vms")
        except ControlError:
            return 0
        return next((row["connected"] for row in rows if row["name"] == vm), 0)

    def wait_connected(self, vm: str, count: int, timeout_s: float = 30) -> None:
        """Wait until vmpowerd has connected ``count`` channels of ``vm`` by itself."""
        try:
            wait_until(
                lambda: self.connected_channels(vm) >= count,
                timeout_s,
                f"vmpowerd connecting {count} channels of {vm}",
                interval_s=0.1,
            )
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\nvmpowerd log:\n{self.log()[-4000:]}") from None

    def vcpu_pcpus(self, vm: str) -> dict[int, str]:
        return {row["vcpu"]: row["pcpus"] for row in self.control("show_vm", vm=vm)["vcpus"]}

    def read(self, cpu: int, name: str) -> str:
        path = self.sysfs_root / f"devices/system/cpu/cpu{cpu}/cpufreq/{name}"
        return path.read_text().strip()

    def table_khz(self, cpu: int) -> list[int]:
        return [int(x) for x in self.read(cpu, "scaling_available_frequencies").split()]

    def setspeed(self, cpu: int) -> str:
        return self.read(cpu, "scaling_setspeed")

    def snapshot(self) -> dict[str, str]:
        return {
            str(p.relative_to(self.sysfs_root)): p.read_text()
            for p in sorted(self.sysfs_root.rglob("*"))
            if p.is_file()
        }

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM (vmpowerd restores what it changed) and its exit status."""
        assert self.proc is not None
        return stop_daemon(self.proc, timeout_s=timeout_s)

    def close(self) -> None:
        kill_daemon(self.proc)


# ------------------------------------------------------------------------------ timings


class Timings:
    """Measured figures: printed (visible with ``pytest -s``) and saved as JSON."""

    def __init__(self, path: Path = CACHE / "timings.json") -> None:
        self.path = path

    def record(self, section: str, **values: float | int | str) -> None:
        for key, value in values.items():
            shown = f"{value:.3f}" if isinstance(value, float) else value
            print(f"[e2e timing] {section}.{key} = {shown}")
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            data = {}
        entry = data.setdefault(section, {})
        entry.update({k: round(v, 6) if isinstance(v, float) else v for k, v in values.items()})
        entry["recorded_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.path)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


@dataclass
class E2eHost:
    """The prepared host of one e2e session."""

    cache: Cache
    timings: Timings
