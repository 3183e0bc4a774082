"""``vmpower signals | read | write | session``: the telemetry commands (GEOPM's tools).

This module owns those four commands (``vmpower.shell`` adds them to its parser with
``add_commands`` and runs them with ``run``):

* ``vmpower signals``: the catalogue, with units, domain, your access and descriptions;
* ``vmpower read NAME DOMAIN INDEX``: one value;
* ``vmpower write NAME DOMAIN INDEX VALUE``: sets a control and *holds* it: a session's
  controls are restored when it ends, so the command keeps its session until
  interrupted (Ctrl-C, SIGTERM), until ``--hold-s`` seconds passed, or until the daemon
  stops the session;
* ``vmpower session -t SECONDS -p PERIOD [--format csv|json]``: requests ``NAME DOMAIN
  INDEX`` from stdin (one per line, ``#`` comments), one row per period on a fixed grid,
  ``max(1, ceil(SECONDS / PERIOD))`` rows (``-t 0``: one row).

The socket: ``--socket``, else ``--config``'s ``control.socket``, else
``$VMPOWER_SOCKET``, else the default (as the shell). ``--json``: JSON on stdout, errors
included (``{"error": ..., "exit_status": ...}``). Exit status: 0 done (``write``: also when
interrupted, its documented end; the value is restored), 1 refused or failed (one line
on stderr), 2 usage error, 130 interrupted by Ctrl-C (``session``'s rows printed so far
stand).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from vmpower import control
from vmpower.config import ControlConfig, load_config
from vmpower.errors import ConfigError, VmpowerError
from vmpower.telemetry.catalog import DOMAINS, parse_request
from vmpower.telemetry.client import BatchClient, format_value

SOCKET_ENV = "VMPOWER_SOCKET"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command ended by Ctrl-C


class _Usage(Exception):
    """A command line that cannot be run: exit status 2."""


class _Interrupted(Exception):
    """SIGTERM while holding a control (SIGINT arrives as KeyboardInterrupt)."""


TELEMETRY_COMMANDS = ("signals", "read", "write", "session")


def common_options(default: Any) -> argparse.ArgumentParser:
    """--socket, --config, --json: a parent parser for the top level (default None)
    and for each command (default SUPPRESS, so a command does not reset what was given
    before it): the options work before or after the command word."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        default=default,
        help=f"vmpowerd's control socket (default: --config's, else ${SOCKET_ENV})",
    )
    common.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        default=default,
        help="vmpowerd's configuration file, to find its socket",
    )
    common.add_argument(
        "--json",
        action="store_true",
        default=False if default is None else default,
        help="machine-readable JSON on stdout, errors included",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmpower",
        description="Telemetry: read signals and write controls through vmpowerd.",
        parents=[common_options(None)],
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub, common_options(argparse.SUPPRESS))
    return parser


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add signals, read, write and session to a parser's subparsers."""
    sub.add_parser(
        "signals",
        parents=[common],
        help="list signals and controls",
        description="List every signal and control: domain, units, your access, description.",
    )
    read = sub.add_parser(
        "read", parents=[common], help="read one signal", description="Read one signal."
    )
    _request_args(read)
    write = sub.add_parser(
        "write",
        parents=[common],
        help="write one control and hold it",
        description="Set a control; it is restored when this command ends (Ctrl-C,"
        " SIGTERM, --hold-s, or the daemon stopping the session).",
    )
    _request_args(write)
    write.add_argument("value", help="the value, in the control's units (Hz)")
    write.add_argument(
        "--hold-s",
        type=float,
        metavar="SECONDS",
        help="keep the setting this long, then restore it (default: until interrupted)",
    )
    session = sub.add_parser(
        "session",
        parents=[common],
        help="sample signals periodically",
        description="Read 'NAME DOMAIN INDEX' requests from stdin and print one row of"
        " their values per period.",
    )
    session.add_argument(
        "-t",
        "--time",
        type=float,
        required=True,
        metavar="SECONDS",
        help="how long to sample (0: one row)",
    )
    session.add_argument(
        "-p", "--period", type=float, required=True, metavar="SECONDS", help="time between rows"
    )
    session.add_argument(
        "--format", choices=("csv", "json"), default="csv", help="row format (--json: json)"
    )


def _request_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="signal or control name (vmpower signals lists them)")
    parser.add_argument("domain", choices=DOMAINS)
    parser.add_argument("index", help="CPU or package number, 0 for board, VM name or number")


def resolve_socket(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return Path(args.socket)
    if args.config is not None:
        return load_config(args.config).control.socket
    env = os.environ.get(SOCKET_ENV)
    return Path(env) if env else ControlConfig().socket


def main(
    argv: Sequence[str] | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return EXIT_OK if exc.code == 0 else EXIT_USAGE
    try:
        socket_path = resolve_socket(args)
    except ConfigError as exc:
        return report_error(str(exc), EXIT_USAGE, args.json, stdout, stderr)
    return run(args, socket_path, stdin, stdout, stderr)


def run(
    args: argparse.Namespace, socket_path: Path, stdin: TextIO, stdout: TextIO, stderr: TextIO
) -> int:
    """Run the parsed telemetry command ``args.command``; returns the exit status."""
    as_json = bool(getattr(args, "json", False))
    try:
        if args.command == "signals":
            return _signals(socket_path, stdout, as_json)
        if args.command == "read":
            return _read(socket_path, args, stdout, as_json)
        if args.command == "write":
            return _write(socket_path, args, stdout, stderr, as_json)
        return _session(socket_path, args, stdin, stdout, stderr)
    except _Usage as exc:
        return report_error(str(exc), EXIT_USAGE, as_json, stdout, stderr)
    except (VmpowerError, OSError) as exc:
        return report_error(str(exc), EXIT_FAILED, as_json, stdout, stderr)
    except KeyboardInterrupt:
        # Ctrl-C ends a session (or a slow read) early: the rows printed stand, the
        # session's ``with`` has stopped it, and a traceback would only be noise.
        return EXIT_INTERRUPTED


def report_error(message: str, status: int, as_json: bool, out: TextIO, err: TextIO) -> int:
    """One line on stderr, or with --json one object on stdout; returns ``status``."""
    if as_json:
        print(json.dumps({"error": message, "exit_status": status}), file=out)
    else:
        print(f"vmpower: {message}", file=err)
    return status


def _request(args: argparse.Namespace) -> list[Any]:
    try:
        request = parse_request([args.name, args.domain, args.index])
    except VmpowerError as exc:
        raise _Usage(str(exc)) from None
    return request.to_json()


def _signals(socket_path: Path, out: TextIO, as_json: bool = False) -> int:
    rows = control.request(socket_path, "list_signals")
    if as_json:
        print(json.dumps(rows, indent=2, sort_keys=True), file=out)
        return EXIT_OK
    widths = {"name": 4, "domain": 6, "units": 5, "access": 6}
    for row in rows:
        for key in widths:
            widths[key] = max(widths[key], len(str(row.get(key, ""))))
    header = "  ".join(k.upper().ljust(w) for k, w in widths.items()) + "  DESCRIPTION"
    print(header, file=out)
    for row in rows:
        cells = "  ".join(str(row.get(k, "")).ljust(w) for k, w in widths.items())
        print(f"{cells}  {row.get('description', '')}", file=out)
    return EXIT_OK


# Signals that are a difference between two samples: a one-shot read has none.
INTERVAL_SIGNALS = frozenset({"CPU_POWER", "VM_ENERGY"})


def _read(socket_path: Path, args: argparse.Namespace, out: TextIO, as_json: bool = False) -> int:
    request = _request(args)
    with BatchClient(socket_path, signals=[request]) as batch:
        (value,) = batch.read()
    if request[0] in INTERVAL_SIGNALS:
        # One read has no interval to measure power or to share energy over: what the
        # session says then is 0 for "nothing measured yet", which is not a value.
        value = math.nan
    if as_json:
        shown = None if math.isnan(value) else value  # JSON has no NaN
        print(json.dumps({"request": request, "value": shown}), file=out)
    else:
        print(format_value(value), file=out)
    return EXIT_OK


def _write(
    socket_path: Path, args: argparse.Namespace, out: TextIO, err: TextIO, as_json: bool = False
) -> int:
    request = _request(args)
    try:
        value = float(args.value)
    except ValueError:
        raise _Usage(f"VALUE must be a number, not {args.value!r}") from None
    if not math.isfinite(value):
        raise _Usage(f"VALUE must be a finite number, not {args.value!r}")
    hold_s = args.hold_s
    if hold_s is not None and (not math.isfinite(hold_s) or hold_s < 0):
        raise _Usage(f"--hold-s must be >= 0 seconds, not {hold_s!r}")
    # Ctrl-C or SIGTERM ends the hold wherever it lands, even inside the write's round
    # trip or before the wait: leaving the session's ``with`` stops it, and the server
    # restores the value before that stop returns (a second signal cutting the stop
    # short leaves the restore to the server, which sees this process go). ``suppress``
    # is outermost: a SIGTERM landing as the handler is being put back is caught too.
    with (
        contextlib.suppress(KeyboardInterrupt, _Interrupted),
        _sigterm_interrupts(),
        BatchClient(socket_path, controls=[request]) as batch,
    ):
        batch.write([value])
        label = " ".join(str(x) for x in request)
        until = f"for {hold_s:g} s" if hold_s is not None else "until interrupted (Ctrl-C)"
        if as_json:
            held = {"request": request, "value": value, "hold_s": hold_s}
            print(json.dumps(held), file=out, flush=True)
        else:
            print(
                f"vmpower: {label} = {format_value(value)}; held {until}, then restored",
                file=err,
                flush=True,
            )
        if batch.ended(hold_s if hold_s is not None else None):
            print("vmpower: the session was stopped by vmpowerd; the value is restored", file=err)
            return EXIT_FAILED
    return EXIT_OK


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    def on_term(_signum: int, _frame: object) -> None:
        raise _Interrupted

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def read_requests(stream: TextIO) -> list[list[Any]]:
    """``NAME DOMAIN INDEX`` per line; blank lines and ``#`` comments skipped."""
    requests = []
    for number, raw in enumerate(stream, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3:
            raise _Usage(f"stdin line {number}: expected NAME DOMAIN INDEX, got {raw.strip()!r}")
        try:
            requests.append(parse_request(parts).to_json())
        except VmpowerError as exc:
            raise _Usage(f"stdin line {number}: {exc}") from None
    if not requests:
        raise _Usage("no requests on stdin (one 'NAME DOMAIN INDEX' per line)")
    return requests


def _session(
    socket_path: Path, args: argparse.Namespace, stdin: TextIO, out: TextIO, err: TextIO
) -> int:
    total_s, period_s = args.time, args.period
    if not (math.isfinite(period_s) and period_s > 0):
        raise _Usage(f"-p must be > 0 seconds, not {period_s!r}")
    if not (math.isfinite(total_s) and total_s >= 0):
        raise _Usage(f"-t must be >= 0 seconds, not {total_s!r}")
    requests = read_requests(stdin)
    rows = max(1, math.ceil(total_s / period_s - 1e-9))
    if getattr(args, "json", False):
        args.format = "json"
    with BatchClient(socket_path, signals=requests) as batch:
        labels = batch.signal_labels
        if args.format == "csv":
            print(",".join(labels), file=out, flush=True)
        start_s = time.monotonic()
        for row in range(rows):
            # A fixed grid: row k is due at start + k * period, whatever the last took.
            delay_s = start_s + row * period_s - time.monotonic()
            if delay_s > 0:
                time.sleep(delay_s)
            values = batch.read()
            if args.format == "csv":
                print(",".join(format_value(v) for v in values), file=out, flush=True)
            else:
                # JSON has no NaN: a signal that cannot be read is null
                obj = {
                    k: (None if math.isnan(v) else v) for k, v in zip(labels, values, strict=True)
                }
                print(json.dumps(obj), file=out, flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
